"""Why the server's passes were slower than the same passes run alone: the thread that runs them.

    python -m skeleton_ds.experiments.profile_server --base minilm --task-list runs/serving/minilm/tasks-64.txt \\
        --output docs/results/profile_server.json

The same one-task passes (Zipf over the tasks, `--rows` rows each, the load test's mean batch at 32
clients) are timed three ways in one process, interleaved over `--rounds`:
- on the main thread, which loaded the model (what `skeleton-ds serve` does now: `server.run`);
- on a fresh thread, the model loaded by the main thread (what the server did before: the batcher's own
  thread);
- on a fresh thread of a child process that loads the model on that thread too, its main thread idle.
libgomp keeps a pool of OpenMP threads per thread that starts a parallel region. The second way has two
pools on the same cores, so libgomp counts more threads than CPUs and spins only briefly before it puts a
worker to sleep, and each small operator pays a wake-up; the third way has one pool again, so a thread as
such costs nothing. The native
profile that found it: `py-spy record --native --threads -p PID` on a loaded server. Writes JSON (with its
provenance) and markdown.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

import torch

from skeleton_ds.tables import markdown_table
from skeleton_ds.checkpoint import write_report
from skeleton_ds.experiments import CHECKOUT, command_line
from skeleton_ds.experiments.load_test import task_dirs
from skeleton_ds.experiments.loadgen import SAMPLES, draws
from skeleton_ds.inference import InferenceConfig
from skeleton_ds.serving.multitask import MultiTaskModel
from skeleton_ds.provenance import provenance
from skeleton_ds.tasks import Example

WAYS = ("main thread (loaded the model)", "fresh thread, model loaded by the main thread",
        "fresh thread, in a process whose main thread runs no operator")


def passes(model: MultiTaskModel, count: int, rows: int) -> list[tuple[str, list[Example]]]:
    names = model.task_names()
    def example(name: str, i: int) -> Example:
        return Example(tuple(SAMPLES[(i + j) % len(SAMPLES)] for j in range(len(model.tasks[name].task.fields))), -1)

    return [(names[k], [example(names[k], i + r) for r in range(rows)])
            for i, k in enumerate(draws(len(names), "zipf", count, 0))]


def timed(model: MultiTaskModel, work: list) -> float:
    """Median ms per pass."""
    seconds = []
    for name, examples in work:
        start = time.perf_counter()
        model.predict(name, examples)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds) * 1e3


def on_thread(function, *args):
    out, failed = [], []

    def call() -> None:
        try:
            out.append(function(*args))
        except BaseException as e:  # re-raised on the caller's thread
            failed.append(e)

    thread = threading.Thread(target=call)
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return out[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True)
    p.add_argument("--task-dir", action="append", default=[], metavar="[NAME=]DIR")
    p.add_argument("--task-list", type=Path, default=None)
    p.add_argument("--rows", type=int, default=2, help="rows per pass (the per-task load test's mean batch)")
    p.add_argument("--passes", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--output", type=Path, default=CHECKOUT / "runs" / "profile_server.json", metavar="FILE")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # the third way's process
    args = p.parse_args(argv)
    command = command_line("profile_server", argv)
    dirs = task_dirs(args)
    cfg = InferenceConfig(device="cpu", dtype="fp32", batch_size=32)

    def loaded() -> tuple[MultiTaskModel, list]:
        model = MultiTaskModel(args.base, dirs, cfg=cfg, mix_tasks=False)
        return model, passes(model, args.passes, args.rows)

    if args.child:  # everything on one fresh thread; the median on stdout
        model, work = on_thread(loaded)
        on_thread(timed, model, work)  # warm-up
        print(json.dumps(on_thread(timed, model, work)))
        return 0
    child = [sys.executable, __file__, "--child", *(sys.argv[1:] if argv is None else argv)]
    model, work = loaded()
    timed(model, work), on_thread(timed, model, work)  # warm-up: allocator, caches
    timings: dict[str, list[float]] = {way: [] for way in WAYS}
    for _ in range(args.rounds):  # interleaved, so every way sees the same machine
        timings[WAYS[0]].append(timed(model, work))
        timings[WAYS[1]].append(on_thread(timed, model, work))
        out = subprocess.run(child, capture_output=True, text=True, check=True).stdout
        timings[WAYS[2]].append(float(out.strip().splitlines()[-1]))
    best = {way: round(min(ms), 2) for way, ms in timings.items()}
    report = {"command": command, "provenance": provenance(command), "date": date.today().isoformat(),
              "base": args.base, "tasks": len(dirs), "rows": args.rows, "passes": args.passes,
              "rounds": args.rounds, "torch_threads": torch.get_num_threads(), "median_ms_per_pass": best,
              "fresh_thread_over_main": round(best[WAYS[1]] / best[WAYS[0]], 2)}
    table = markdown(report)
    write_report(args.output, report, table)
    print(table)
    return 0


def markdown(report: dict) -> str:
    lines = [f"One-task skeleton passes of {report['rows']} rows over {report['tasks']} tasks on {report['base']} "
             f"(Zipf, {report['passes']} passes, median per pass, best of {report['rounds']} interleaved rounds; "
             f"{report['torch_threads']} torch threads; {report['date']}): `{report['command']}`", "",
             *markdown_table(["where the passes run", "ms per pass", "vs main thread"])]
    ms = report["median_ms_per_pass"]
    lines += [f"| {way} | {ms[way]:.2f} | {ms[way] / ms[WAYS[0]]:.2f}x |" for way in WAYS]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
