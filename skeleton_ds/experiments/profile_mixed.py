"""Where a cross-task pass spends its time, in one process: the same rows served as one mixed pass over the
skeletons, as one pass per task over the same skeletons, and as one mixed pass of plain prompt tuning over
the full base; then the operators of the mixed pass (torch.profiler).

    python -m skeleton_ds.experiments.profile_mixed --base minilm --task-list runs/serving/minilm/tasks-64.txt \
        --rows 16 \
        --output docs/results/profile_mixed_minilm64.json

The rows are drawn with Zipf popularity (s = 1.1) over the tasks, one input each, as the load test sends them;
`--batches` draws, each timed `--rounds` times after a warm-up, at `--threads` torch threads. Writes JSON (with
its provenance) and markdown.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import date
from pathlib import Path

import torch

from skeleton_ds.tables import markdown_table
from skeleton_ds.serving.baselines import PromptTuningModel
from skeleton_ds.checkpoint import write_report
from skeleton_ds.experiments import CHECKOUT, command_line
from skeleton_ds.experiments.load_test import task_dirs
from skeleton_ds.experiments.loadgen import SAMPLES, draws
from skeleton_ds.inference import InferenceConfig
from skeleton_ds.serving.multitask import MultiTaskModel
from skeleton_ds.provenance import provenance
from skeleton_ds.tasks import Example

WAYS = ("skeletons, one mixed pass", "skeletons, one pass per task", "plain prompt tuning, one mixed pass")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True)
    p.add_argument("--task-dir", action="append", default=[], metavar="[NAME=]DIR")
    p.add_argument("--task-list", type=Path, default=None)
    p.add_argument("--rows", type=int, default=16, help="rows per batch (the load test's mean batch at 32 clients)")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--output", "--out", type=Path, default=CHECKOUT / "runs" / "profile_mixed.json", metavar="FILE",
                   help="the JSON record; its table goes beside it as .md (--out: deprecated alias)")
    args = p.parse_args(argv)
    command = command_line("profile_mixed", argv)
    torch.set_num_threads(args.threads)
    dirs = task_dirs(args)
    cfg = InferenceConfig(device="cpu", dtype="fp32", batch_size=max(32, args.rows))
    skeletons = MultiTaskModel(args.base, dirs, cfg=cfg, mix_tasks=True)
    plain = PromptTuningModel(args.base, dirs, cfg=cfg)
    names = skeletons.task_names()

    def row(name: str, i: int) -> tuple[str, Example]:
        fields = skeletons.tasks[name].task.fields
        return name, Example(tuple(SAMPLES[(i + j) % len(SAMPLES)] for j in range(len(fields))), -1)

    batches = [[row(names[k], i) for i, k in enumerate(draws(len(names), "zipf", args.rows, seed))]
               for seed in range(args.batches)]

    def per_task(tagged):
        groups: dict[str, list] = {}
        for name, example in tagged:
            groups.setdefault(name, []).append(example)
        for name, examples in groups.items():
            predictor = skeletons._resident(name).predictor
            predictor.logits(predictor.encode(examples))

    ways = dict(zip(WAYS, (skeletons.mixed_logits, per_task, plain.mixed_logits)))
    timings = {}
    with torch.inference_mode():
        for run in ways.values():
            for tagged in batches:
                run(tagged)  # warm-up: materialised, allocator primed
        for _ in range(args.rounds):  # interleaved, so all see the same machine
            for label, run in ways.items():
                start = time.perf_counter()
                for tagged in batches:
                    run(tagged)
                timings.setdefault(label, []).append((time.perf_counter() - start) / len(batches))
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for tagged in batches:
                skeletons.mixed_logits(tagged)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    operators = [{"operator": e.key, "share": round(e.self_cpu_time_total / total, 4), "calls": e.count}
                 for e in events[:8]]
    report = {"command": command, "provenance": provenance(command), "date": date.today().isoformat(),
              "base": args.base, "tasks": len(dirs), "rows": args.rows, "batches": args.batches,
              "threads": args.threads, "distinct_tasks_per_batch": round(
                  sum(len({n for n, _ in b}) for b in batches) / len(batches), 2),
              "ms_per_batch": {label: round(min(ts) * 1e3, 2) for label, ts in timings.items()},
              "mixed_pass_operators": operators}
    table = markdown(report)
    write_report(args.output, report, table)
    print(table)
    return 0


def markdown(report: dict) -> str:
    lines = [f"{report['rows']} rows of {report['tasks']} tasks on {report['base']} "
             f"(Zipf; {report['distinct_tasks_per_batch']} "
             f"distinct tasks per batch on average), {report['threads']} torch thread(s), best of the rounds "
             f"({report['date']}): `{report['command']}`", "",
             *markdown_table(["how the rows are served", "ms per batch"])]
    lines += [f"| {label} | {report['ms_per_batch'][label]:.1f} |" for label in WAYS]  # JSON sorts the keys
    lines += ["", *markdown_table(["operator in the mixed pass", "share of CPU time", "calls"])]
    lines += [f"| {o['operator']} | {o['share']:.0%} | {o['calls']} |" for o in report["mixed_pass_operators"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
