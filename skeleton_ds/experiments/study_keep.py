"""Which recipe keeps the task at FFN keep 0.3 and 0.2 on a trained decoder? Candidates through the whole pipeline.

    nice -n 19 python -m skeleton_ds.experiments.study_keep --data-dir ../shared/data --output runs/study-keep \
        [--only NAMES] [--docs]

The protocol of experiments.study_retune (SmolLM2-135M, SST-2, 1,600 training examples, 300 scored, 300 dev;
one stage-1 prompt in OUTPUT/base, reused by every cell), at each --keeps value, for each candidate:

- today's recipe (activation x gradient, abs-sum over the text tokens, global keep with the outliers kept);
- distillation in re-tuning: the label KL, the KL plus the final hidden state, and those plus the residual
  stream of layers 10 and 20 at the answer position, as CoFi's layer distillation matches layers (--distill-*);
- bias compensation beside distillation (--compensate mean: each removed neuron's mean output kept as a bias);
- iterative localization: a --keep-schedule through 0.5 (and 0.3) down to the keep;
- scoring that fits a large step: integrated gradients (4 steps), the answer position only, the max over
  tokens (the authors' own code), all 1,600 training examples instead of 300;
- combinations (--only picks any of them by run-directory name).

Every cell re-tunes for the same number of optimizer steps (--retune-epochs over the same examples; a keep
schedule shares them out over its steps), so no candidate wins by training longer; nothing reads dev but the
reported evaluation. Cells share the stage-1 prompt, and those that score the same way share the base pass's
scores. A cell finished with the same settings is read from its records (stages.pipeline.is_retuned), so the
study resumes from its light files in a later session:

    bash launch/table_state.sh save runs/study-keep docs/results/study_keep.runs.tar.gz    # before the session ends
    bash launch/table_state.sh load docs/results/study_keep.runs.tar.gz runs/study-keep    # in the next one

Writes OUTPUT/study.{json,md,png}; with --docs also docs/results/study_keep.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from skeleton_ds.tables import markdown_table
from skeleton_ds.checkpoint import copy_atomically
from skeleton_ds.cli import run_command
from skeleton_ds.config import Config
from skeleton_ds.errors import UserError
from skeleton_ds.experiments import command_line, publish
from skeleton_ds.experiments.study_retune import chosen, slug
from skeleton_ds.provenance import provenance

KL = {"distill_kl": 1.0}
HIDDEN = {"distill_kl": 1.0, "distill_hidden": 1.0}
LAYERS = (10, 20)  # of SmolLM2's 30: a third and two thirds of the way up
CANDIDATES: dict[str, dict] = {  # name -> Config fields on top of the protocol ("schedule": a keep schedule)
    "today": {},
    "distill KL": KL,
    "distill KL + hidden": HIDDEN,
    "distill KL + hidden + layers": {**HIDDEN, "distill_layers": LAYERS},
    "distill KL + hidden + compensation": {**HIDDEN, "compensate": "mean"},
    "schedule": {"schedule": True},
    "integrated gradients": {"scorer": "integrated-gradients", "ig_steps": 4},
    "answer position": {"attr_positions": "answer"},
    "max over tokens": {"attr_reduce": "max"},
    "1600 attribution examples": {"attr_examples": 1600},
    "schedule + distill KL": {"schedule": True, **KL},
    "schedule + distill KL + hidden": {"schedule": True, **HIDDEN},
}
SCORING = ("scorer", "ig_steps", "attr_positions", "attr_reduce", "attr_examples")
"""Fields that change the scores: a cell that sets none of them copies the base pass's scores."""


def schedule_to(keep: float) -> tuple[float, ...]:
    """The keep schedule of a cell: through 0.5 and 0.3 (those above the keep), then the keep."""
    return tuple(k for k in (0.5, 0.3) if k > keep) + (keep,)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Keep study: candidate recipes at FFN keep 0.3 and 0.2, re-tuned alike.")
    p.add_argument("--data-dir", type=Path, default=None, help="read GLUE/SuperGLUE files from DIR/<TASK>/")
    p.add_argument("--output", type=Path, default=Path("runs/study-keep"))
    p.add_argument("--only", default="", help="comma list of candidates by run-directory name (default: all): "
                   + ", ".join(map(slug, CANDIDATES)))
    p.add_argument("--keeps", default="0.3,0.2", help="comma list of FFN keeps")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--max-train-examples", type=int, default=1600)
    p.add_argument("--max-eval-examples", type=int, default=300)
    p.add_argument("--attr-examples", type=int, default=300)
    p.add_argument("--retune-epochs", type=float, default=1.0, help="every cell's re-tuning budget (equal steps)")
    p.add_argument("--config", type=Path, default=Path("ds_configs/zero2.json"))
    p.add_argument("--docs", action="store_true", help="also write docs/results/study_keep.{json,md,png}")
    return p


def cell_config(base: Config, run: Path, keep: float, fields: dict) -> Config:
    fields = dict(fields)
    schedule = schedule_to(keep) if fields.pop("schedule", False) else ()
    return replace(base, output=run, ffn_keep=keep, keep_schedule=schedule, **fields)


def _share(source: Path, target: Path, name: str) -> None:
    if (source / name).exists() and not (target / name).exists():
        copy_atomically(source / name, target / name)


def _row(name: str, fields: dict, cfg: Config) -> dict:
    retune = json.loads((cfg.output / "retune" / "metrics.json").read_text())
    conversion = json.loads((cfg.output / "conversion.json").read_text())
    skeleton = json.loads((cfg.output / "skeleton.json").read_text())
    summary = json.loads((cfg.output / "metrics.json").read_text())
    return {"candidate": name, "fields": fields, "ffn_keep": cfg.ffn_keep, "keep_schedule": list(cfg.keep_schedule),
            "before": retune["before_retune"]["accuracy"], "after": retune["metrics"]["accuracy"],
            "steps": [{"ffn_keep": s["ffn_keep"], "before": s["before_retune"]["accuracy"],
                       "after": s["after_retune"]["accuracy"]} for s in summary.get("keep_schedule", [])],
            "retune_steps": sum(json.loads((Path(s["run"]) / "retune" / "metrics.json").read_text())["steps"]
                                for s in summary["keep_schedule"]) if summary.get("keep_schedule") else retune["steps"],
            "ffn_sizes": skeleton["ffn_sizes"], "parameters_full": conversion["parameters_full"],
            "parameters_kept": conversion.get("parameters_kept", conversion["parameters_compact"]),
            "run": str(cfg.output), "run_provenance": retune["provenance"]}


def markdown(record: dict) -> str:
    full, n = record["full_prompt_tuned"], record["dev_examples"]
    se = (full * (1 - full) / n) ** 0.5
    lines = [f"Full prompt tuning: {full:.3f} on {n} dev examples ({record['model']}, SST-2, "
             f"{record['max_train_examples']} training examples; one standard error about {se:.3f}). Every cell "
             f"re-tunes for {record['retune_epochs']:g} epoch(s) of optimizer steps, shared out over a "
             "schedule's steps.",
             "", *markdown_table(["candidate", "FFN keep", "before re-tuning", "after re-tuning", "gap to full",
                                  "parameters kept"])]
    for r in sorted(record["rows"], key=lambda r: (-r["ffn_keep"], list(CANDIDATES).index(r["candidate"]))):
        steps = " (" + ", ".join(f"{s['ffn_keep']:g}: {s['after']:.3f}" for s in r["steps"][:-1]) + ")" \
            if len(r["steps"]) > 1 else ""
        lines.append(f"| {r['candidate']}{steps} | {r['ffn_keep']:g} | {r['before']:.3f} | {r['after']:.3f} | "
                     f"{r['after'] - full:+.3f} | {r['parameters_kept'] / 1e6:.1f}M |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = chosen(args.only, CANDIDATES)
    try:
        keeps = [float(k) for k in args.keeps.split(",") if k.strip()]
    except ValueError:
        raise UserError(f"--keeps takes a comma list of numbers, got {args.keeps!r}") from None

    from skeleton_ds.cli import quiet_libraries
    from skeleton_ds.plots import plot_study
    from skeleton_ds.stages.pipeline import is_retuned, run_pipeline

    quiet_libraries()
    base = Config(model=args.model, task="sst2", ds_config=args.config, data_dir=args.data_dir,
                  output=args.output / "base", max_train_examples=args.max_train_examples,
                  max_eval_examples=args.max_eval_examples, attr_examples=args.attr_examples,
                  retune_epochs=args.retune_epochs, resume=True,  # an interrupted cell continues
                  distill_kl=0.0, distill_hidden=0.0)  # "today" re-tuned on labels (before this study's default)
    start = time.perf_counter()
    run_pipeline(replace(base, stages=("prompt", "attribute")))
    full = json.loads((base.output / "prompt" / "metrics.json").read_text())
    rows = []
    for keep in keeps:
        for name in names:
            fields = CANDIDATES[name]
            cfg = cell_config(base, args.output / f"keep{keep:g}-{slug(name)}", keep, fields)
            _share(base.output, cfg.output, "prompt")
            if not set(fields) & set(SCORING):  # the base pass's scores: the cell's own, or its first step's
                first = (cfg.output / "steps" / f"ffn-{cfg.keep_schedule[0]:g}" if len(cfg.keep_schedule) > 1
                         else cfg.output)
                _share(base.output, first, "attribution.safetensors")
            if not is_retuned(cfg):
                print(f"study_keep: {name} at keep {keep:g} -> {cfg.output}", flush=True)
                run_pipeline(cfg)
            rows.append(_row(name, fields, cfg))
            print(f"study_keep: {name} at keep {keep:g}: before {rows[-1]['before']:.3f}, "
                  f"after {rows[-1]['after']:.3f}", flush=True)
    command = command_line("study_keep", argv)
    record = {"provenance": provenance(command), "command": command, "model": args.model,
              "max_train_examples": args.max_train_examples, "attr_examples": args.attr_examples,
              "retune_epochs": args.retune_epochs, "dev_examples": full["dev_examples"],
              "full_prompt_tuned": full["metrics"]["accuracy"], "rows": rows,
              "seconds": round(time.perf_counter() - start, 1)}
    points = [{"task": stage, "scorer": r["candidate"], "ffn_keep": r["ffn_keep"], "accuracy": r[key]}
              for stage, key in (("before re-tuning", "before"), ("after re-tuning", "after")) for r in rows]
    plot_study(points, {"after re-tuning": record["full_prompt_tuned"],
                        "before re-tuning": record["full_prompt_tuned"]},
               args.output / "study.png", title=f"{args.model} SST-2: dev accuracy per recipe "
                                                 f"(full prompt tuning {record['full_prompt_tuned']:.3f})")
    publish(args.output, "study_keep", record, markdown(record), docs=args.docs, figure=True)
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))
