"""Which decoder skeletons keep the task after re-tuning? Candidates from the masked study, re-tuned.

    python -m skeleton_ds.experiments.study_retune --data-dir ../shared/data --output runs/study-retune \
        --prompt-from runs/study-decoder/prompt --docs

The protocol of skeleton_ds/experiments/study_decoder.py (SmolLM2-135M, SST-2, 1,600 training examples, 300 scored,
300 dev), carried through the whole pipeline: for each candidate (a set of localize / retune flags)
a pipeline run in OUTPUT/<candidate> reuses the one stage-1 prompt (--prompt-from, or one trained in
OUTPUT/base) and the one attribution pass, then localizes, converts and re-tunes, and the study
collects the dev accuracy before and after re-tuning with the parameters kept. Finished runs are
reused (the pipeline checks their recorded settings), so the study resumes and grows one candidate at
a time (--only). Writes OUTPUT/study.{json,md} and, with --docs, docs/results/study_retune.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

from skeleton_ds.tables import markdown_table
from skeleton_ds.cli import quiet_libraries, run_command
from skeleton_ds.config import Config, as_flags
from skeleton_ds.errors import UserError
from skeleton_ds.experiments import command_line, publish
from skeleton_ds.provenance import provenance
from skeleton_ds.stages.pipeline import run_pipeline

UNIFORM = {"keep_mode": "uniform", "protect_outliers": 0.0}
DECODER = {"keep_mode": "global", "protect_outliers": 20.0}  # the decoder's localization defaults
CANDIDATES = {  # name -> Config fields on top of the protocol
    "uniform, keep 0.5": {"ffn_keep": 0.5, **UNIFORM},
    "uniform, keep 0.3": {"ffn_keep": 0.3, **UNIFORM},
    "global + protect 20, keep 0.5": {"ffn_keep": 0.5, **DECODER},
    "global + protect 20, keep 0.3": {"ffn_keep": 0.3, **DECODER},
    "global + protect 20, keep 0.3, 3 re-tuning epochs": {"ffn_keep": 0.3, **DECODER, "retune_epochs": 3.0},
}
LABELS_ONLY = {"distill_kl": 0.0, "distill_hidden": 0.0}
"""The re-tuning this study measured, before decoders distilled by default (experiments.study_keep)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Decoder re-tuning study: candidate skeletons through the pipeline.")
    p.add_argument("--data-dir", type=Path, default=None, help="read GLUE/SuperGLUE files from DIR/<TASK>/")
    p.add_argument("--output", type=Path, default=Path("runs/study-retune"))
    p.add_argument("--prompt-from", type=Path, default=None,
                   help="a finished stage-1 prompt directory with this protocol's settings "
                        "(else trained in OUTPUT/base)")
    p.add_argument("--only", default="", help="comma list of candidates to run, by their run directory names "
                   "(default: all): " + ", ".join(map(slug, CANDIDATES)))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--max-train-examples", type=int, default=1600)
    p.add_argument("--max-eval-examples", type=int, default=300)
    p.add_argument("--attr-examples", type=int, default=300)
    p.add_argument("--config", default="ds_configs/zero2.json")
    p.add_argument("--docs", action="store_true", help="also write docs/results/study_retune.{json,md}")
    return p


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")


def chosen(only: str, candidates) -> list[str]:
    """The candidates --only names by run-directory name (a comma list; empty: all of them, in order)."""
    by_slug = {slug(name): name for name in candidates}
    picked = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in picked if n not in by_slug]
    if unknown:
        raise UserError(f"--only takes candidates by run-directory name ({', '.join(by_slug)}); unknown: "
                        f"{', '.join(unknown)}")
    return [by_slug[n] for n in picked] or list(candidates)


def _copy(source: Path, target: Path) -> None:
    from skeleton_ds.checkpoint import copy_atomically

    if not target.exists():
        copy_atomically(source, target)


def markdown(record: dict) -> str:
    full = record["full_prompt_tuned"]
    lines = [f"Full prompt tuning: {full:.3f} on {record['dev_examples']} dev examples ({record['model']}, SST-2, "
             f"{record['max_train_examples']} training examples). Re-tuning: the protocol's epochs unless named.", "",
             *markdown_table(["candidate", "before re-tuning", "after re-tuning", "gap to full",
                              "FFN kept (per layer, first .. last)", "parameters kept"])]
    for r in record["rows"]:
        sizes = r["ffn_sizes"]
        lines.append(f"| {r['candidate']} | {r['before']:.3f} | {r['after']:.3f} | {r['after'] - full:+.3f} | "
                     f"{sizes[0]} .. {sizes[-1]} (sum {sum(sizes)}) | {r['parameters_kept'] / 1e6:.1f}M |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = chosen(args.only, CANDIDATES)
    quiet_libraries()
    base = args.output / "base"
    common = Config(model=args.model, task="sst2", ds_config=Path(args.config), data_dir=args.data_dir, output=base,
                    max_train_examples=args.max_train_examples, max_eval_examples=args.max_eval_examples,
                    attr_examples=args.attr_examples, **LABELS_ONLY)
    start = time.perf_counter()
    if args.prompt_from is not None:
        _copy(args.prompt_from, base / "prompt")
    run_pipeline(replace(common, stages=("prompt", "attribute")))
    full = json.loads((base / "prompt" / "metrics.json").read_text())
    rows = []
    for name in names:
        run = args.output / slug(name)
        _copy(base / "prompt", run / "prompt")
        _copy(base / "attribution.safetensors", run / "attribution.safetensors")
        run_pipeline(replace(common, output=run, **CANDIDATES[name]))
        retune = json.loads((run / "retune" / "metrics.json").read_text())
        conversion = json.loads((run / "conversion.json").read_text())
        skeleton = json.loads((run / "skeleton.json").read_text())
        rows.append({"candidate": name, "flags": as_flags(CANDIDATES[name]), "ffn_keep": skeleton["ffn_keep"],
                     "before": retune["before_retune"]["accuracy"], "after": retune["metrics"]["accuracy"],
                     "retune_steps": retune["steps"], "retune_seconds": round(retune["train_seconds"], 1),
                     "ffn_sizes": skeleton["ffn_sizes"], "head_counts": skeleton["head_counts"],
                     "parameters_full": conversion["parameters_full"],
                     "parameters_kept": conversion.get("parameters_kept", conversion["parameters_compact"]),
                     "run": str(run), "run_provenance": retune["provenance"]})
    command = command_line("study_retune", argv)
    record = {"provenance": provenance(command), "command": command, "model": args.model,
              "max_train_examples": args.max_train_examples, "dev_examples": full["dev_examples"],
              "full_prompt_tuned": full["metrics"]["accuracy"], "rows": rows,
              "seconds": round(time.perf_counter() - start, 1)}
    text = markdown(record)
    publish(args.output, "study_retune", record, text, docs=args.docs)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))
