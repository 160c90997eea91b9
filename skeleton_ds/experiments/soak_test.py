"""Hold one server at twice its measured capacity for minutes: nothing lost, nothing answered twice, memory
flat, and every request answered or refused (503 queue full, 504 past its deadline).

    python -m skeleton_ds.experiments.soak_test --base minilm --task-list runs/serving/minilm/tasks-64.txt \
        --seconds 600 \
        --output docs/results/soak_minilm64.json

It starts `skeleton-ds serve` (skeletons, cross-task batching, `--max-queue`, `--timeout-ms`) on 127.0.0.1,
warms every task, measures the capacity with a closed loop (`--capacity-clients` clients, Zipf popularity),
then sends requests at `--overload` x that rate for `--seconds` from independent senders (an open loop:
Poisson arrivals, whatever the answers), sampling the server's resident memory every 10 s. Checked: every
request sent got exactly one answer (the client's count per status equals the server's /metrics count),
each answer is 200, 503 or 504, the resident memory after the first minute grows by less than 10%, and the
server answers a request and /healthz normally afterwards. Writes JSON (with provenance) and markdown.
"""

from __future__ import annotations

import argparse
import http.client
import sys
from datetime import date
from pathlib import Path

from skeleton_ds.tables import markdown_table
from skeleton_ds.checkpoint import write_report
from skeleton_ds.experiments import CHECKOUT, command_line
from skeleton_ds.experiments.load_test import task_dirs
from skeleton_ds.experiments.loadgen import Server, Serving, closed_loop, draws, get, open_loop, request, warm_up
from skeleton_ds.provenance import provenance

ALLOWED = {"200", "503", "504"}


def server_counts(server: Server) -> dict[str, int]:
    """Classify requests the server counted, by status (its Prometheus counter)."""
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[str, int] = {}
    for family in text_string_to_metric_families(get(server, "/metrics")[1].decode()):
        for sample in family.samples:
            if sample.name == "skeleton_requests_total":
                counts[sample.labels["status"]] = counts.get(sample.labels["status"], 0) + int(sample.value)
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True)
    p.add_argument("--task-dir", action="append", default=[], metavar="[NAME=]DIR")
    p.add_argument("--task-list", type=Path, default=None)
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--overload", type=float, default=2.0, help="offered rate as a multiple of the measured capacity")
    p.add_argument("--capacity-clients", type=int, default=32)
    p.add_argument("--capacity-requests", type=int, default=600)
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--timeout-ms", type=float, default=2000)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--senders", type=int, default=512, help="client threads of the open loop")
    p.add_argument("--server-threads", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", "--out", type=Path, default=CHECKOUT / "runs" / "soak" / "soak.json", metavar="FILE",
                   help="the JSON record; its summary goes beside it as .md (--out: deprecated alias)")
    args = p.parse_args(argv)
    dirs = task_dirs(args)
    command = command_line("soak_test", argv)
    serving = Serving("skeleton", "cross-task")
    extra = ["--device", args.device, "--dtype", args.dtype, "--max-batch", str(args.max_batch),
             "--max-queue", str(args.max_queue), "--timeout-ms", str(args.timeout_ms),
             "--max-inputs", str(min(256, args.max_queue or 256))]  # a request must fit in the queue
    with Server(serving, args.base, dirs, extra=extra, threads=args.server_threads) as server:
        work = warm_up(server, 1)
        capacity = closed_loop(server, work, draws(len(dirs), "zipf", args.capacity_requests, args.seed),
                               args.capacity_clients)
        rate = args.overload * capacity["requests_per_s"]
        before = server_counts(server)
        samples: list[tuple[float, int]] = []

        def tick(seconds: float) -> None:
            if not samples or seconds - samples[-1][0] >= 10:
                samples.append((round(seconds, 1), server.rss_bytes()))

        order = draws(len(dirs), "zipf", int(rate * args.seconds), args.seed + 1)
        soak = open_loop(server, work, order, rate, senders=args.senders, on_tick=tick)
        samples.append((soak["wall_s"], server.rss_bytes()))
        after = server_counts(server)
        counted = {status: after.get(status, 0) - before.get(status, 0) for status in after}
        conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
        status, _ = request(conn, "POST", "/v1/classify", work[0][1])
        conn.close()
        healthy = get(server, "/healthz")[0] == 200 and status == 200
    settled = [rss for t, rss in samples if t >= 60] or [samples[-1][1]]
    growth = settled[-1] / settled[0] - 1
    checks = {"nothing_lost": soak["lost"] == 0 and soak["answered"] == soak["sent"],
              "answered_once": {k: v for k, v in counted.items() if v} == {k: v for k, v in soak["statuses"].items()},
              "only_200_503_504": set(soak["statuses"]) <= ALLOWED,
              "memory_flat": growth < 0.10, "healthy_after": healthy}
    report = {"command": command, "provenance": provenance(command), "date": date.today().isoformat(),
              "base": args.base, "tasks": len(dirs), "seconds": args.seconds, "overload": args.overload,
              "max_queue": args.max_queue, "timeout_ms": args.timeout_ms, "max_batch": args.max_batch,
              "capacity": capacity, "offered_per_s": round(rate, 2), "soak": soak, "server_counted": counted,
              "rss_samples": samples, "rss_growth_after_first_minute": round(growth, 4), "checks": checks}
    table = markdown(report)
    write_report(args.output, report, table)
    print(table)
    return 0 if all(checks.values()) else 1


def markdown(report: dict) -> str:
    soak, statuses = report["soak"], report["soak"]["statuses"]
    rss = [r for _, r in report["rss_samples"]]
    checks = ("all pass" if all(report["checks"].values())
              else ", ".join(k for k, v in report["checks"].items() if not v) + " FAILED")
    lines = [f"Soak: {report['tasks']} tasks on {report['base']}, {report['seconds'] / 60:g} min at "
             f"{report['overload']:g}x the measured capacity ({report['date']}): `{report['command']}`", "",
             *markdown_table(["capacity (closed loop)", "offered", "sent", "200", "503", "504", "lost",
                              "p99 of 200s ms", "resident MiB (min / max / last)", "checks"]),
             f"| {report['capacity']['requests_per_s']:.1f}/s | {soak['offered_per_s']:.1f}/s | {soak['sent']} | "
             f"{statuses.get('200', 0)} | {statuses.get('503', 0)} | {statuses.get('504', 0)} | {soak['lost']} | "
             f"{soak.get('p99_ms', 0):.0f} | {min(rss) / 2**20:.0f} / {max(rss) / 2**20:.0f} / {rss[-1] / 2**20:.0f} | "
             f"{checks} |"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
