"""Reproduce the results table: the real MiniLM on five real tasks, Skeleton against honest controls.

    python launch/reproduce.py --data-dir ../shared/data                       # the full table (about 2 h on 2 cores)
    python launch/reproduce.py --data-dir ../shared/data --tasks cb --seeds 1 --ffn-keeps 0.5 --quick   # minutes

Per task and seed: prompt-tune the full model (stage 1) and score every unit (stage 2) once; then per FFN
keep ratio build four skeletons from that prompt and re-tune each the same way (stages localize,
convert, retune):
    attribution            activation x gradient scores (the method)
    attribution+comp       the same skeleton with bias compensation (--compensate mean)
    random                 seeded random scores (control)
    weight-magnitude       L2 norm of each unit's input weights (control)
and record the dev metric of the full prompt-tuned model, of each skeleton before and after re-tuning,
the parameter counts, and the majority-class baseline (did the full model learn the task at all?).
Small tasks run several seeds (mean and standard deviation); large training sets are subsampled (the
table says where). The compact MiniLM's measured speed-up over the full model comes from the benchmark
(skeleton_ds.bench, one process). Writes OUTPUT/reproduce.json and docs/reproduce.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from skeleton_ds.checkpoint import write_json, write_text  # noqa: E402
from skeleton_ds.cli import run_command, train  # noqa: E402
from skeleton_ds.errors import UserError  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"
VARIANTS = {  # name -> (scorer, compensate)
    "attribution": ("attribution", "none"),
    "attribution+comp": ("attribution", "mean"),
    "random": ("random", "none"),
    "weight-magnitude": ("weight-magnitude", "none"),
}
# Per task: seeds to run, training examples for prompt tuning / re-tuning and for scoring, dev examples
# (0: all). Chosen so the whole table takes about two hours on 2 CPU cores.
PLAN = {
    "sst2": dict(seeds=1, train=8000, attr=2000, dev=0, epochs=1.0),
    "qnli": dict(seeds=1, train=4000, attr=2000, dev=1000, epochs=1.0),
    "rte": dict(seeds=3, train=0, attr=1000, dev=0, epochs=1.0),
    "cb": dict(seeds=3, train=0, attr=0, dev=0, epochs=4.0),
    "copa": dict(seeds=3, train=0, attr=0, dev=0, epochs=4.0),
}
GENERIC_QNLI = ["--task", "generic", "--text-columns", "text_a,text_b", "--label-column", "label",
                "--label-names", "entailment,not_entailment", "--template", "{text_a} ? {answer} , {text_b}",
                "--verbalizer", "yes,no"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Reproduce the Skeleton results table on real tasks with controls.")
    p.add_argument("--data-dir", type=Path, required=True, help="GLUE/SuperGLUE files (../shared/data)")
    p.add_argument("--output", type=Path, default=Path("runs/reproduce"))
    p.add_argument("--model", default="minilm")
    p.add_argument("--tasks", default=",".join(PLAN), help="comma list of " + ", ".join(PLAN))
    p.add_argument("--ffn-keeps", default="0.2,0.3,0.5")
    p.add_argument("--seeds", type=int, default=0, help="seeds per task (0: the plan's: 3 for small tasks, else 1)")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny subsets, one epoch, no benchmark")
    p.add_argument("--no-docs", action="store_true", help="do not write docs/reproduce.*")
    p.add_argument("--config", default="ds_configs/zero2.json")
    return p


def _stage(argv: list[str]) -> None:
    code = run_command(train, argv)
    if code:
        raise UserError(f"stage run failed (exit {code}): {shlex.join(argv)}")


def _task_flags(task: str, data_dir: Path) -> list[str]:
    if task == "qnli":  # the shared QNLI training data is a JSON subset: the generic task reads it
        folder = data_dir / "QNLI" / "train_subset"
        return GENERIC_QNLI + ["--train-file", str(folder / "train.json"), "--dev-file", str(folder / "dev.json")]
    return ["--task", task, "--data-dir", str(data_dir)]


def _metric(metrics: dict) -> float:
    return metrics["accuracy"]


def run_task(task: str, seed: int, plan: dict, keeps: list[float], args) -> list[dict]:
    base = args.output / task / f"seed{seed}"
    common = ["--model", args.model, "--config", args.config, "--seed", str(seed), "--epochs", str(plan["epochs"]),
              "--max-train-examples", str(plan["train"]), "--max-eval-examples", str(plan["dev"]),
              "--attr-examples", str(plan["attr"]), *_task_flags(task, args.data_dir)]
    if not (base / "full" / "attribution.safetensors").is_file():  # a finished run is reused (an interrupted table resumes)
        _stage(common + ["--output", str(base / "full"), "--stages", "prompt,attribute"])
    full = json.loads((base / "full" / "prompt" / "metrics.json").read_text())
    full_seconds = _seconds(base / "full")
    rows = []
    for keep in keeps:
        for variant, (scorer, compensate) in VARIANTS.items():
            run = base / f"keep{keep:g}-{variant}"
            if not (run / "prompt").exists():
                shutil.copytree(base / "full" / "prompt", run / "prompt")
                if scorer == "attribution":
                    shutil.copy(base / "full" / "attribution.safetensors", run / "attribution.safetensors")
            if not (run / "retune" / "metrics.json").is_file():
                _stage(common + ["--output", str(run), "--stages", "attribute,localize,convert,retune",
                                 "--scorer", scorer, "--ffn-keep", str(keep), "--compensate", compensate])
            retune = json.loads((run / "retune" / "metrics.json").read_text())
            conversion = json.loads((run / "conversion.json").read_text())
            rows.append({"task": task, "seed": seed, "ffn_keep": keep, "variant": variant,
                         "full": _metric(full["metrics"]), "before": _metric(retune["before_retune"]),
                         "after": _metric(retune["metrics"]), "parameters_full": conversion["parameters_full"],
                         "parameters_compact": conversion["parameters_compact"],
                         "train_examples": full["train_examples"], "dev_examples": full["dev_examples"],
                         "majority": full.get("dev_majority"), "run": str(run),
                         "seconds": round(_seconds(run) + full_seconds / len(keeps) / len(VARIANTS), 1)})
    return rows


def _seconds(run: Path) -> float:
    """Wall seconds the pipeline spent on a run (its metrics.json), so a resumed table still reports its cost."""
    return sum(json.loads((run / "metrics.json").read_text()).get("stage_seconds", {}).values())


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds per (task, keep, variant)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["ffn_keep"], r["variant"]), []).append(r)
    out = []
    order = {task: i for i, task in enumerate(PLAN)}
    for (task, keep, variant), rs in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1],
                                                                          list(VARIANTS).index(kv[0][2]))):
        def stat(key):
            values = [r[key] for r in rs]
            return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
        out.append({"task": task, "ffn_keep": keep, "variant": variant, "seeds": len(rs),
                    **{f"{k}_mean": stat(k)[0] for k in ("full", "before", "after")},
                    **{f"{k}_std": stat(k)[1] for k in ("full", "before", "after")},
                    "majority": rs[0]["majority"], "parameters_full": rs[0]["parameters_full"],
                    "parameters_compact": rs[0]["parameters_compact"], "train_examples": rs[0]["train_examples"],
                    "dev_examples": rs[0]["dev_examples"]})
    return out


def speedups(keeps: list[float]) -> dict[str, float]:
    """The compact MiniLM's speed-up over the full model per FFN keep (batch 32, CPU), measured in one process."""
    from skeleton_ds.bench import BenchConfig, run_bench

    result = run_bench(BenchConfig(shape="minilm", ffn_keeps=(1.0, *keeps), batch_sizes=(32,), rounds=5, warmup=1,
                                   skip_peft=True, out=Path("runs/reproduce/bench")))
    return {f"{r['ffn_keep']:g}": r["speedup_vs_full"] for r in result["rows"] if r["contender"].startswith("compact")
            and r.get("head_keep", 1.0) == 1.0 and r.get("quant", "none") == "none" and "speedup_vs_full" in r}


def _speedup(record: dict, keep: float) -> str:
    value = record["speedups"].get(format(keep, "g"))
    return "-" if value is None else f"{value:.2f}x"


def markdown(record: dict) -> str:
    lines = [f"Skeleton on real tasks, {record['model']} ({record['date']}, {record['seconds'] / 60:.0f} min): "
             f"`{record['command']}`", "",
             "| task (train / dev examples) | majority | full model | FFN keep | variant | before re-tuning | "
             "after re-tuning | parameters | speed-up |", "|---|---|---|---|---|---|---|---|---|"]

    def pm(mean, std, seeds):
        return f"{mean:.3f}" + (f" ± {std:.3f}" if seeds > 1 else "")

    for r in record["table"]:
        learned = "" if r["majority"] is None else (" (learned)" if r["full_mean"] > r["majority"] + 0.02 else " (not learned)")
        lines.append(f"| {r['task']} ({r['train_examples']} / {r['dev_examples']}, {r['seeds']} seed(s)) | "
                     f"{'-' if r['majority'] is None else format(r['majority'], '.3f')} | "
                     f"{pm(r['full_mean'], r['full_std'], r['seeds'])}{learned} | {r['ffn_keep']:g} | {r['variant']} | "
                     f"{pm(r['before_mean'], r['before_std'], r['seeds'])} | {pm(r['after_mean'], r['after_std'], r['seeds'])} | "
                     f"{r['parameters_compact'] / 1e6:.1f}M / {r['parameters_full'] / 1e6:.1f}M | "
                     f"{_speedup(record, r['ffn_keep'])} |")
    return "\n".join(lines) + "\n"


def plot(record: dict, png: Path) -> None:
    from skeleton_ds.plots import _pyplot, _save

    plt = _pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in record["table"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in record["table"] if r["task"] == task]
        for variant in VARIANTS:
            mine = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["ffn_keep"])
            ax.errorbar([r["ffn_keep"] for r in mine], [r["after_mean"] for r in mine],
                        yerr=[r["after_std"] for r in mine], marker="o", capsize=3, label=variant)
        ax.axhline(rows[0]["full_mean"], color="black", ls="--", lw=1, label="full model")
        if rows[0]["majority"] is not None:
            ax.axhline(rows[0]["majority"], color="grey", ls=":", lw=1, label="majority class")
        ax.set_title(task)
        ax.set_xlabel("FFN keep ratio")
        ax.set_ylabel("dev accuracy after re-tuning")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    _save(plt, fig, png, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in PLAN]
    if unknown:
        raise SystemExit(f"error: unknown task(s) {', '.join(unknown)}; choose from {', '.join(PLAN)}")
    keeps = [float(k) for k in args.ffn_keeps.split(",") if k]
    start = time.perf_counter()
    measured = {} if args.quick else speedups(keeps)  # first: a benchmark failure shows in minutes, not hours
    rows = []
    for task in sorted(tasks, key=list(PLAN).index, reverse=True):  # the small tasks first
        plan = dict(PLAN[task])
        if args.quick:
            plan.update(train=64, attr=32, dev=64, epochs=1.0)
        for seed in range(args.seeds or plan["seeds"]):
            rows += run_task(task, seed, plan, keeps, args)
    record = {"command": "python launch/reproduce.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "date": date.today().isoformat(), "model": args.model, "plan": {t: PLAN[t] for t in tasks},
              "quick": args.quick, "rows": rows, "table": aggregate(rows),
              "speedups": measured, "wall_seconds": round(time.perf_counter() - start, 1)}
    record["seconds"] = round(sum(r["seconds"] for r in rows), 1)
    write_json(args.output / "reproduce.json", record)
    text = markdown(record)
    print(text)
    if not args.no_docs:
        write_json(DOCS / "reproduce.json", record)
        write_text(DOCS / "reproduce.md", text)
        plot(record, DOCS / "reproduce.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
