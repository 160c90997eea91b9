"""Load the HTTP server with a bounded closed loop, four ways of serving the same N tasks, on one machine.

    python -m skeleton_ds.experiments.load_test --base minilm --task-list runs/serving/minilm-64.txt --requests 600 \
        --clients 8,32,64 --popularity zipf,uniform --output docs/results/load_test_minilm64.json

The ways (`--servings`; each `skeleton-ds serve` on 127.0.0.1, all started at once, loaded in turn so all see
the same machine, the idle ones only waiting):
- skeletons, cross-task: one shared base, a pass mixes tasks (the default server);
- skeletons, per-task: the same server, one task per pass (tasks take turns);
- plain prompt tuning, cross-task: the full base and each task's stage-1 prompt (what a prompt-tuning user runs);
- separate compact models, per-task: each task's compact checkpoint loaded on its own, nothing shared.
Each server gets one warm-up request per task (every task materialised before a clock starts). Then, per
popularity (uniform, or Zipf with s = 1.1 over the tasks in the order given) and client count, `--clients`
threads each send their next request as soon as the previous one is answered, `--requests` in all, the
tasks drawn from the popularity with one seed, so every server answers the same sequence; before it,
untimed, `--warmup-requests` more under the same load (another draw), so a server that adapts to its load
(the mix rule of cross-task batching) is timed in its steady state, as a long-running server would be, not
while it learns. Reported per
row: requests/s over the loop's wall time, p50/p99 latency as the client sees it, the mean examples per
forward pass and the mean pass time (from /metrics before and after), and the 1-minute load average as the
loop ended (was the machine shared?). Memory per server: the model bytes it holds (parameters and buffers:
the shared base counted once, plus what each task owns) and the process's resident memory (VmRSS).
Writes JSON (`--output`, with its provenance), its tables next to it (`.md`), and prints them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from datetime import date
from pathlib import Path

from skeleton_ds.tables import markdown_table
from skeleton_ds.checkpoint import write_report
from skeleton_ds.experiments import CHECKOUT, command_line
from skeleton_ds.experiments.loadgen import Server, Serving, batch_totals, closed_loop, draws, get, warm_up
from skeleton_ds.provenance import provenance

SERVINGS = {"cross-task": Serving("skeleton", "cross-task"), "per-task": Serving("skeleton", "per-task"),
            "prompt-tuning": Serving("prompt-tuning", "cross-task"), "compact": Serving("compact", "per-task"),
            "always-mixed": Serving("skeleton", "cross-task", mix_min=0, mix_by="count"),
            "count-mixed": Serving("skeleton", "cross-task", mix_by="count")}
"""Ways of serving --servings picks from (default: the first four). For comparing the rules of when to mix:
always-mixed mixes tasks however few examples wait (--mix-min 0 --mix-by count); count-mixed mixes whenever
--mix-min wait (--mix-by count), the default cost rule only while mixing measures cheaper."""


def task_dirs(args: argparse.Namespace) -> list[str]:
    """--task-dir values, then the lines of --task-list (one [NAME=]DIR each; # starts a comment)."""
    dirs = list(args.task_dir)
    if args.task_list:
        dirs += [line.split("#")[0].strip() for line in args.task_list.read_text().splitlines()
                 if line.split("#")[0].strip()]
    if not dirs:
        raise SystemExit("load_test: give the tasks: --task-dir [NAME=]DIR (repeat) or --task-list FILE")
    return dirs


def measure(server: Server, work: list, order: list[int], clients: int, per_request: int) -> dict:
    """One closed loop against one server, with its forward passes from /metrics before and after."""
    before = batch_totals(server)
    result = closed_loop(server, work, order, clients)
    after = batch_totals(server)
    passes, examples, seconds = (after[k] - before[k] for k in ("passes", "examples", "seconds"))
    mixed, probes = (int(after[k] - before[k]) for k in ("mixed_passes", "mix_probes"))
    return result | {"passes": int(passes), "mixed_passes": mixed, "mix_probes": probes,
                     "examples_per_s": round(len(order) * per_request / result["wall_s"], 2),
                     "mean_batch": round(examples / passes, 2) if passes else 0.0,
                     "mean_pass_ms": round(seconds / passes * 1e3, 2) if passes else 0.0,
                     "worker_busy": round(seconds / result["wall_s"], 3)}


def run(args: argparse.Namespace, dirs: list[str]) -> tuple[list[dict], dict[str, dict]]:
    servings = [SERVINGS[name] for name in args.servings]
    extra = ["--device", args.device, "--dtype", args.dtype, "--max-batch", str(args.max_batch),
             "--max-wait-ms", str(args.max_wait_ms), "--max-inputs", str(max(256, args.inputs_per_request)),
             "--max-queue", "0", "--timeout-ms", "600000"]  # a closed loop never overloads: measure, never refuse
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(Server(s, args.base, dirs, extra=extra, threads=args.server_threads))
                   for s in servings]
        works = [warm_up(server, args.inputs_per_request) for server in servers]
        rows = []
        for kind in args.popularity:
            order = draws(len(dirs), kind, args.requests, args.seed)
            warmup = draws(len(dirs), kind, args.warmup_requests, args.seed + 1) if args.warmup_requests else []
            for clients in args.clients:
                for serving, server, work in zip(servings, servers, works):
                    row = {"popularity": kind, "clients": clients, "mode": serving.mode, "batching": serving.batching,
                           "serving": serving.label}
                    if warmup:
                        closed_loop(server, work, warmup, clients)
                    rows.append(row | measure(server, work, order, clients, args.inputs_per_request))
                    last = rows[-1]
                    print(f"load_test: {kind} {clients} clients, {serving.label}: {last['requests_per_s']} req/s, "
                          f"p99 {last['p99_ms']} ms, batch {last['mean_batch']}, mixed passes {last['mixed_passes']} "
                          f"of {last['passes']}, probes {last['mix_probes']}", flush=True)
        memory = {}
        for serving, server in zip(servings, servers):
            held = json.loads(get(server, "/v1/tasks")[1])["memory"]
            memory[serving.label] = {"model_bytes": held["shared_bytes"] + sum(held["tasks"].values()),
                                     "shared_bytes": held["shared_bytes"], "task_bytes": held["tasks"],
                                     "rss_bytes": server.rss_bytes()}
        return rows, memory


def targets(rows: list[dict]) -> dict | None:
    """At Zipf load and 32 clients: cross-task against per-task batching and against plain prompt tuning."""
    cell = {r["serving"]: r for r in rows if r["popularity"] == "zipf" and r["clients"] == 32}
    mine = cell.get(SERVINGS["cross-task"].label)
    if mine is None:
        return None
    out = {}
    for name, goal in (("per-task", 2.0), ("prompt-tuning", 1.3)):
        other = cell.get(SERVINGS[name].label)
        if other is not None:
            ratio = mine["requests_per_s"] / other["requests_per_s"]
            out[name] = {"requests_per_s_ratio": round(ratio, 2), "goal": goal, "met": ratio >= goal
                         and mine["p99_ms"] < other["p99_ms"], "p99_ms": [mine["p99_ms"], other["p99_ms"]]}
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the shared base model (local directory, Hub id, or an alias)")
    p.add_argument("--task-dir", action="append", default=[], metavar="[NAME=]DIR", help="repeat for each task")
    p.add_argument("--task-list", type=Path, default=None, help="a file of [NAME=]DIR lines (many tasks)")
    p.add_argument("--servings", type=lambda v: [s for s in v.split(",") if s], default=list(SERVINGS)[:4],
                   help=f"comma list of {','.join(SERVINGS)}")
    p.add_argument("--requests", type=int, default=400, help="requests per loop")
    p.add_argument("--clients", type=lambda v: [int(c) for c in v.split(",") if c.strip()], default=[8, 32],
                   help="concurrent closed-loop clients; a comma list runs the loop once per count")
    p.add_argument("--popularity", type=lambda v: [s for s in v.split(",") if s], default=["zipf", "uniform"],
                   help="task popularity: zipf (s = 1.1), uniform; a comma list runs each")
    p.add_argument("--warmup-requests", type=int, default=0, metavar="N",
                   help="per loop, N untimed requests under the same load first (default 0)")
    p.add_argument("--seed", type=int, default=0, help="the task draws' seed")
    p.add_argument("--inputs-per-request", type=int, default=1)
    p.add_argument("--output", "--out", type=Path, default=CHECKOUT / "runs" / "load_test" / "load_test.json",
                   metavar="FILE", help="the JSON record; its tables go beside it as .md (--out: deprecated alias)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--server-threads", type=int, default=None,
                   help="the servers' torch threads (OMP_NUM_THREADS; default torch's own). On a machine other jobs "
                        "share, 1 avoids OpenMP threads spin-waiting for each other, which can make a pass 10x slower")
    args = p.parse_args(argv)
    if not args.clients or min(args.requests, *args.clients, args.inputs_per_request) < 1:
        p.error("--requests, --clients and --inputs-per-request must be positive")
    if args.warmup_requests < 0:
        p.error("--warmup-requests must be 0 or more")
    if unknown := [s for s in args.servings if s not in SERVINGS] + [k for k in args.popularity
                                                                       if k not in ("zipf", "uniform")]:
        p.error(f"unknown serving or popularity: {', '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dirs = task_dirs(args)
    command = command_line("load_test", argv)
    rows, memory = run(args, dirs)
    report = {"command": command, "provenance": provenance(command), "date": date.today().isoformat(),
              "base": args.base, "tasks": len(dirs), "task_dirs": dirs, "requests": args.requests,
              "warmup_requests": args.warmup_requests,
              "clients": args.clients, "popularity": args.popularity, "inputs_per_request": args.inputs_per_request,
              "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "server_threads": args.server_threads,
              "runs": rows, "memory": memory, "targets": targets(rows)}
    table = markdown(report)
    write_report(args.output, report, table)
    print(table)
    return 1 if any(r["failures"] for r in rows) else 0


def markdown(report: dict) -> str:
    """The serving guide's tables: throughput and latency per popularity, client count and serving; then memory."""
    warmup = f", after {report['warmup_requests']} untimed" if report.get("warmup_requests") else ""
    lines = [f"{report['tasks']} tasks on {report['base']}, {report['requests']} requests of "
             f"{report['inputs_per_request']} input(s) per loop{warmup} ({report['date']}): `{report['command']}`", "",
             *markdown_table(["popularity", "clients", "serving", "requests/s", "p50 ms", "p99 ms", "mean batch",
                              "ms per pass", "machine load"])]
    lines += [f"| {r['popularity']} | {r['clients']} | {r['serving']} | {r['requests_per_s']:.1f} | "
              f"{r['p50_ms']:.1f} | "
              f"{r['p99_ms']:.1f} | {r['mean_batch']:.2f} | {r['mean_pass_ms']:.1f} | {r['load_1min']:.1f} |"
              for r in report["runs"]]
    lines += ["", *markdown_table(["serving", "model MiB (shared + per task)", "process resident MiB"])]
    order = [s.label for s in SERVINGS.values()]  # JSON sorts the keys: table them in serving order
    memory = sorted(report["memory"].items(), key=lambda kv: order.index(kv[0]))
    lines += [f"| {label} | {_mib(m['model_bytes'])} ({_mib(m['shared_bytes'])} + {len(m['task_bytes'])} tasks) | "
              f"{_mib(m['rss_bytes'])} |" for label, m in memory]
    return "\n".join(lines) + "\n"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


if __name__ == "__main__":
    sys.exit(main())
