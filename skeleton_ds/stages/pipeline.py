"""Runs the requested stages in order and summarises the run in DIR/metrics.json.

    deepspeed launch/train.py --config ds_configs/zero3.json --model M --task T --output DIR [--stages a,b,...]

Each stage publishes its outputs atomically and counts as done only when they are complete, so
re-running the same command skips finished stages and resumes an interrupted one (`--resume`
continues a prompt-tuning stage from its last checkpoint; `--overwrite` redoes finished stages).
"""

from __future__ import annotations

import json
import os
import time

from skeleton_ds import checkpoint, preemption
from skeleton_ds.config import STAGES, Config
from skeleton_ds.stages.attribute import AttributionRecipe
from skeleton_ds.stages.convert import ConvertRecipe
from skeleton_ds.stages.localize import LocalizeRecipe
from skeleton_ds.stages.prompt_tuning import PromptTuningRecipe, RetuneRecipe
from skeleton_ds.ui import Reporter

RECIPES = {"prompt": PromptTuningRecipe, "attribute": AttributionRecipe, "localize": LocalizeRecipe,
           "convert": ConvertRecipe, "retune": RetuneRecipe}
assert tuple(RECIPES) == STAGES


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def run_pipeline(cfg: Config) -> dict:
    summary_file = cfg.output / "metrics.json"
    previous = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    seconds = dict(previous.get("stage_seconds", {}))
    for stage in STAGES:
        if stage not in cfg.stages:
            continue
        recipe = RECIPES[stage](cfg)
        if recipe.done() and not cfg.overwrite:
            if _is_main():
                print(f"skeleton_ds: stage {stage} is complete in {cfg.output}, skipping (--overwrite redoes it)")
            continue
        if preemption.agreed_stop():  # a stop asked for during the last stage's evaluation or saving
            raise preemption.Preempted(f"stopped on {preemption.signal_name()} before stage {stage}; finished stages "
                                       f"are kept: run the same command with --resume")
        start = time.perf_counter()
        recipe.run()
        seconds[stage] = round(time.perf_counter() - start, 2)
    summary = summarize(cfg, seconds)
    if _is_main() and cfg.output.is_dir():
        checkpoint.write_json(summary_file, summary)
        Reporter(enabled=True).metrics_table(f"{cfg.task}: Skeleton pipeline", _table_rows(summary),
                                             caption=str(summary_file))
    return summary


def _read(path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def summarize(cfg: Config, stage_seconds: dict) -> dict:
    """What the stages produced so far: dev metrics of the full prompt-tuned model and of the skeleton
    before and after re-tuning, parameter counts, and each stage's wall time."""
    prompt = _read(cfg.output / "prompt" / "metrics.json")
    retune = _read(cfg.output / "retune" / "metrics.json")
    conversion = _read(cfg.output / "conversion.json")
    skeleton = _read(cfg.output / "skeleton.json")
    return {
        "task": cfg.task, "model": cfg.model,
        "full_prompt_tuned": prompt.get("metrics"),
        "skeleton_before_retune": retune.get("before_retune"),
        "skeleton_after_retune": retune.get("metrics"),
        "ffn_keep": skeleton.get("ffn_keep"), "head_keep": skeleton.get("head_keep"),
        "ffn_sizes": skeleton.get("ffn_sizes"),
        "parameters_full": conversion.get("parameters_full"), "parameters_compact": conversion.get("parameters_compact"),
        "stage_seconds": stage_seconds,
    }


def _table_rows(summary: dict) -> dict[str, float]:
    rows = {}
    for key, label in (("full_prompt_tuned", "full model, prompt-tuned"), ("skeleton_before_retune", "skeleton, before retune"),
                       ("skeleton_after_retune", "skeleton, after retune")):
        if summary.get(key):
            rows[f"{label}: accuracy"] = summary[key]["accuracy"]
    if summary.get("parameters_full"):
        rows["parameters full (M)"] = summary["parameters_full"] / 1e6
        rows["parameters compact (M)"] = summary["parameters_compact"] / 1e6
    rows |= {f"{stage} seconds": s for stage, s in summary["stage_seconds"].items()}
    return rows
