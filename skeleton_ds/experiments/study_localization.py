"""Does attribution find the task's neurons? Mask all but the top-scoring FFN neurons and measure dev accuracy.

    python -m skeleton_ds.experiments.study_localization --data-dir ../shared/data --output runs/study
    python -m skeleton_ds.experiments.study_localization --data-dir ../shared/data --output runs/study-rte --tasks rte \
        --ratios 0.1,0.3
    python -m skeleton_ds.experiments.study_localization --data-dir ../shared/data --output runs/study-5k \\
        --attr-examples 4000 \\
        --attr-reduce mean-abs

Per task: prompt-tune once (stage 1, kept in OUTPUT/<task>/prompt and reused by later runs with the
same settings), score every unit with each scorer (attribution, random, weight-magnitude,
activation-magnitude), then for each FFN keep ratio zero the unkept FFN neurons (uniform count per
layer, rounded to --align; attention heads all kept; no retuning) and evaluate on the dev split.
Writes OUTPUT/study.json (command, settings, unpruned accuracy, every result), OUTPUT/study.md (the results guide's
table) and OUTPUT/study.png.
"""

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from skeleton_ds.experiments import command_line
from skeleton_ds.tables import markdown_table
from skeleton_ds.checkpoint import write_json, write_text
from skeleton_ds.cli import run_command
from skeleton_ds.errors import UserError
from skeleton_ds.provenance import provenance

SCORER_ORDER = ("attribution", "random", "weight-magnitude", "activation-magnitude")
PROMPT_KEYS = ("model", "max_train_examples", "epochs", "seed", "data_dir")  # what the reused stage-1 prompt must match


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Localization study: dev accuracy of FFN-masked prompted models "
                                            "per scorer.")
    p.add_argument("--data-dir", type=Path, default=None, help="read GLUE/SuperGLUE files from DIR/<TASK>/")
    p.add_argument("--output", type=Path, default=Path("runs/study"), help="study directory (one sub-run per task)")
    p.add_argument("--model", default="minilm", help="HF model id or local directory; 'minilm' = packaged MiniLM")
    p.add_argument("--tasks", default="sst2,rte", help="comma list of tasks")
    p.add_argument("--ratios", default="0.2,0.3,0.5", help="comma list of FFN keep ratios in (0, 1]")
    p.add_argument("--scorers", default=",".join(SCORER_ORDER), help="comma list of scorers")
    p.add_argument("--max-train-examples", type=int, default=4000, help="training examples for prompt tuning (0: all)")
    p.add_argument("--attr-examples", type=int, default=0,
                   help="training examples scored (0: all, as the pipeline does)")
    p.add_argument("--attr-reduce", default="abs-sum", help="abs-sum | mean-abs | signed (attribution scorer)")
    p.add_argument("--align", type=int, default=64, help="kept FFN count per layer is a multiple of this")
    p.add_argument("--epochs", type=float, default=1.0, help="prompt-tuning epochs")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--config", dest="ds_config", type=Path, default=Path("ds_configs/zero2.json"),
                   help="DeepSpeed JSON config")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _ratios(value: str) -> list[float]:
    try:
        ratios = [float(v) for v in _csv(value)]
    except ValueError:
        raise UserError(f"--ratios takes a comma list of numbers, got {value!r}") from None
    if not ratios or any(not 0 < r <= 1 for r in ratios):
        raise UserError(f"--ratios must be a non-empty comma list of numbers in (0, 1], got {value!r}")
    return sorted(set(ratios))


def _check_reused_prompt(cfg) -> None:
    """A prompt left in the output by an earlier run is reused only if it was trained with these settings."""
    metrics = cfg.output / "prompt" / "metrics.json"
    if not metrics.is_file():
        return
    recorded = json.loads(metrics.read_text()).get("config", {})
    differ = [k for k in PROMPT_KEYS if k in recorded and recorded[k] != str(getattr(cfg, k))]
    if differ:
        what = ", ".join(f"{k} {recorded[k]} (now {getattr(cfg, k)})" for k in differ)
        raise UserError(f"{cfg.output / 'prompt'} was trained with other settings ({what}): "
                        f"pass another --output or remove that directory")


def study(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    tasks, ratios, scorers = _csv(args.tasks), _ratios(args.ratios), _csv(args.scorers)
    if not tasks:
        raise UserError("--tasks needs at least one task")
    unknown = [s for s in scorers if s not in SCORER_ORDER]
    if unknown or not scorers:
        raise UserError(f"--scorers takes a comma list of {', '.join(SCORER_ORDER)}, got {args.scorers!r}")

    from skeleton_ds.config import Config

    base = dict(model=args.model, ds_config=args.ds_config, data_dir=args.data_dir,
                max_train_examples=args.max_train_examples, epochs=args.epochs, seed=args.seed,
                attr_examples=args.attr_examples, attr_reduce=args.attr_reduce, align=args.align,
                head_keep=1.0, keep_mode="uniform")
    configs = {task: Config(task=task, output=args.output / task, stages=("prompt",), **base) for task in tasks}
    for cfg in configs.values():  # every user mistake surfaces before any model is loaded
        _check_reused_prompt(cfg)

    from skeleton_ds.cli import quiet_libraries

    quiet_libraries()
    from rich.console import Console
    from rich.table import Table

    from skeleton_ds.localization import masked, select
    from skeleton_ds.plots import plot_study
    from skeleton_ds.stages.attribute import AttributionRecipe
    from skeleton_ds.stages.pipeline import run_pipeline

    t_start = time.perf_counter()
    main_rank = os.environ.get("RANK", "0") == "0"
    console = Console()
    per_task: dict[str, dict] = {}
    results: list[dict] = []
    geometry = None
    for task, cfg in configs.items():
        t_task = time.perf_counter()
        run_pipeline(cfg)  # stage 1; skipped when OUTPUT/<task>/prompt is complete
        t_prompt = time.perf_counter() - t_task
        rec = AttributionRecipe(cfg)
        rec.setup()
        geometry = rec.geometry
        unpruned = rec.evaluate()
        stage1 = json.loads((cfg.output / "prompt" / "metrics.json").read_text())
        per_task[task] = {"unpruned_accuracy": unpruned["accuracy"], "unpruned_loss": unpruned["loss"],
                          "stage1_dev_accuracy": stage1["metrics"]["accuracy"], "readout": rec.readout,
                          "train_examples": stage1["train_examples"], "prompt_steps": stage1["steps"],
                          "dev_examples": len(rec.dev_set), "scored_examples": {}, "score_seconds": {}}
        rec.report.note(f"{task}: unpruned prompt-tuned dev accuracy {unpruned['accuracy']:.4f} "
                        f"({len(rec.dev_set)} examples)")
        for scorer in scorers:
            t0 = time.perf_counter()
            scores, examples = rec.score(scorer)
            per_task[task]["score_seconds"][scorer] = round(time.perf_counter() - t0, 1)
            per_task[task]["scored_examples"][scorer] = examples
            for ratio in ratios:
                skeleton = select(scores, geometry, ffn_keep=ratio, head_keep=1.0, align=args.align, mode="uniform")
                with masked(rec.model.backbone, rec.backbone.adapter, geometry, skeleton):
                    metrics = rec.evaluate()
                sizes = skeleton.ffn_sizes()
                results.append({"task": task, "scorer": scorer, "ffn_keep": ratio, "ffn_kept": sizes[0],
                                "ffn_sizes": sizes, "ffn_kept_total": sum(sizes),
                                "ffn_total": geometry.layers * geometry.ffn_size,
                                "accuracy": metrics["accuracy"], "loss": metrics["loss"],
                                "delta_vs_unpruned": metrics["accuracy"] - unpruned["accuracy"]})
                rec.report.note(f"{task} {scorer} keep {ratio:g} ({sizes[0]}/{geometry.ffn_size} per layer): "
                                f"accuracy {metrics['accuracy']:.4f}")
        per_task[task]["prompt_seconds"] = round(t_prompt, 1)
        per_task[task]["seconds"] = round(time.perf_counter() - t_task, 1)

    summary = {}
    for task in tasks:
        acc = {(r["scorer"], r["ffn_keep"]): r["accuracy"] for r in results if r["task"] == task}
        if "attribution" in scorers:
            summary[task] = {f"attribution_beats_{other}_at_every_ratio":
                             all(acc[("attribution", r)] > acc[(other, r)] for r in ratios)
                             for other in scorers if other != "attribution"}

    if not main_rank:
        return 0
    table = Table(title=f"Localization study: {args.model}, FFN neurons masked (heads kept, no retuning)",
                  caption=f"uniform keep per layer, align {args.align}; {args.attr_examples or 'all'} scored examples, "
                          f"reduce {args.attr_reduce}")
    for name, justify in (("task", "left"), ("scorer", "left"), ("keep", "right"), ("FFN kept/layer", "right"),
                          ("dev acc", "right"), ("vs unpruned", "right")):
        table.add_column(name, justify=justify, no_wrap=True)
    for task in tasks:
        table.add_row(task, "[bold]unpruned[/]", "1", f"{geometry.ffn_size}/{geometry.ffn_size}",
                      f"[bold]{per_task[task]['unpruned_accuracy']:.4f}[/]", "")
        for r in (r for r in results if r["task"] == task):  # best scorer at each ratio in green
            best = max(x["accuracy"] for x in results if x["task"] == task and x["ffn_keep"] == r["ffn_keep"])
            acc = f"{r['accuracy']:.4f}"
            table.add_row("", r["scorer"], f"{r['ffn_keep']:g}", f"{r['ffn_kept']}/{geometry.ffn_size}",
                          f"[green]{acc}[/]" if r["accuracy"] == best else acc, f"{r['delta_vs_unpruned']:+.4f}")
        table.add_section()
    console.print(table)
    for task, verdict in summary.items():
        console.print(f"{task}: " + ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in verdict.items()))

    args.output.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "local_rank"}
    settings |= {"tasks": tasks, "ratios": ratios, "scorers": scorers, "head_keep": 1.0, "keep_mode": "uniform",
                 "world_size": int(os.environ.get("WORLD_SIZE", "1")),
                 "prompt": {k: getattr(next(iter(configs.values())), k)
                            for k in ("prompt_length", "lr", "head_lr", "max_length", "readout", "batch_size")},
                 "geometry": {"layers": geometry.layers, "ffn_size": geometry.ffn_size, "kv_heads": geometry.kv_heads}}
    command = command_line("study_localization", argv)
    record = {"provenance": provenance(command), "command": command, "argv": sys.argv, "cwd": os.getcwd(),
              "settings": settings, "tasks": per_task, "results": results, "summary": summary,
              "seconds": round(time.perf_counter() - t_start, 1)}
    write_json(args.output / "study.json", record)  # atomic, like every artifact
    write_text(args.output / "study.md", markdown(record))
    plot_study(results, {t: v["unpruned_accuracy"] for t, v in per_task.items()}, args.output / "study.png",
               title=f"{args.model}: dev accuracy, top FFN neurons kept, rest masked (no retuning)")
    console.print(f"[bold]skeleton_ds[/]: study -> {args.output / 'study.json'}, {args.output / 'study.png'} "
                  f"({record['seconds']:.0f} s)")
    return 0


def markdown(record: dict) -> str:
    """The results guide's table: masked dev accuracy per task, scorer and keep ratio (the best per column in bold)."""
    ratios, ffn_size = record["settings"]["ratios"], record["settings"]["geometry"]["ffn_size"]
    lines = markdown_table(["task (unpruned prompt-tuned)", "scorer", *(
        f"keep {k:g} ({next(r['ffn_kept'] for r in record['results'] if r['ffn_keep'] == k)}/{ffn_size})"
        for k in ratios)])
    for task, info in record["tasks"].items():
        mine = [r for r in record["results"] if r["task"] == task]
        best = {k: max(r["accuracy"] for r in mine if r["ffn_keep"] == k) for k in ratios}
        for i, scorer in enumerate(record["settings"]["scorers"]):
            acc = {r["ffn_keep"]: r["accuracy"] for r in mine if r["scorer"] == scorer}
            cells = [f"**{acc[k]:.3f}**" if acc[k] == best[k] else f"{acc[k]:.3f}" for k in ratios]
            label = f"{TASK_NAMES.get(task, task)} ({info['unpruned_accuracy']:.3f}, {info['dev_examples']} dev)"
            lines.append(f"| {label if i == 0 else ''} | {scorer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


TASK_NAMES = {"sst2": "SST-2", "rte": "RTE", "qnli": "QNLI", "cb": "CB", "copa": "COPA"}


if __name__ == "__main__":
    sys.exit(run_command(study, sys.argv[1:]))
