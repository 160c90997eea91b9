"""The HTTP server: a real uvicorn server on 127.0.0.1 (a background thread, a free port) in front of a
real MultiTaskModel with two tiny-LLaMA task skeletons, asked over real HTTP. Concurrent mixed-task
requests answer what sequential ones do, and really are merged; every bad request gets its 4xx and a
JSON error while the server goes on serving; /metrics, /v1/tasks and /healthz answer. The batcher's
policy (merging, round-robin between tasks, no batching, failures) is tested on its own, without HTTP.
Plain prompt tuning (`--mode prompt-tuning`), the baseline, is served the same way: its passes mix the
two tasks and answer what each task's requests answer alone; a load-test smoke run records both."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO, run_stages
from skeleton_ds.cli import run_command, serve
from skeleton_ds.inference import InferenceConfig
from skeleton_ds.serving.baselines import PromptTuningModel
from skeleton_ds.serving.multitask import MultiTaskModel
from skeleton_ds.provenance import missing_fields
from skeleton_ds.errors import UserError
from skeleton_ds.serving.server import Batcher, Expired, ServeSettings, address, bind, create_app
from skeleton_ds.tasks import Example

TEXTS = ["the movie was good", "an awful plot", "quite a nice story", "the actor was bad", "it was fine",
         "a sad ugly film", "very happy scene", "the story was poor"]
# mix_min=0, mix_by="count": passes mix whatever waits, so these few requests exercise mixed passes (the default
# waits for 8, and then mixes only while mixing measures cheaper)
SETTINGS = ServeSettings(max_batch=16, max_wait_ms=30, max_inputs=8, max_body_bytes=4096, mix_min=0, mix_by="count")
TIMEOUT = 30  # seconds, every HTTP call


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def task_dirs(tiny_models, sentiment_files, tmp_path_factory) -> list[str]:
    """Two skeletons of one tiny LLaMA, served by name: a pipeline output and a compact checkpoint."""
    root = tmp_path_factory.mktemp("serve")
    first = run_stages(tiny_models["llama"], sentiment_files, root / "first", "--head-keep", "0.5")
    second = run_stages(tiny_models["llama"], sentiment_files, root / "second", "--seed", "4", "--ffn-keep", "0.25")
    return [f"first={first}", f"second={second / 'compact'}"]


class _Flaky:
    """The real model, except that a forward pass over a text containing BOOM raises."""

    def __init__(self, model: MultiTaskModel):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def predict_mixed(self, tagged: list[tuple[str, Example]]) -> list[dict]:
        if any("BOOM" in text for _, e in tagged for text in e.texts):
            raise RuntimeError("BOOM inside the forward pass")
        return self.model.predict_mixed(tagged)


class ServerThread:
    """uvicorn serving `app` from a background thread on a free port of 127.0.0.1."""

    def __init__(self, app):
        sock = bind("127.0.0.1", 0)
        self.url = address(sock)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


@pytest.fixture(scope="module")
def model(tiny_models, task_dirs) -> MultiTaskModel:
    cfg = InferenceConfig(device="cpu", batch_size=SETTINGS.max_batch)
    return MultiTaskModel(str(tiny_models["llama"]), task_dirs, cfg=cfg, mix_tasks=True)


@pytest.fixture(scope="module")
def url(model):
    server = ServerThread(create_app(_Flaky(model), SETTINGS))
    yield server.url
    server.stop()


def _call(url: str, path: str, body=None, *, raw: bytes | None = None, headers: dict | None = None):
    """(status, decoded JSON or text) of one HTTP call; 4xx/5xx are answers, not exceptions."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json",
                                                                     **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            status, kind, text = response.status, response.headers.get_content_type(), response.read()
    except urllib.error.HTTPError as e:
        status, kind, text = e.code, e.headers.get_content_type(), e.read()
    return status, json.loads(text) if kind == "application/json" else text.decode()


def _classify(url: str, task: str, inputs: list) -> list[dict]:
    status, answer = _call(url, "/v1/classify", {"task": task, "inputs": inputs})
    assert status == 200, answer
    return answer["predictions"]


def _metrics(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, keyed by (sample name, sorted labels)."""
    status, text = _call(url, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _total(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def _assert_same_predictions(got: list[dict], expected: list[dict]) -> None:
    assert [p["label"] for p in got] == [p["label"] for p in expected]
    for g, e in zip(got, expected):  # merged passes pad differently: equal up to float rounding
        assert g["probabilities"] == pytest.approx(e["probabilities"], abs=1e-5)


# --------------------------------------------------------------- the server
def test_healthz_and_tasks(url, model):
    status, health = _call(url, "/healthz")
    assert status == 200 and health["status"] == "ok" and health["tasks"] == 2 and health["queued_examples"] == 0
    status, answer = _call(url, "/v1/tasks")
    assert status == 200
    assert [t["name"] for t in answer["tasks"]] == ["first", "second"] == model.task_names()
    assert all(t["fields"] == ["text"] and t["labels"] == ["neg", "pos"] for t in answer["tasks"])
    assert set(answer["memory"]) >= {"shared_bytes", "cache_bytes", "cache_budget", "tasks"}
    assert answer["memory"]["shared_bytes"] > 0


def test_concurrent_mixed_requests_answer_what_sequential_ones_do_and_are_merged(url):
    jobs = [("first" if i % 3 else "second", TEXTS[i % len(TEXTS)], i % 2 == 0) for i in range(48)]
    expected = {(task, text): _classify(url, task, [text])[0] for task, text in {job[:2] for job in jobs}}
    before = _metrics(url)
    start = threading.Barrier(8)

    def send(i: int) -> dict:
        task, text, as_record = jobs[i]
        if i < 8:
            start.wait(timeout=TIMEOUT)  # the first wave lands together
        return _classify(url, task, [{"text": text} if as_record else text])[0]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, range(len(jobs))))
    _assert_same_predictions(answers, [expected[task, text] for task, text, _ in jobs])

    after = _metrics(url)
    delta = {key: after[key] - before.get(key, 0) for key in after}
    assert _total(delta, "skeleton_batch_size_sum") == len(jobs)  # every example in exactly one pass
    passes = _total(delta, "skeleton_batch_size_count")
    single = _total(delta, "skeleton_batch_size_bucket", le="1.0")
    assert passes < len(jobs) and single < passes, f"no pass merged requests: {passes} passes, {single} of size 1"
    assert _total(delta, "skeleton_requests_total", status="200") == len(jobs)


def test_many_clients_across_many_tasks_with_eviction_answer_as_sequential_requests(tiny_models, sentiment_files,
                                                                                    tmp_path_factory):
    """Five skeletons of one tiny LLaMA (FFN and head keeps, per-layer widths) behind a cache that holds one
    task at a time: 8 concurrent clients send 60 single-input requests across them, cross-task passes evict
    and re-materialise, and every answer is what the same request gets alone."""
    root = tmp_path_factory.mktemp("many")
    flags = [("--ffn-keep", "0.5"), ("--ffn-keep", "0.25", "--keep-mode", "global"), ("--head-keep", "0.5"),
             ("--ffn-keep", "0.75", "--seed", "5"), ("--ffn-keep", "0.5", "--compensate", "mean", "--seed", "6")]
    dirs = [f"t{i}={run_stages(tiny_models['llama'], sentiment_files, root / f't{i}', *f)}"
            for i, f in enumerate(flags)]
    cfg = InferenceConfig(device="cpu", dtype="fp32", batch_size=16)
    probe = MultiTaskModel(str(tiny_models["llama"]), dirs, cfg=cfg)
    model = MultiTaskModel(str(tiny_models["llama"]), dirs, cfg=cfg, mix_tasks=True,
                           cache_bytes=max(probe.task_bytes.values()))
    server = ServerThread(create_app(model, ServeSettings(max_batch=16, max_wait_ms=20, mix_min=0, mix_by="count")))
    try:
        jobs = [(f"t{i % 5}", TEXTS[(i * 3) % len(TEXTS)]) for i in range(60)]
        alone = {job: _classify(server.url, *job[:1], [job[1]])[0] for job in set(jobs)}  # one at a time
        before = _metrics(server.url)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda job: _classify(server.url, job[0], [job[1]])[0], jobs))
        _assert_same_predictions(answers, [alone[job] for job in jobs])
        passes = _total(_metrics(server.url), "skeleton_batch_size_count", task="*") - _total(
            before, "skeleton_batch_size_count", task="*")
        assert passes < len(jobs), "no pass merged requests"
        stats = model.cache_stats().values()
        assert sum(s.evictions for s in stats) >= 5 and model.cache_bytes() <= model.budget
    finally:
        server.stop()


def test_metrics_count_requests_and_read_the_cache(url):
    before = _metrics(url)
    _classify(url, "second", TEXTS[:3])
    _classify(url, "second", TEXTS[3:4])
    _call(url, "/v1/classify", {"task": "third", "inputs": ["x"]})
    after = _metrics(url)

    def delta(name, **labels):
        return _total(after, name, **labels) - _total(before, name, **labels)

    assert delta("skeleton_requests_total", task="second", status="200") == 2
    assert delta("skeleton_requests_total", task="-", status="404") == 1  # unknown names never become labels
    assert delta("skeleton_request_seconds_count", task="second") == 2
    assert delta("skeleton_batch_size_sum", task="*") == 4  # passes mix tasks: one label for them all
    for task in ("first", "second"):
        looked_up = _total(after, "skeleton_cache_hits_total", task=task) + _total(after, "skeleton_cache_misses_total",
                                                                                   task=task)
        assert looked_up >= 1 and ("skeleton_cache_evictions_total", (("task", task),)) in after
    assert _total(after, "skeleton_resident_bytes", part="shared") > 0
    assert _total(after, "skeleton_resident_bytes", part="cache") > 0


def _chunked(url: str, body: bytes) -> tuple[int, dict]:
    """POST without Content-Length (chunked): only the bytes read can tell the size."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    try:
        conn.request("POST", "/v1/classify", body=iter([body[i:i + 1000] for i in range(0, len(body), 1000)]),
                     headers={"Content-Type": "application/json"}, encode_chunked=True)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


TOO_BIG = json.dumps({"task": "first", "inputs": ["good " * 1000]}).encode()  # > SETTINGS.max_body_bytes

BAD_REQUESTS = {  # id: (body, or raw bytes, expected status, a word the error names)
    "invalid-json": (b'{"task": "first", "inputs": [', 400, "not valid JSON"),
    "not-an-object": ([1, 2], 400, "JSON object"),
    "no-task": ({"inputs": ["a good movie"]}, 400, '"task"'),
    "task-not-a-string": ({"task": 3, "inputs": ["a good movie"]}, 400, '"task"'),
    "no-inputs": ({"task": "first"}, 400, '"inputs"'),
    "inputs-not-a-list": ({"task": "first", "inputs": "a good movie"}, 400, '"inputs"'),
    "unknown-task": ({"task": "third", "inputs": ["a good movie"]}, 404, "third"),
    "record-missing-field": ({"task": "first", "inputs": [{"sentence": "a good movie"}]}, 422, "'text'"),
    "bad-label": ({"task": "first", "inputs": [{"text": "a good movie", "label": "maybe"}]}, 422, "'maybe'"),
    "neither-record-nor-string": ({"task": "first", "inputs": [7]}, 422, "input 0"),
    "empty-inputs": ({"task": "first", "inputs": []}, 422, "empty"),
    "too-many-inputs": ({"task": "first", "inputs": ["good"] * 9}, 413, "at most 8"),
    "body-over-content-length": (TOO_BIG, 413, "4096"),
}


@pytest.mark.parametrize("case", [*BAD_REQUESTS, "body-over-read-bytes", "unknown-path"])
def test_bad_request_gets_its_4xx_and_the_server_serves_on(case, url):
    if case == "body-over-read-bytes":
        status, answer = _chunked(url, TOO_BIG)
        expected, needle = 413, "4096"
    elif case == "unknown-path":
        (status, answer), expected, needle = _call(url, "/v1/classfy", {"task": "first"}), 404, "/v1/classfy"
    else:
        body, expected, needle = BAD_REQUESTS[case]
        raw = body if isinstance(body, bytes) else None
        status, answer = _call(url, "/v1/classify", None if raw else body, raw=raw)
    assert status == expected and set(answer) == {"error"} and needle in answer["error"], (status, answer)
    assert len(_classify(url, "first", ["a good movie", {"text": "an awful plot", "label": "neg"}])) == 2


def test_an_error_inside_the_forward_pass_fails_that_request_only(url):
    status, answer = _call(url, "/v1/classify", {"task": "first", "inputs": ["BOOM"]})
    assert status == 500 and "incident" in answer["error"] and "BOOM" not in answer["error"]  # no internals
    assert _call(url, "/healthz")[0] == 200
    assert _classify(url, "first", ["a good movie"])[0]["label"] in ("neg", "pos")


class _Gated:
    """The real model, except that a pass holding a text with HOLD waits until the test opens the gate."""

    def __init__(self, model: MultiTaskModel):
        self.model, self.gate, self.holding = model, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.model, name)

    def predict_mixed(self, tagged: list) -> list[dict]:
        if any("HOLD" in e.texts[0] for _, e in tagged):
            self.holding.set()
            self.gate.wait(TIMEOUT)
        return self.model.predict_mixed(tagged)


def _post(url: str, body: dict) -> tuple:
    """(status, JSON answer, headers) of one classify call."""
    request = urllib.request.Request(url + "/v1/classify", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def test_overload_gives_503_then_504_a_stall_fails_healthz_and_the_server_recovers(model):
    """A pass that hangs (HOLD): the queue fills, a request beyond it gets 503 with Retry-After at once, the
    queued ones get 504 at their deadline, /healthz reports the stalled worker; once the pass ends, the
    next good request succeeds and /healthz is green again."""
    gated = _Gated(model)
    settings = ServeSettings(max_batch=16, max_wait_ms=0, max_inputs=8, max_queue=8, timeout_ms=1500, stall_s=0.5,
                             mix_min=0)  # _Gated holds mixed passes
    server = ServerThread(create_app(gated, settings))
    try:
        with ThreadPoolExecutor(2) as pool:
            held = pool.submit(_post, server.url, {"task": "first", "inputs": ["HOLD on"]})
            assert gated.holding.wait(TIMEOUT)
            queued = pool.submit(_post, server.url, {"task": "second", "inputs": TEXTS})  # fills the queue: 8
            deadline = time.monotonic() + TIMEOUT
            while server.thread.is_alive() and time.monotonic() < deadline:  # until the 8 examples are queued
                if _call(server.url, "/healthz")[1]["queued_examples"] == 8:
                    break
                time.sleep(0.02)
            status, answer, headers = _post(server.url, {"task": "first", "inputs": ["one more"]})
            assert status == 503 and "at capacity" in answer["error"] and int(headers.get("Retry-After")) >= 1
            stalled = time.monotonic() + 0.6  # past --stall-s 0.5, and within the 1.5 s deadline
            while (health := _call(server.url, "/healthz"))[0] == 200 and time.monotonic() < stalled + 0.5:
                time.sleep(0.05)
            assert health[0] == 503 and health[1]["status"].startswith("worker stalled"), health
            late = queued.result(TIMEOUT)
            assert late[0] == 504 and "--timeout-ms" in late[1]["error"]
            assert held.result(TIMEOUT)[0] == 504  # its pass outlived its deadline too
            gated.gate.set()
        deadline = time.monotonic() + TIMEOUT
        while _call(server.url, "/healthz")[0] != 200:  # the held pass ends
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert _classify(server.url, "second", ["a good movie"])[0]["label"] in ("neg", "pos")
        samples = _metrics(server.url)
        assert _total(samples, "skeleton_requests_total", status="503") == 1
        assert _total(samples, "skeleton_requests_total", status="504") == 2
    finally:
        gated.gate.set()
        server.stop()


# ------------------------------------------------------ plain prompt tuning
class _Recording:
    """The real prompt-tuning model, recording which tasks each forward pass held."""

    def __init__(self, model: PromptTuningModel):
        self.model, self.passes = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def predict_mixed(self, tagged: list) -> list[dict]:
        self.passes.append({task for task, _ in tagged})
        return self.model.predict_mixed(tagged)


@pytest.fixture(scope="module")
def prompt_tuning(tiny_models, task_dirs):
    """`--mode prompt-tuning` on a real uvicorn: the full tiny LLaMA with both tasks' stage-1 prompts."""
    cfg = InferenceConfig(device="cpu", dtype="fp32", batch_size=SETTINGS.max_batch)
    model = _Recording(PromptTuningModel(str(tiny_models["llama"]), task_dirs, cfg=cfg))
    server = ServerThread(create_app(model, SETTINGS))
    yield server.url, model
    server.stop()


def test_prompt_tuning_mode_mixes_tasks_in_a_pass_and_answers_as_alone(prompt_tuning):
    url, model = prompt_tuning
    jobs = [("first" if i % 2 else "second", TEXTS[i % len(TEXTS)]) for i in range(24)]
    alone = {job: model.model.predict(job[0], [Example((job[1],), -1)])[0] for job in set(jobs)}  # no HTTP, no batcher
    before, model.passes[:] = _metrics(url), []
    start = threading.Barrier(8)

    def send(i: int) -> dict:
        if i < 8:
            start.wait(timeout=TIMEOUT)
        task, text = jobs[i]
        return _classify(url, task, [text])[0]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, range(len(jobs))))
    _assert_same_predictions(answers, [alone[job] for job in jobs])
    assert any(len(tasks) == 2 for tasks in model.passes), f"no pass mixed the tasks: {model.passes}"
    after = _metrics(url)
    delta = {key: after[key] - before.get(key, 0) for key in after}
    assert _total(delta, "skeleton_batch_size_sum", task="*") == len(jobs)  # one queue across tasks
    assert _total(delta, "skeleton_batch_size_count", task="*") < len(jobs)
    for task in ("first", "second"):
        assert _total(delta, "skeleton_requests_total", task=task, status="200") == len(jobs) / 2
    status, described = _call(url, "/v1/tasks")
    assert status == 200 and [t["name"] for t in described["tasks"]] == ["first", "second"]
    memory = described["memory"]
    assert memory["cache_budget"] is None and 0 < memory["cache_bytes"] == sum(memory["tasks"].values())
    assert memory["cache_bytes"] < memory["shared_bytes"]  # the prompts are small beside the one base


def test_prompt_tuning_mode_refuses_bad_requests_and_serves_on(prompt_tuning):
    url, _ = prompt_tuning
    for body, expected in ((BAD_REQUESTS["unknown-task"][0], 404), (BAD_REQUESTS["record-missing-field"][0], 422),
                           (BAD_REQUESTS["too-many-inputs"][0], 413)):
        status, answer = _call(url, "/v1/classify", body)
        assert status == expected and set(answer) == {"error"}, (status, answer)
    assert _call(url, "/healthz")[1]["status"] == "ok"
    assert len(_classify(url, "second", ["a good movie", "an awful plot"])) == 2


def test_load_test_smoke_run_measures_four_ways_of_serving_with_provenance(tiny_models, task_dirs, tmp_path):
    """skeleton_ds/experiments/load_test.py end to end, bounded (a dozen requests per server and loop): skeletons with
    cross-task and per-task batching, plain prompt tuning, separate compact models; Zipf and uniform
    popularity; its JSON carries the provenance, the memory of each server and the targets' ratios."""
    out = tmp_path / "load_test.json"
    command = [sys.executable, "-m", "skeleton_ds.experiments.load_test", "--base", str(tiny_models["llama"]),
               "--requests", "12", "--warmup-requests", "6",
               "--clients", "3,32", "--device", "cpu", "--dtype", "fp32", "--output", str(out),
               *(arg for d in task_dirs for arg in ("--task-dir", d))]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    record = json.loads(out.read_text())
    assert missing_fields(record) == []
    assert [(r["popularity"], r["clients"], r["mode"], r["batching"]) for r in record["runs"][:4]] == [
        ("zipf", 3, "skeleton", "cross-task"), ("zipf", 3, "skeleton", "per-task"),
        ("zipf", 3, "prompt-tuning", "cross-task"), ("zipf", 3, "compact", "per-task")]
    assert len(record["runs"]) == 16 and all(r["failures"] == 0 and r["requests_per_s"] > 0 for r in record["runs"])
    assert record["warmup_requests"] == 6 and all(r["mixed_passes"] <= r["passes"] for r in record["runs"])
    assert {r["mix_probes"] + r["mixed_passes"] for r in record["runs"] if r["batching"] == "per-task"} == {0}
    memory = record["memory"]
    shared = {label: m["shared_bytes"] for label, m in memory.items()}
    assert shared["skeletons, cross-task"] == shared["plain prompt tuning, cross-task"] > 0
    assert shared["separate compact models, per-task"] == 0  # nothing shared
    assert memory["plain prompt tuning, cross-task"]["model_bytes"] < memory["skeletons, cross-task"]["model_bytes"]
    assert set(record["targets"]) == {"per-task", "prompt-tuning"}
    assert "separate compact models" in out.with_suffix(".md").read_text()
    assert "per loop, after 6 untimed" in out.with_suffix(".md").read_text()


def test_a_load_generator_killed_takes_its_servers_with_it(tiny_models, task_dirs):
    """loadgen.Server: a measurement killed outright (SIGKILL: no cleanup runs) leaves no server serving on,
    loading the machine for the next measurement."""
    import os
    import signal

    code = ("import sys, time\n"
            "from skeleton_ds.experiments.loadgen import Server, Serving\n"
            f"server = Server(Serving('skeleton', 'per-task'), {str(tiny_models['llama'])!r}, {task_dirs[:1]!r}, "
            "extra=['--device', 'cpu'])\n"
            "print(server.process.pid, flush=True)\n"
            "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        server = int(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(server, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(server, signal.SIGKILL)
    pytest.fail("the server outlived the load generator that started it")


def test_soak_smoke_run_answers_or_refuses_every_request(tiny_models, task_dirs, tmp_path):
    """experiments.soak_test for a few seconds at twice the measured capacity, with a small queue and a short
    deadline: every request is answered once (200, 503 or 504), none lost, the server healthy after."""
    out = tmp_path / "soak.json"
    command = [sys.executable, "-m", "skeleton_ds.experiments.soak_test", "--base", str(tiny_models["llama"]),
               "--seconds", "4",
               "--capacity-requests", "60", "--capacity-clients", "4", "--max-queue", "8", "--timeout-ms", "300",
               "--senders", "64", "--device", "cpu", "--output", str(out),
               *(arg for d in task_dirs for arg in ("--task-dir", d))]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    record = json.loads(out.read_text())
    checks = record["checks"]
    assert (checks["nothing_lost"] and checks["answered_once"] and checks["only_200_503_504"]
            and checks["healthy_after"]), \
        (checks, record["soak"], record["server_counted"], run.stderr[-2000:])
    assert record["soak"]["sent"] == sum(record["soak"]["statuses"].values()) > 0
    assert missing_fields(record) == []


# -------------------------------------------------------------- the batcher
class _Recorder:
    """A stand-in predict that records each call and can hold the worker until released."""

    def __init__(self, fail_on: str | None = None):
        self.calls: list[tuple[str, list[str]]] = []
        self.entered, self.release = threading.Event(), threading.Event()
        self.fail_on = fail_on

    def __call__(self, task: str, examples: list) -> list[dict]:
        """`examples`: one task's, or (task, example) pairs in a pass that mixes tasks (its task is "*")."""
        self.entered.set()
        self.release.wait(TIMEOUT)
        tagged = [e if isinstance(e, tuple) else (task, e) for e in examples]
        texts = [e.texts[0] for _, e in tagged]
        self.calls.append((task, texts))
        if self.fail_on in texts:
            raise ValueError(f"failing on {self.fail_on}")
        return [{"label": f"{name}:{e.texts[0]}"} for name, e in tagged]


def _examples(*texts: str) -> list[Example]:
    return [Example((t,), -1) for t in texts]


def _run_queued(batcher: Batcher, recorder: _Recorder, requests: list[tuple[str, list[str]]]):
    """Hold the worker on a first pass, queue `requests`, release; their futures' results (or errors)."""
    blocker = batcher.submit("hold", _examples("hold"))
    assert recorder.entered.wait(TIMEOUT)  # the worker is inside predict: what follows queues up
    futures = [batcher.submit(task, _examples(*texts)) for task, texts in requests]
    recorder.release.set()
    blocker.result(TIMEOUT)
    return [f.exception(TIMEOUT) or f.result() for f in futures]


def test_batcher_merges_one_task_per_pass_round_robin():
    recorder = _Recorder()
    batcher = Batcher(recorder, max_batch=4, max_wait_s=0.05)
    try:
        results = _run_queued(batcher, recorder, [("a", ["a1"]), ("a", ["a2", "a3"]), ("b", ["b1"]), ("a", ["a4"]),
                                                  ("a", ["a5"]), ("b", ["b2"])])
    finally:
        batcher.close()
    # Whole requests, at most 4 examples of one task a turn, tasks in turn; each caller gets its own slice.
    assert recorder.calls[1:] == [("a", ["a1", "a2", "a3", "a4"]), ("b", ["b1", "b2"]), ("a", ["a5"])]
    assert results[1] == [{"label": "a:a2"}, {"label": "a:a3"}] and results[5] == [{"label": "b:b2"}]


def test_batcher_burst_on_one_task_does_not_starve_another():
    recorder = _Recorder()
    batcher = Batcher(recorder, max_batch=2, max_wait_s=0.0)
    try:
        _run_queued(batcher, recorder, [("a", [f"a{i}", f"a{i}'"]) for i in range(10)] + [("b", ["b"])])
    finally:
        batcher.close()
    assert [task for task, _ in recorder.calls[1:4]] == ["a", "b", "a"]  # b waits one turn, not ten


def test_batcher_without_batching_runs_every_request_alone():
    recorder = _Recorder()
    batcher = Batcher(recorder, max_batch=32, max_wait_s=1.0, policy="off")
    try:
        _run_queued(batcher, recorder, [("a", ["a1"]), ("a", ["a2", "a3"]), ("a", ["a4"])])
    finally:
        batcher.close()
    assert recorder.calls[1:] == [("a", ["a1"]), ("a", ["a2", "a3"]), ("a", ["a4"])]


def test_batcher_failure_fails_only_its_pass_and_the_worker_survives():
    recorder = _Recorder(fail_on="bad")
    batcher = Batcher(recorder, max_batch=4, max_wait_s=0.05)
    try:
        results = _run_queued(batcher, recorder, [("a", ["ok1"]), ("a", ["bad"]), ("b", ["ok2"])])
        assert isinstance(results[0], ValueError) and isinstance(results[1], ValueError)  # one merged pass
        assert results[2] == [{"label": "b:ok2"}]
        assert batcher.alive() and batcher.submit("a", _examples("ok3")).result(TIMEOUT) == [{"label": "a:ok3"}]
    finally:
        batcher.close()
    assert not batcher.alive()


def test_batcher_on_the_callers_thread_runs_passes_there_until_closed():
    """thread=False: the passes run on whoever calls work() (the server's main thread); close() from another
    thread ends work() after its pass and fails what is still queued."""
    recorder, ran_on = _Recorder(), []

    def recording(task, examples):
        ran_on.append(threading.current_thread().name)
        return recorder(task, examples)

    batcher = Batcher(recording, max_batch=4, max_wait_s=0.0, thread=False)
    assert not batcher.own_thread and batcher.alive() and batcher.worker_thread() is None
    worker = threading.Thread(target=batcher.work, name="the-callers-thread")
    worker.start()
    try:
        results = _run_queued(batcher, recorder, [("a", ["a1"]), ("b", ["b1"])])
        assert results == [[{"label": "a:a1"}], [{"label": "b:b1"}]]
        assert batcher.worker_thread() == "the-callers-thread"
        recorder.release.clear()
        recorder.entered.clear()
        held = batcher.submit("hold", _examples("hold again"))
        assert recorder.entered.wait(TIMEOUT)
        queued = batcher.submit("a", _examples("never run"))
        closer = threading.Thread(target=batcher.close)
        closer.start()
        recorder.release.set()
        closer.join(TIMEOUT)
        assert not closer.is_alive()  # close() waited for the pass, then returned
    finally:
        recorder.release.set()
        batcher.close()
        worker.join(TIMEOUT)
    assert not worker.is_alive() and not batcher.alive()
    assert set(ran_on) == {"the-callers-thread"}
    assert held.result(TIMEOUT) == [{"label": "hold:hold again"}]
    assert isinstance(queued.exception(TIMEOUT), RuntimeError)


def test_cross_task_batcher_mixes_tasks_round_robin_one_request_each():
    recorder = _Recorder()
    batcher = Batcher(recorder, max_batch=4, max_wait_s=0.05, policy="cross-task")
    try:
        results = _run_queued(batcher, recorder, [("a", ["a1"]), ("a", ["a2", "a3"]), ("b", ["b1"]), ("a", ["a4"]),
                                                  ("c", ["c1"]), ("b", ["b2"])])
    finally:
        batcher.close()
    # Each pass: one whole request per waiting task per round, up to 4 examples (a2+a3 did not fit beside
    # a1, b1, c1; b2 did); the next pass starts with the task after the last one served.
    assert recorder.calls[1:] == [("*", ["a1", "b1", "c1", "b2"]), ("*", ["a2", "a3", "a4"])]
    assert results[1] == [{"label": "a:a2"}, {"label": "a:a3"}] and results[5] == [{"label": "b:b2"}]


def test_cross_task_batcher_runs_the_oldest_task_alone_below_mix_min():
    """Light load (fewer than mix_min examples waiting): the task with the oldest request runs alone, through
    the one-task predict; from mix_min waiting, passes mix tasks again."""
    recorder = _Recorder()
    batcher = Batcher(recorder, max_batch=8, max_wait_s=0.0, policy="cross-task", mix_min=4)
    try:
        results = _run_queued(batcher, recorder, [("a", ["a1"]), ("b", ["b1"]), ("a", ["a2"])])
        assert recorder.calls[1:] == [("a", ["a1", "a2"]), ("b", ["b1"])]  # 3 waiting < 4: one task per pass
        assert results == [[{"label": "a:a1"}], [{"label": "b:b1"}], [{"label": "a:a2"}]]
        recorder.calls.clear()
        recorder.entered.clear()
        recorder.release.clear()
        _run_queued(batcher, recorder, [("a", ["a3"]), ("b", ["b2"]), ("c", ["c1"]), ("a", ["a4"])])
        assert recorder.calls[1:] == [("*", ["a3", "b2", "c1", "a4"])]  # 4 waiting: one mixed pass
    finally:
        batcher.close()


def test_cross_task_batcher_mixes_only_while_mixing_measures_faster():
    """mix_by "cost": from mix_min waiting, a pass mixes tasks while the mix rule has measured mixed passes serving
    rows in fewer busy seconds per row than one-task passes. mix_by "count" mixes whatever the costs."""
    from skeleton_ds.serving.mix_rule import MixRule

    recorder = _Recorder()
    batcher = Batcher(recorder, max_batch=8, max_wait_s=0.0, policy="cross-task", mix_min=2, mix_by="cost")
    try:
        assert batcher._mixing_pays(2) and batcher.mix_rule.probing  # nothing measured yet: mixed passes first
        batcher.mix_rule = MixRule(cost={True: 10.0, False: 0.001}, _exploit_left=1e9)  # mixed far dearer per row
        _run_queued(batcher, recorder, [("a", ["a1"]), ("b", ["b1"]), ("a", ["a2"])])
        assert recorder.calls[1:] == [("a", ["a1", "a2"]), ("b", ["b1"])]  # 3 waiting >= 2, yet one task a pass
        recorder.calls.clear()
        recorder.entered.clear()
        recorder.release.clear()
        batcher.mix_rule = MixRule(cost={True: 1e-6, False: 10.0}, _exploit_left=1e9)  # now mixed is the cheaper
        _run_queued(batcher, recorder, [("a", ["a3"]), ("b", ["b2"]), ("a", ["a4"])])
        assert recorder.calls[1:] == [("*", ["a3", "b2", "a4"])]
        assert batcher.mix_rule._exploit_left < 1e9  # the passes just run counted towards the next probe
    finally:
        batcher.close()
    counting = Batcher(recorder, policy="cross-task", mix_min=2, mix_by="count", thread=False)
    counting.mix_rule = MixRule(cost={True: 10.0, False: 0.001}, _exploit_left=1e9)
    assert all(counting._mixing_pays(2) for _ in range(8))
    with pytest.raises(ValueError, match="mix_by"):
        Batcher(recorder, mix_by="sometimes", thread=False)
    with pytest.raises(UserError, match="--mix-by takes cost, count"):
        ServeSettings(mix_by="sometimes")


def _serve(rule, mixed: bool, rows: int, seconds: float, tasks: int = 3, waiting: float = 8) -> None:
    """One pass as the batcher runs it: asked (with the load), then told."""
    assert rule.mix(tasks, waiting) == mixed
    rule.observe(mixed, rows, seconds)


def test_mix_rule_measures_each_way_in_its_steady_state_then_runs_the_faster():
    """An epoch probes mixed passes, then one-task passes (settling first: one turn round the waiting tasks),
    each measured as busy seconds per row; the faster way then runs `exploit` times as long as the probes took,
    and the next epoch probes again. A pass the rule did not choose (light load: one task alone) is not measured."""
    from skeleton_ds.serving.mix_rule import MixRule

    rule = MixRule(settle=1, measure=2, exploit=2.0)
    _serve(rule, True, 10, 100.0)  # settling: not measured
    _serve(rule, True, 10, 1.0)
    rule.observe(False, 1, 50.0)  # a light-load pass between: not the probe's
    _serve(rule, True, 10, 1.0)
    assert rule.cost == {True: 0.1}
    for _ in range(3):  # one-task passes settle for a turn round the 3 tasks, then measure one
        _serve(rule, False, 1, 5.0)
    for _ in range(3):
        _serve(rule, False, 2, 1.0)
    assert rule.cost == {True: 0.1, False: 0.5} and not rule.probing
    assert rule.epochs == 1
    assert rule._exploit_left == pytest.approx(2.0 * (100 + 2 + 15 + 3))  # twice the probes' busy seconds
    _serve(rule, True, 10, 200.0)  # mixed measured faster: mixed passes, until the exploit time is used up
    _serve(rule, True, 10, 50.0)
    assert rule.mix(3, 8) and rule.probing  # a new epoch: the probes again, mixed first
    assert rule.epochs == 2
    rule.observe(True, 10, 1.0)
    rule = MixRule(settle=1, measure=1, exploit=1.0, cost={True: 0.5, False: 0.1}, _exploit_left=10.0)
    _serve(rule, False, 4, 1.0)  # one-task passes measured faster: one task a pass
    assert not rule.probing


def test_metrics_show_what_the_mix_rule_measured():
    """/metrics, under cross-task batching by cost: the busy seconds per row of each way's last probe and how
    many times both were probed; by count (nothing measured) neither."""
    from skeleton_ds.serving.mix_rule import MixRule
    from skeleton_ds.serving.server import _BatcherCollector

    def samples(batcher) -> dict:
        return {(s.name, tuple(s.labels.values())): s.value for f in _BatcherCollector(batcher).collect()
                for s in f.samples}

    recorder = _Recorder()
    batcher = Batcher(recorder, policy="cross-task", mix_min=2, mix_by="cost", thread=False)
    batcher.mix_rule = MixRule(cost={True: 0.25, False: 0.5}, epochs=3)
    assert samples(batcher) == {("skeleton_requests_expired_total", ()): 0, ("skeleton_mix_probes_total", ()): 3,
                                ("skeleton_mix_seconds_per_row", ("mixed",)): 0.25,
                                ("skeleton_mix_seconds_per_row", ("one-task",)): 0.5}
    counting = Batcher(recorder, policy="cross-task", mix_min=2, mix_by="count", thread=False)
    assert samples(counting) == {("skeleton_requests_expired_total", ()): 0}


def test_mix_rule_probes_again_when_the_load_moves_away_from_the_one_probed():
    """The load (the batcher's moving average of the rows in the server) against the probes' mean: more than
    twice or under half of it ends the faster way's stretch early, both ways (a light load after a heavy one,
    and the other way round); a load near it does not. Two probes that saw loads more than 2x apart are not
    compared: both are probed again. The batcher's load follows the rows waiting and running as requests come."""
    from skeleton_ds.serving.mix_rule import MixRule

    def probed_at_10() -> MixRule:  # one-task passes measured faster, both probes at a load of 10
        rule = MixRule(settle=0, measure=1, exploit=1000.0)
        _serve(rule, True, 2, 1.0, tasks=1, waiting=10)
        _serve(rule, False, 2, 0.1, tasks=1, waiting=10)
        _serve(rule, False, 2, 0.1, tasks=1, waiting=10)
        assert not rule.probing and rule.epochs == 1
        return rule

    for near in (6, 12, 19):
        rule = probed_at_10()
        for _ in range(20):
            _serve(rule, False, 2, 0.1, tasks=1, waiting=near)  # near the load probed: the stretch goes on
    for far in (4, 21, 40):
        rule = probed_at_10()
        assert rule.mix(1, far) and rule.probing and rule.epochs == 2  # the probes again, mixed first
    rule = MixRule(settle=0, measure=1, exploit=1000.0)
    _serve(rule, True, 2, 1.0, tasks=1, waiting=8)  # mixed probed at a load of 8
    _serve(rule, False, 2, 0.1, tasks=1, waiting=40)  # one-task passes at 40: not comparable
    _serve(rule, False, 2, 0.1, tasks=1, waiting=40)
    assert rule.mix(1, 40) and rule.probing and rule.epochs == 2  # both probed again, mixed first
    batcher = Batcher(_Recorder(), policy="cross-task", thread=False)
    for _ in range(100):
        batcher.submit("a", ["x"])
    assert 70 < batcher.load < 100  # 100 rows waiting, the average a few requests behind


def test_a_full_queue_refuses_and_a_withdrawn_request_is_never_run():
    from skeleton_ds.serving.server import Overloaded

    recorder = _Recorder()
    batcher = Batcher(recorder, max_batch=4, max_wait_s=0.0, max_queue=3)
    try:
        blocker = batcher.submit("hold", _examples("hold"))
        assert recorder.entered.wait(TIMEOUT)
        kept = batcher.submit("a", _examples("a1", "a2"))
        withdrawn = batcher.submit("a", _examples("gone"))
        with pytest.raises(Overloaded, match="at most 3") as refused:
            batcher.submit("b", _examples("b1"))
        assert refused.value.retry_after_s >= 1 and batcher.waiting() == 3
        assert withdrawn.cancel()  # its caller stopped waiting (a 504)
        recorder.release.set()
        blocker.result(TIMEOUT)
        assert kept.result(TIMEOUT) == [{"label": "a:a1"}, {"label": "a:a2"}]
        assert batcher.submit("b", _examples("b1")).result(TIMEOUT) == [{"label": "b:b1"}]
    finally:
        batcher.close()
    assert all("gone" not in texts for _, texts in recorder.calls) and batcher.waiting() == 0


def test_a_request_past_its_deadline_is_never_computed():
    """Its caller has been answered 504 but has not yet withdrawn it (the handler's timer and the worker race):
    the worker drops it when it reaches the queue's head, counts it, and computes only the live requests."""
    recorder = _Recorder()
    batcher = Batcher(recorder, max_batch=4, max_wait_s=0.0, timeout_s=0.3)
    try:
        blocker = batcher.submit("hold", _examples("hold"))
        assert recorder.entered.wait(TIMEOUT)
        late = batcher.submit("a", _examples("late"))
        time.sleep(0.4)  # past its deadline, still queued behind the held pass
        recorder.release.set()
        blocker.result(TIMEOUT)
        fresh = batcher.submit("a", _examples("fresh"))
        assert fresh.result(TIMEOUT) == [{"label": "a:fresh"}]
        assert isinstance(late.exception(TIMEOUT), Expired) and batcher.expired == 1  # its caller answers 504
    finally:
        batcher.close()
    assert all("late" not in texts for _, texts in recorder.calls)


def test_a_pass_drops_its_requests_that_expired_after_it_was_taken():
    from skeleton_ds.serving.server import _Request

    batcher = Batcher(_Recorder(), timeout_s=10)
    try:
        now = time.monotonic()
        live, gone = (_Request("a", _examples(t), Future(), now, now + d) for t, d in (("live", 10), ("gone", -1)))
        for r in (live, gone):
            r.future.set_running_or_notify_cancel()  # taken into the pass
        assert batcher._unexpired([live, gone]) == [live]
        assert isinstance(gone.future.exception(0), Expired) and batcher.expired == 1
    finally:
        batcher.close()


# ------------------------------------------------------------ the API key
def test_an_api_key_guards_every_route_but_healthz(model):
    server = ServerThread(create_app(model, ServeSettings(max_batch=16, max_inputs=8, api_key="s3cret")))
    try:
        key = {"Authorization": "Bearer s3cret"}
        assert _call(server.url, "/healthz")[0] == 200  # probes need no key
        for path, body in (("/v1/tasks", None), ("/metrics", None),
                           ("/v1/classify", {"task": "first", "inputs": ["x"]})):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                status, answer = _call(server.url, path, body, headers=headers)
                assert status == 401 and "API key" in answer["error"], (path, headers)
        assert _call(server.url, "/v1/tasks", headers=key)[0] == 200
        status, answer = _call(server.url, "/v1/classify", {"task": "first", "inputs": ["a good movie"]}, headers=key)
        assert status == 200 and answer["predictions"][0]["label"] in ("neg", "pos")
        # Refused before the queue: only the one keyed classify request was ever counted.
        status, text = _call(server.url, "/metrics", headers=key)
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(text) for s in family.samples}
        assert _total(samples, "skeleton_requests_total") == 1
    finally:
        server.stop()


def test_serving_beyond_loopback_without_a_key_warns(tiny_models, tmp_path, capsys):
    from skeleton_ds.serving.server import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("no-such-host.invalid")
    missing = str(tmp_path / "nowhere")
    assert run_command(serve, ["--base", str(tiny_models["llama"]), "--task-dir", missing, "--host", "0.0.0.0",
                               "--port", "0"]) == 2
    assert "without an API key" in capsys.readouterr().err
    assert run_command(serve, ["--base", str(tiny_models["llama"]), "--task-dir", missing, "--host", "0.0.0.0",
                               "--port", "0", "--api-key", "k"]) == 2
    assert "without an API key" not in capsys.readouterr().err
    assert run_command(serve, ["--base", str(tiny_models["llama"]), "--task-dir", missing, "--api-key", " "]) == 2
    assert "--api-key" in capsys.readouterr().err


# ------------------------------------------------------------- the command
def _assert_one_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_cli_bad_input_is_one_error_line(tiny_models, task_dirs, tmp_path, capsys):
    base = str(tiny_models["llama"])
    _assert_one_error(run_command(serve, ["--base", base]), capsys.readouterr().err, "--task-dir")
    missing = tmp_path / "nowhere"
    _assert_one_error(run_command(serve, ["--base", base, "--task-dir", str(missing), "--port", "0"]),
                      capsys.readouterr().err, str(missing))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        _assert_one_error(run_command(serve, ["--base", base, "--task-dir", task_dirs[0], "--port", port]),
                          capsys.readouterr().err, "cannot listen", port)
    _assert_one_error(run_command(serve, ["--base", base, "--task-dir", task_dirs[0], "--max-batch", "0"]),
                      capsys.readouterr().err, "--max-batch")
    _assert_one_error(run_command(serve, ["--base", base, "--task-dir", task_dirs[0], "--mode", "prompt-tuning",
                                          "--cache-bytes", "100"]), capsys.readouterr().err, "--cache-bytes")
    _assert_one_error(run_command(serve, ["--task-dir", task_dirs[0], "--mode", "compact", "--batching", "cross-task"]),
                      capsys.readouterr().err, "--mode compact", "per-task")
    _assert_one_error(run_command(serve, ["--base", base, "--task-dir", task_dirs[0], "--max-queue", "8"]),
                      capsys.readouterr().err, "--max-queue 8", "--max-inputs 256")
    _assert_one_error(run_command(serve, ["--base", base, "--task-dir", task_dirs[0], "--timeout-ms", "0"]),
                      capsys.readouterr().err, "--timeout-ms")
    _assert_one_error(run_command(serve, ["--base", base, "--task-dir", task_dirs[0], "--mix-min", "-1"]),
                      capsys.readouterr().err, "--mix-min")  # the flag reaches ServeSettings


def test_serve_command_serves_until_stopped(tiny_models, task_dirs):
    """`skeleton-ds serve` as a user runs it (`python -m skeleton_ds serve`): prints its address, answers, stops on
    SIGTERM."""
    command = [sys.executable, "-m", "skeleton_ds", "serve", "--base", str(tiny_models["llama"]),
               "--task-dir", task_dirs[0], "--port", "0", "--device", "cpu", "--no-batching"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first_line = _read_line(process, timeout=60)
        assert "serving 1 tasks (first)" in first_line and "no batching" in first_line, first_line
        url = first_line.rsplit(" on ", 1)[1].split()[0]
        status, health = _call(url, "/healthz")
        assert status == 200 and health["worker_thread"] == "MainThread", health  # passes run where torch loaded
        assert _classify(url, "first", ["a good movie"])[0]["label"] in ("neg", "pos")
    finally:
        process.terminate()
        process.wait(timeout=20)
    assert process.returncode == 0, process.stderr.read()[-2000:]  # SIGTERM: a graceful exit


def _read_line(process: subprocess.Popen, timeout: float) -> str:
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not (lines and lines[0]):
        process.kill()
        pytest.fail(f"no address line within {timeout} s; stderr: {process.communicate()[1][-2000:]}")
    return lines[0]
