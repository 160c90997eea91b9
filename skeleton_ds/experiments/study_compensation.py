"""Does bias compensation help? The same skeleton converted with and without it, before and after re-tuning.

    python -m skeleton_ds.experiments.study_compensation --data-dir ../shared/data --output runs/compensation
    python -m skeleton_ds.experiments.study_compensation --data-dir ../shared/data --task rte --ffn-keeps 0.2,0.5

Prompt-tunes and scores once (OUTPUT/base: stages prompt, attribute), then for each FFN keep ratio and
each of --compensate none / mean runs localize, convert and retune in OUTPUT/keep<K>-<mode> from that
prompt and those scores, and collects the dev metrics of the skeleton before and after re-tuning.
Writes OUTPUT/study.{json,md} and, with --docs, docs/results/study_compensation.{json,md} (the command, settings
and every result).
"""

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

from skeleton_ds.tables import markdown_table
from skeleton_ds.cli import quiet_libraries, run_command
from skeleton_ds.config import Config, float_list
from skeleton_ds.experiments import command_line, publish
from skeleton_ds.provenance import provenance
from skeleton_ds.stages.pipeline import run_pipeline


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Bias compensation study: skeleton accuracy with and without it.")
    p.add_argument("--data-dir", type=Path, default=None, help="read GLUE/SuperGLUE files from DIR/<TASK>/")
    p.add_argument("--output", type=Path, default=Path("runs/compensation"))
    p.add_argument("--model", default="minilm")
    p.add_argument("--task", default="sst2")
    p.add_argument("--ffn-keeps", default="0.2,0.3", help="comma list of FFN keep ratios")
    p.add_argument("--max-train-examples", type=int, default=4000)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--config", default="ds_configs/zero2.json")
    p.add_argument("--docs", action="store_true", help="also write docs/results/study_compensation.{json,md}")
    return p


def markdown(record: dict) -> str:
    """The study's table (docs/results/study_compensation.md; tests/test_readme_tables.py checks the guide's copy)."""
    full = record["full_prompt_tuned"]["accuracy"]
    lines = [f"Bias compensation, {record['task']} dev ({record['model']}, {record['max_train_examples']} training "
             f"examples, seed {record['seed']}); full model prompt-tuned: accuracy {full:.4f}.", "",
             f"`{record['command']}` ({record['date']}, {record['seconds']:.0f} s)", "",
             *markdown_table(["FFN keep", "compensation", "accuracy before re-tuning", "after re-tuning"])]
    lines += [f"| {r['ffn_keep']:g} | {r['compensate']} | {r['before_retune']['accuracy']:.4f} | "
              f"{r['after_retune']['accuracy']:.4f} |" for r in record["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    base = args.output / "base"
    common = Config(model=args.model, task=args.task, ds_config=Path(args.config), seed=args.seed, output=base,
                    max_train_examples=args.max_train_examples, data_dir=args.data_dir)
    start = time.perf_counter()
    run_pipeline(replace(common, stages=("prompt", "attribute")))
    full = json.loads((base / "prompt" / "metrics.json").read_text())["metrics"]
    rows = []
    for keep in float_list(args.ffn_keeps):
        for mode in ("none", "mean"):
            run = args.output / f"keep{keep:g}-{mode}"
            if not (run / "prompt").exists():
                shutil.copytree(base / "prompt", run / "prompt")
                shutil.copy(base / "attribution.safetensors", run / "attribution.safetensors")
            run_pipeline(replace(common, output=run, stages=("localize", "convert", "retune"), ffn_keep=keep,
                                 compensate=mode))
            retune = json.loads((run / "retune" / "metrics.json").read_text())
            rows.append({"ffn_keep": keep, "compensate": mode, "before_retune": retune["before_retune"],
                         "after_retune": retune["metrics"], "run": str(run)})
    command = command_line("study_compensation", argv)
    record = {"provenance": provenance(command), "command": command,
              "date": date.today().isoformat(), "task": args.task, "model": args.model,
              "max_train_examples": args.max_train_examples, "seed": args.seed, "full_prompt_tuned": full,
              "rows": rows, "seconds": round(time.perf_counter() - start, 1)}
    text = markdown(record)
    publish(args.output, "study_compensation", record, text, docs=args.docs)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))
