"""What the load scripts share: a server in a subprocess, HTTP calls, task popularity, a closed and an open loop.

experiments.load_test compares ways of serving N tasks under closed-loop load; experiments.soak_test holds one
server at twice its capacity for minutes. Both start `skeleton-ds serve` on 127.0.0.1 and speak plain HTTP
(http.client, one connection per client thread), so what they measure is what a client sees.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass


SAMPLES = ["a gripping, funny film", "the plot was thin and the acting worse", "quite a nice story",
           "an awful, boring two hours", "the actor was great", "a sad and ugly scene", "very happy ending",
           "it was fine"]


# ------------------------------------------------------------------ the server
@dataclass(frozen=True)
class Serving:
    """One way of serving the tasks: the server's --mode and --batching."""

    mode: str  # skeleton | prompt-tuning | compact
    batching: str  # cross-task | per-task | off
    mix_min: int | None = None  # cross-task: the server's --mix-min (None: its default)
    mix_by: str | None = None  # cross-task: the server's --mix-by (None: its default)

    @property
    def label(self) -> str:
        what = {"skeleton": "skeletons", "prompt-tuning": "plain prompt tuning", "compact": "separate compact models"}
        if self.mix_min is not None:  # (the tables' label from before --mix-by, kept: always-mixed)
            mixing = f" (mixing from {self.mix_min} waiting)"
        else:
            mixing = "" if self.mix_by is None else f" (mixing by {self.mix_by})"
        return f"{what[self.mode]}, {self.batching}{mixing}"

    def flags(self) -> list[str]:
        return ["--mode", self.mode, "--batching", self.batching,
                *(() if self.mix_min is None else ("--mix-min", str(self.mix_min))),
                *(() if self.mix_by is None else ("--mix-by", self.mix_by))]


class Server:
    """`skeleton-ds serve` in a subprocess on a free port of 127.0.0.1; stopped on exit."""

    def __init__(self, serving: Serving, base: str, task_dirs: list[str], *, extra: list[str] = (),
                 threads: int | None = None, start_timeout: float = 600):
        command = [sys.executable, "-m", "skeleton_ds", "serve", "--base", base, "--port", "0",
                   "--host", "127.0.0.1", *serving.flags(), *extra,
                   *itertools.chain.from_iterable(("--task-dir", d) for d in task_dirs)]
        env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env,
                                        preexec_fn=_die_with_parent)
        line = _first_line(self.process, start_timeout)
        if " on http://" not in line:
            self.stop()
            raise SystemExit(f"loadgen: the server ({serving.label}) did not start (exit {self.process.returncode})")
        self.host, port = line.split(" on http://", 1)[1].split()[0].split(":")
        self.port = int(port)
        deadline = time.monotonic() + start_timeout
        while get(self, "/healthz")[0] != 200:
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit("loadgen: /healthz never answered 200")
            time.sleep(0.1)

    def rss_bytes(self) -> int:
        """The server process's resident memory now (VmRSS)."""
        with open(f"/proc/{self.process.pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _die_with_parent() -> None:
    """In the server's process before it starts (Linux): SIGTERM when the load generator dies, however it dies,
    so a killed measurement leaves no server running on (and loading the machine for the next one)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _first_line(process: subprocess.Popen, timeout: float) -> str:
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return lines[0] if lines else ""


def request(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
    response = conn.getresponse()
    return response.status, response.read()


def get(server: Server, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    try:
        return request(conn, "GET", path)
    except OSError:
        return 0, b""
    finally:
        conn.close()


def batch_totals(server: Server) -> dict[str, float]:
    """Examples, forward passes and their seconds so far, summed over tasks, from the batch histograms; the
    passes that mixed tasks, and how often the mix rule probed both ways (cross-task batching by cost)."""
    from prometheus_client.parser import text_string_to_metric_families

    status, text = get(server, "/metrics")
    assert status == 200, "loadgen: /metrics did not answer"
    names = {"skeleton_batch_size_sum": "examples", "skeleton_batch_size_count": "passes",
             "skeleton_batch_seconds_sum": "seconds"}
    totals = dict.fromkeys([*names.values(), "mixed_passes", "mix_probes"], 0.0)
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if sample.name in names:
                totals[names[sample.name]] += sample.value
            if sample.name == "skeleton_batch_size_count" and sample.labels.get("task") == "*":
                totals["mixed_passes"] += sample.value
            if sample.name == "skeleton_mix_probes_total":
                totals["mix_probes"] += sample.value
    return totals


def warm_up(server: Server, per_request: int) -> list[tuple[str, bytes]]:
    """One request per task, so every task is materialised before a clock starts; the loop's bodies, in the
    server's task order."""
    work = bodies(json.loads(get(server, "/v1/tasks")[1])["tasks"], per_request)
    conn = http.client.HTTPConnection(server.host, server.port, timeout=600)
    for task, body in work:
        status, answer = request(conn, "POST", "/v1/classify", body)
        if status != 200:
            raise SystemExit(f"loadgen: warm-up request for {task} failed: {status} {answer[:300]!r}")
    conn.close()
    return work


def bodies(tasks: list[dict], per_request: int) -> list[tuple[str, bytes]]:
    """One request body per task, `per_request` records filled from SAMPLES."""
    out = []
    for t in tasks:
        records = [{f: SAMPLES[(i + j) % len(SAMPLES)] for j, f in enumerate(t["fields"])} for i in range(per_request)]
        out.append((t["name"], json.dumps({"task": t["name"], "inputs": records}).encode()))
    return out


# ------------------------------------------------------------------ popularity
def popularity(tasks: int, kind: str) -> list[float]:
    """Each task's share of requests: "uniform", or "zipf" (s = 1.1: the k-th most popular task gets a share
    proportional to 1 / k^1.1, the long tail of a platform serving many tasks)."""
    if kind == "uniform":
        weights = [1.0] * tasks
    elif kind == "zipf":
        weights = [1 / (k + 1) ** 1.1 for k in range(tasks)]
    else:
        raise ValueError(f"popularity is uniform or zipf, got {kind!r}")
    total = sum(weights)
    return [w / total for w in weights]


def draws(tasks: int, kind: str, count: int, seed: int) -> list[int]:
    """`count` task indices drawn from the popularity, seeded: every server of a comparison gets the same."""
    return random.Random(seed).choices(range(tasks), weights=popularity(tasks, kind), k=count)


# ------------------------------------------------------------------ the loops
def closed_loop(server: Server, work: list[tuple[str, bytes]], order: list[int], clients: int) -> dict:
    """`clients` threads, each sending its next request (the next of `order`) when its last one is answered."""
    counter, lock = itertools.count(), threading.Lock()
    latencies: list[float] = []
    failures: list[str] = []

    def client() -> None:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=300)
        try:
            while True:
                with lock:
                    i = next(counter)
                if i >= len(order):
                    return
                task, body = work[order[i]]
                start = time.perf_counter()
                status, answer = request(conn, "POST", "/v1/classify", body)
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    if status != 200:
                        failures.append(f"{task}: {status} {answer[:200]!r}")
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"wall_s": round(wall, 3), "requests_per_s": round(len(order) / wall, 2), **percentiles(latencies),
            "failures": len(failures), "first_failures": failures[:3], "load_1min": round(os.getloadavg()[0], 2)}


def percentiles(latencies: list[float]) -> dict:
    cuts = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {"p50_ms": round(cuts[49] * 1e3, 2), "p99_ms": round(cuts[98] * 1e3, 2)}


def open_loop(server: Server, work: list[tuple[str, bytes]], order: list[int], rate: float, *, senders: int = 256,
              on_tick=None) -> dict:
    """Requests at `rate` per second (Poisson arrivals, seeded by `order`'s length), whatever the answers: what a
    server sees from many independent clients. Each request is sent once, by one of `senders` threads, and its
    one answer counted by status; a request that got no answer (a connection error, a client timeout) is lost.
    `on_tick(seconds)` is called about once a second from the scheduler."""
    gaps = random.Random(len(order)).expovariate
    schedule, at = [], 0.0
    for _ in order:
        at += gaps(rate)
        schedule.append(at)
    lock, cursor = threading.Lock(), itertools.count()
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    lost: list[str] = []
    late: list[float] = []
    start = time.perf_counter()

    def sender() -> None:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=120)
        while True:
            with lock:
                i = next(cursor)
            if i >= len(order):
                break
            wait = start + schedule[i] - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            else:
                late.append(-wait)
            task, body = work[order[i]]
            sent = time.perf_counter()
            try:
                status, _ = request(conn, "POST", "/v1/classify", body)
            except OSError as e:  # no answer: lost
                with lock:
                    lost.append(f"{task}: {type(e).__name__}")
                conn.close()
                conn = http.client.HTTPConnection(server.host, server.port, timeout=120)
                continue
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    latencies.append(time.perf_counter() - sent)
        conn.close()

    threads = [threading.Thread(target=sender, daemon=True) for _ in range(senders)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        if on_tick is not None:
            on_tick(time.perf_counter() - start)
        for t in threads:
            t.join(timeout=1.0 / len(threads))
    wall = time.perf_counter() - start
    answered = sum(statuses.values())
    return {"sent": len(order), "answered": answered, "lost": len(lost), "first_lost": lost[:3],
            "statuses": {str(k): v for k, v in sorted(statuses.items())}, "wall_s": round(wall, 1),
            "offered_per_s": round(len(order) / schedule[-1], 2),
            "answered_200_per_s": round(statuses.get(200, 0) / wall, 2),
            **(percentiles(latencies) if latencies else {}),
            "late_sends": len(late),
            "p99_late_ms": round(sorted(late)[int(0.99 * (len(late) - 1))] * 1e3, 1) if late else 0.0}
