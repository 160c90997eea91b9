"""Load the HTTP server with a bounded closed loop: the task skeletons with batching on and off, and
plain prompt tuning (the baseline: the full base and each task's stage-1 prompt, tasks mixed in a pass);
compare the memory of each way of serving N tasks.

    python launch/load_test.py --base minilm --task-dir sst2=runs/minilm-sst2 \
        --task-dir k05=runs/serve/minilm-sst2-k0.5 --requests 400 --clients 8 --inputs-per-request 1

It starts three servers, each `launch/serve.py` on 127.0.0.1 with a free port: the skeletons with
dynamic batching, plain prompt tuning (`--mode prompt-tuning`, its passes mixing tasks), the skeletons
with `--no-batching`. It waits for each /healthz and sends one warm-up request per task (materialising
every task, so the timed loops measure serving, not loading). Then, for each client count, it loads
the servers in turn (the idle ones only wait, so all three see the same machine): `--clients` threads
each send their next request as soon as the previous one is answered, `--requests` in all, tasks taken
in turn. Reported: requests/s and examples/s over the loop's wall time, p50/p99 latency as the client
sees it, the mean batch size (examples per forward pass, from /metrics before and after the loop), and
the machine's 1-minute load average as the loop ended.

Memory, in bytes of parameters and buffers at the serving dtype:
- skeletons: what the skeleton server holds after the loop (/v1/tasks memory): the base model once,
  plus what each cached task owns (its sliced FFN/attention tensors, prompt, head, prompt key/value cache);
- plain prompt tuning: what the prompt-tuning server holds: the base model once, plus each task's
  prompt and head. This is what a prompt-tuning user runs, and the fair comparison;
- N compact checkpoints: the tensors in each task's compact `model*.safetensors` (numel from the
  headers x the serving dtype's element size), summed: N separate processes each loading its own;
- N separate full models: N x the base checkpoint's tensors, counted the same way (a process per task;
  not how prompt tuning is served, shown beside the compact checkpoints it mirrors).
Writes JSON (`--out`, with its provenance), the README's tables next to it (`.md`), and prints rich tables.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import json
import os
import shlex
import statistics
import struct
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from skeleton_ds.checkpoint import write_json, write_text  # noqa: E402
from skeleton_ds.provenance import provenance  # noqa: E402

SAMPLES = ["a gripping, funny film", "the plot was thin and the acting worse", "quite a nice story",
           "an awful, boring two hours", "the actor was great", "a sad and ugly scene", "very happy ending",
           "it was fine"]


# ------------------------------------------------------------------ the server
SKELETON, PROMPT_TUNING = "skeleton", "prompt tuning"
PLAN = [(SKELETON, "batching"), (PROMPT_TUNING, "mixed-task batching"), (SKELETON, "no batching")]
"""The servers, in the order they are loaded and tabled: (what serves, its batching). (clients, mode) names a row."""


class Server:
    """`launch/serve.py` in a subprocess on a free port of 127.0.0.1; stopped on exit."""

    def __init__(self, args: argparse.Namespace, server: str, batching: bool):
        skeleton = server == SKELETON
        command = [sys.executable, str(REPO / "launch" / "serve.py"), "--base", args.base, "--port", "0",
                   "--host", "127.0.0.1", "--device", args.device, "--dtype", args.dtype,
                   "--mode", "skeleton" if skeleton else "prompt-tuning",
                   "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
                   "--max-inputs", str(max(256, args.inputs_per_request)),
                   *(["--cache-bytes", str(args.cache_bytes)] if skeleton and args.cache_bytes is not None else []),
                   *itertools.chain.from_iterable(("--task-dir", d) for d in args.task_dir),
                   *([] if batching else ["--no-batching"])]
        env = os.environ | ({"OMP_NUM_THREADS": str(args.server_threads)} if args.server_threads else {})
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
        line = _first_line(self.process, args.start_timeout)
        if " on http://" not in line:
            self.stop()
            raise SystemExit(f"load_test: the server did not start (exit {self.process.returncode}); see above")
        self.host, port = line.split(" on http://", 1)[1].split()[0].split(":")
        self.port = int(port)
        deadline = time.monotonic() + args.start_timeout
        while get(self, "/healthz")[0] != 200:
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit("load_test: /healthz never answered 200")
            time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


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
    """Examples, forward passes and their seconds so far, summed over tasks, from the batch histograms."""
    from prometheus_client.parser import text_string_to_metric_families

    status, text = get(server, "/metrics")
    assert status == 200, "load_test: /metrics did not answer"
    names = {"skeleton_batch_size_sum": "examples", "skeleton_batch_size_count": "passes",
             "skeleton_batch_seconds_sum": "seconds"}
    totals = dict.fromkeys(names.values(), 0.0)
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if sample.name in names:
                totals[names[sample.name]] += sample.value
    return totals


# ---------------------------------------------------------------------- load
def bodies(tasks: list[dict], per_request: int) -> list[tuple[str, bytes]]:
    """One request body per task, `per_request` records filled from SAMPLES."""
    out = []
    for t in tasks:
        records = [{f: SAMPLES[(i + j) % len(SAMPLES)] for j, f in enumerate(t["fields"])} for i in range(per_request)]
        out.append((t["name"], json.dumps({"task": t["name"], "inputs": records}).encode()))
    return out


def closed_loop(server: Server, work: list[tuple[str, bytes]], requests: int, clients: int) -> dict:
    """`clients` threads, each sending its next request when the previous one is answered."""
    counter, lock = itertools.count(), threading.Lock()
    latencies: list[float] = []
    failures: list[str] = []

    def client() -> None:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=120)
        try:
            while True:
                with lock:
                    i = next(counter)
                if i >= requests:
                    return
                task, body = work[i % len(work)]
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
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"wall_s": round(wall, 3), "requests_per_s": round(requests / wall, 2), "p50_ms": round(cuts[49] * 1e3, 2),
            "p99_ms": round(cuts[98] * 1e3, 2), "failures": len(failures), "first_failures": failures[:3],
            "load_1min": round(os.getloadavg()[0], 2)}  # was the machine busy with other work too?


def warm_up(server: Server, args: argparse.Namespace) -> list[tuple[str, bytes]]:
    """One request per task, so every task is materialised before a clock starts; the loop's bodies."""
    work = bodies(json.loads(get(server, "/v1/tasks")[1])["tasks"], args.inputs_per_request)
    conn = http.client.HTTPConnection(server.host, server.port, timeout=300)
    for task, body in work:
        status, answer = request(conn, "POST", "/v1/classify", body)
        if status != 200:
            raise SystemExit(f"load_test: warm-up request for {task} failed: {status} {answer[:300]!r}")
    conn.close()
    return work


def measure(server: Server, work: list[tuple[str, bytes]], args: argparse.Namespace, clients: int) -> dict:
    """One closed loop against one server, with its forward passes from /metrics before and after."""
    before = batch_totals(server)
    result = closed_loop(server, work, args.requests, clients)
    after = batch_totals(server)
    passes, examples, seconds = (after[k] - before[k] for k in ("passes", "examples", "seconds"))
    return {"clients": clients} | result | {
        "passes": int(passes), "examples_per_s": round(args.requests * args.inputs_per_request / result["wall_s"], 2),
        "mean_batch": round(examples / passes, 2) if passes else 0.0,
        "mean_pass_ms": round(seconds / passes * 1e3, 2) if passes else 0.0,
        "worker_busy": round(seconds / result["wall_s"], 3)}


def run_plan(args: argparse.Namespace) -> tuple[list[dict], dict[str, dict]]:
    """Every server of PLAN up at once (an idle one only waits), loaded in turn at each client count, so
    all see the same machine; the rows, and each kind of server's /v1/tasks answer after its loops."""
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(Server(args, served_as, batching=mode != "no batching"))
                   for served_as, mode in PLAN]
        works = [warm_up(server, args) for server in servers]
        runs = [{"server": served_as, "mode": mode} | measure(server, work, args, clients)
                for clients in args.clients for (served_as, mode), server, work in zip(PLAN, servers, works)]
        served = {}
        for (served_as, _), server in zip(PLAN, servers):
            served.setdefault(served_as, json.loads(get(server, "/v1/tasks")[1]))
        return runs, served


# -------------------------------------------------------------------- memory
def tensor_count(files: list[Path]) -> int:
    """Parameters in safetensors files, from their headers alone (nothing is loaded)."""
    total = 0
    for f in files:
        with open(f, "rb") as handle:
            header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
        for name, entry in header.items():
            if name != "__metadata__":
                total += _prod(entry["shape"])
    return total


def _prod(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def memory_figures(args: argparse.Namespace, served: dict, prompt_tuning: dict) -> dict:
    """Bytes of each way of serving the tasks; `served` and `prompt_tuning` are the /v1/tasks answers of
    the skeleton and prompt-tuning servers."""
    from skeleton_ds import engine
    from skeleton_ds.inference import InferenceConfig

    element = InferenceConfig(device=args.device, dtype=args.dtype).torch_dtype().itemsize
    n = len(args.task_dir)
    compact_params = []
    for spec in args.task_dir:
        directory = Path(spec.partition("=")[2] if "=" in spec else spec)
        compact = directory if (directory / "manifest.json").is_file() else directory / "compact"
        files = sorted(compact.glob("model*.safetensors"))
        compact_params.append(tensor_count(files) if files else None)
    base_dir = Path(engine.resolve_model_path(args.base))
    base_files = sorted(base_dir.glob("model*.safetensors")) if base_dir.is_dir() else []
    base_params = tensor_count(base_files) if base_files else None
    memory, plain = served["memory"], prompt_tuning["memory"]
    return {"tasks": n, "bytes_per_parameter": element,
            "shared_bytes": memory["shared_bytes"] + sum(memory["tasks"].values()),
            "shared_base_bytes": memory["shared_bytes"], "task_owned_bytes": memory["tasks"],
            "tasks_resident": sum(1 for v in memory["tasks"].values() if v),
            "prompt_tuning_bytes": plain["shared_bytes"] + sum(plain["tasks"].values()),
            "prompt_tuning_base_bytes": plain["shared_bytes"], "prompt_tuning_task_bytes": plain["tasks"],
            "compact_checkpoints_bytes": None if None in compact_params else sum(compact_params) * element,
            "separate_full_models_bytes": None if base_params is None else n * base_params * element}


# ---------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the shared base model (local directory, Hub id, or 'minilm')")
    p.add_argument("--task-dir", action="append", required=True, metavar="[NAME=]DIR", help="repeat for each task")
    p.add_argument("--requests", type=int, default=400, help="requests per mode, in all")
    p.add_argument("--clients", type=lambda v: [int(c) for c in v.split(",") if c.strip()], default=[8],
                   help="concurrent closed-loop clients; a comma list runs the loop once per count (e.g. 32,8)")
    p.add_argument("--inputs-per-request", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "load_test" / "load_test.json")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--cache-bytes", type=int, default=None, help="the server's --cache-bytes (default: its own)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--start-timeout", type=float, default=300, help="seconds to wait for the server to answer")
    p.add_argument("--server-threads", type=int, default=None,
                   help="the servers' torch threads (OMP_NUM_THREADS; default torch's own). On a machine other jobs "
                        "share, 1 avoids OpenMP threads spin-waiting for each other, which can make a pass 10x slower")
    args = p.parse_args(argv)
    if not args.clients or min(args.requests, *args.clients, args.inputs_per_request) < 1:
        p.error("--requests, --clients and --inputs-per-request must be positive")
    if args.server_threads is not None and args.server_threads < 1:
        p.error("--server-threads must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "launch/load_test.py", *(sys.argv[1:] if argv is None else argv)])
    runs, served = run_plan(args)
    report = {"command": command, "provenance": provenance(command),
              "date": date.today().isoformat(), "base": args.base, "task_dirs": args.task_dir,
              "requests": args.requests, "clients": args.clients, "inputs_per_request": args.inputs_per_request,
              "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "server_threads": args.server_threads,
              "runs": runs,
              "memory": memory_figures(args, served[SKELETON], served[PROMPT_TUNING])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, report)
    write_text(args.out.with_suffix(".md"), markdown(report))
    print_report(report, args.out)
    return 1 if any(r["failures"] for r in runs) else 0


def markdown(report: dict) -> str:
    """The README's tables: throughput and latency per client count, server and batching, then memory."""
    m = report["memory"]
    lines = [f"{len(report['task_dirs'])} tasks on {report['base']}, {report['requests']} requests of "
             f"{report['inputs_per_request']} input(s) per loop ({report['date']}): `{report['command']}`", "",
             "| clients | server | batching | requests/s | p50 ms | p99 ms | mean batch | forward passes | ms per pass "
             "| machine load |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['clients']} | {_served_as(r['server'])} | {r['mode']} | {r['requests_per_s']:.1f} | "
              f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['mean_batch']:.2f} | {r['passes']} | {r['mean_pass_ms']:.1f} | "
              f"{r['load_1min']:.1f} |" for r in report["runs"]]
    owned = sorted(v for v in m["task_owned_bytes"].values() if v)
    prompts = sorted(m["prompt_tuning_task_bytes"].values())
    cores = report["provenance"]["device"]["cpu_cores"]
    threads = f"; the servers ran {report['server_threads']} torch thread(s) each" if report.get("server_threads") else ""
    lines += ["", f"Machine load: the 1-minute load average as each loop ended, on {cores} cores (the client threads "
                  f"and the servers share them{threads}).",
              "", f"Memory for the {m['tasks']} tasks ({m['bytes_per_parameter']} bytes per parameter; parameter and "
                  "buffer bytes):", "", "| how the tasks are served | MiB |", "|---|---|",
              f"| plain prompt tuning: one base ({_mib(m['prompt_tuning_base_bytes'])}) + each task's prompt and head "
              f"({', '.join(_mib(v) for v in prompts)}) | {_mib(m['prompt_tuning_bytes'])} |",
              f"| skeletons: one shared base ({_mib(m['shared_base_bytes'])}) + what each task owns "
              f"({', '.join(_mib(v) for v in owned)}: its sliced FFN, prompt, head) | {_mib(m['shared_bytes'])} |",
              f"| {m['tasks']} separate compact checkpoints (a process each, each with its own embeddings, attention, "
              f"norms) | {_mib(m['compact_checkpoints_bytes'])} |",
              f"| {m['tasks']} separate full models (a process each; not how prompt tuning is served) | "
              f"{_mib(m['separate_full_models_bytes'])} |"]
    return "\n".join(lines) + "\n"


def _served_as(server: str) -> str:
    return {SKELETON: "skeletons", PROMPT_TUNING: "plain prompt tuning"}[server]


def print_report(report: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(report['task_dirs'])} tasks on {report['base']}: {report['requests']} requests, "
                        f"{','.join(map(str, report['clients']))} clients, {report['inputs_per_request']} inputs each")
    for column in ("clients", "server", "batching", "requests/s", "examples/s", "p50 ms", "p99 ms", "mean batch",
                   "passes", "ms/pass", "worker busy", "failures"):
        table.add_column(column, justify="left" if column in ("server", "batching") else "right")
    for r in report["runs"]:
        table.add_row(str(r["clients"]), _served_as(r["server"]), r["mode"], f"{r['requests_per_s']:.1f}",
                      f"{r['examples_per_s']:.1f}", f"{r['p50_ms']:.1f}",
                      f"{r['p99_ms']:.1f}", f"{r['mean_batch']:.2f}", str(r["passes"]), f"{r['mean_pass_ms']:.1f}",
                      f"{r['worker_busy']:.0%}", str(r["failures"]))
    m = report["memory"]
    memory = Table(title=f"memory for {m['tasks']} tasks ({m['bytes_per_parameter']} bytes per parameter)")
    memory.add_column("how")
    memory.add_column("MiB", justify="right")
    memory.add_row("plain prompt tuning: one base + each task's prompt and head", _mib(m["prompt_tuning_bytes"]))
    memory.add_row(f"skeletons: shared base + task-owned tensors ({m['tasks_resident']} resident)", _mib(m["shared_bytes"]))
    memory.add_row(f"{m['tasks']} separate compact checkpoints", _mib(m["compact_checkpoints_bytes"]))
    memory.add_row(f"{m['tasks']} separate full models", _mib(m["separate_full_models_bytes"]))
    console = Console()
    if not console.is_terminal:  # a log file: wide enough for the columns, not rich's 80
        console = Console(width=140)
    console.print(table)
    console.print(memory)
    console.print(f"load_test: {out}")


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.2f}"


if __name__ == "__main__":
    sys.exit(main())
