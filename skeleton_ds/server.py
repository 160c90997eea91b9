"""HTTP serving of many task skeletons on one base model (`skeleton-ds serve`), with dynamic batching.

    skeleton-ds serve --base minilm --task-dir runs/minilm-sst2 --task-dir runs/minilm-rte --port 8000
    curl -s localhost:8000/v1/classify -d '{"task": "sst2", "inputs": ["a gripping, funny film"]}'

Endpoints: `POST /v1/classify` ({"task", "inputs"} -> {"predictions": [{"label", "probabilities"}]}),
`GET /v1/tasks` (the registered tasks and memory), `GET /healthz`, `GET /metrics` (Prometheus text).
A bad request gets a 4xx and `{"error": "..."}`, and the server goes on serving.

Why a batcher: a forward pass over 32 examples costs far less than 32 passes over one, so concurrent
requests for the same task are merged into one pass. The policy (`Batcher`) in README words:
**one worker thread runs every forward pass; each task has a FIFO queue, and the worker serves the
tasks that are ready in round-robin order, taking at most `max_batch` examples of one task per turn,
so a burst on one task delays another by at most one pass per busy task.** A task is ready when it
has `max_batch` examples waiting or its oldest request has waited `max_wait_ms`. Requests for
different tasks never share a pass; a request is never split, and one larger than `max_batch` runs
alone (the model cuts it into passes of `max_batch`).

`--mode prompt-tuning` serves plain prompt tuning instead (`PromptTuningModel`: the full base, each
task's stage-1 prompt), the baseline the skeletons are measured against. A prompt is an input, so its
passes may mix tasks: all requests join one FIFO (the queue `*`), up to `max_batch` examples a pass.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import deque
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException

from skeleton_ds.errors import UserError

if TYPE_CHECKING:  # importing the model pulls in torch; the batcher and the HTTP layer do not need it
    from skeleton_ds.multitask import MultiTaskModel, PromptTuningModel
    from skeleton_ds.tasks import Example

    ServedModel = MultiTaskModel | PromptTuningModel

Predict = Callable[[str, "list[Example]"], "list[dict]"]
UNKNOWN_TASK = "-"  # the metrics label of requests that name no registered task (bounded label values)
MIXED = "*"  # the one queue (and batch metrics label) of a model whose passes mix tasks


# -------------------------------------------------------------------- batching
@dataclass
class _Request:
    examples: list[Example]
    future: Future
    enqueued: float  # time.monotonic()


@dataclass
class _Queue:
    requests: deque[_Request] = field(default_factory=deque)
    examples: int = 0


class Batcher:
    """Merges concurrent requests for one task into one `predict` call, from one worker thread.

    Policy: per-task FIFO queues; the worker serves the ready tasks round-robin, at most `max_batch`
    examples of one task per turn (whole requests; a larger request alone). A task is ready when it
    has `max_batch` examples waiting or its oldest request is `max_wait_s` old, so a lone request
    waits at most `max_wait_s` and a burst on one task cannot starve another. With `batching=False`
    every request is its own call and is ready at once (the comparison baseline).

    `predict` is only ever called from the worker thread. An exception there fails that call's
    requests only; the worker goes on. `on_batch(task, examples, seconds)` is told about every call.
    """

    def __init__(self, predict: Predict, *, max_batch: int = 32, max_wait_s: float = 0.005, batching: bool = True,
                 on_batch: Callable[[str, int, float], None] | None = None):
        self._predict, self._on_batch = predict, on_batch
        self.max_batch, self.max_wait_s, self.batching = max_batch, max_wait_s, batching
        self._queues: dict[str, _Queue] = {}  # insertion order is the round-robin order
        self._turn = 0  # index in the round-robin order where the next search starts
        self._cond = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="skeleton-ds-batcher", daemon=True)
        self._worker.start()

    def submit(self, task: str, examples: Sequence[Example]) -> Future:
        """Queue one request; the future gets its predictions, in order, or the exception of its pass."""
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            queue = self._queues.setdefault(task, _Queue())
            queue.requests.append(_Request(list(examples), future, time.monotonic()))
            queue.examples += len(examples)
            self._cond.notify()
        return future

    def alive(self) -> bool:
        return self._worker.is_alive()

    def close(self) -> None:
        """Stop the worker after its current pass; requests still queued fail."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._worker.join()
        for queue in self._queues.values():
            for request in queue.requests:
                if request.future.set_running_or_notify_cancel():
                    request.future.set_exception(RuntimeError("the server shut down before answering"))

    # ------------------------------------------------------------ the worker
    def _run(self) -> None:
        while (turn := self._next_turn()) is not None:
            task, requests = turn
            examples = [e for r in requests for e in r.examples]
            start = time.perf_counter()
            try:
                predictions = self._predict(task, examples)
                if len(predictions) != len(examples):
                    raise RuntimeError(f"the model returned {len(predictions)} predictions for {len(examples)} inputs")
            except Exception as e:  # noqa: BLE001 - the batch's requests get it; the worker must survive
                for r in requests:
                    r.future.set_exception(e)
                continue
            finally:
                if self._on_batch is not None:
                    self._on_batch(task, len(examples), time.perf_counter() - start)
            offset = 0
            for r in requests:
                r.future.set_result(predictions[offset:offset + len(r.examples)])
                offset += len(r.examples)

    def _next_turn(self) -> tuple[str, list[_Request]] | None:
        """Wait until a task is ready; take its turn. None once closed."""
        with self._cond:
            while not self._closed:
                now, wake = time.monotonic(), None
                names = list(self._queues)
                for k in range(len(names)):
                    index = (self._turn + k) % len(names)
                    queue = self._queues[names[index]]
                    if not queue.requests:
                        continue
                    deadline = queue.requests[0].enqueued + self.max_wait_s
                    if not self.batching or queue.examples >= self.max_batch or now >= deadline:
                        self._turn = index + 1
                        requests = self._take(queue)
                        if requests:
                            return names[index], requests
                        continue  # all were cancelled
                    wake = deadline if wake is None else min(wake, deadline)
                self._cond.wait(None if wake is None else wake - now)
        return None

    def _take(self, queue: _Queue) -> list[_Request]:
        """Whole requests from the head, up to max_batch examples (at least one request; one when not batching).
        Requests whose caller has gone (cancelled futures) are dropped."""
        taken: list[_Request] = []
        size = 0
        while queue.requests:
            head = queue.requests[0]
            if taken and (not self.batching or size + len(head.examples) > self.max_batch):
                break
            queue.requests.popleft()
            queue.examples -= len(head.examples)
            if head.future.set_running_or_notify_cancel():
                taken.append(head)
                size += len(head.examples)
        return taken


# --------------------------------------------------------------------- metrics
class Metrics:
    """Prometheus metrics in a registry of their own (never the process-global one), so two servers
    in one process, or a test, each count only their own requests."""

    def __init__(self, model: ServedModel):
        self.registry = CollectorRegistry()
        self.requests = Counter("skeleton_requests", "Classify requests by task and HTTP status",
                                ["task", "status"], registry=self.registry)
        self.latency = Histogram("skeleton_request_seconds", "Classify request latency, body read to answer",
                                 ["task"], registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.batch_size = Histogram("skeleton_batch_size", "Examples per forward pass (merged requests)",
                                    ["task"], registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.batch_seconds = Histogram("skeleton_batch_seconds", "Seconds per forward pass", ["task"],
                                       registry=self.registry,
                                       buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.registry.register(_CacheCollector(model))

    def observe_request(self, task: str, status: int, seconds: float) -> None:
        self.requests.labels(task, str(status)).inc()
        self.latency.labels(task).observe(seconds)

    def observe_batch(self, task: str, examples: int, seconds: float) -> None:
        self.batch_size.labels(task).observe(examples)
        self.batch_seconds.labels(task).observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _CacheCollector:
    """The model's cache counters and memory, read at scrape time (the model owns them)."""

    def __init__(self, model: ServedModel):
        self.model = model

    def collect(self) -> Iterator:
        stats = self.model.cache_stats()
        for what in ("hits", "misses", "evictions"):
            family = CounterMetricFamily(f"skeleton_cache_{what}", f"Task model cache {what}", labels=["task"])
            for task, s in stats.items():
                family.add_metric([task], getattr(s, what))
            yield family
        memory = self.model.memory()
        resident = GaugeMetricFamily("skeleton_resident_bytes", "Bytes held: the shared base, and the cached tasks' own",
                                     labels=["part"])
        resident.add_metric(["shared"], memory["shared_bytes"])
        resident.add_metric(["cache"], memory["cache_bytes"])
        yield resident
        if memory["cache_budget"] is not None:  # plain prompt tuning has no cache: every prompt is resident
            yield GaugeMetricFamily("skeleton_cache_budget_bytes", "The cache's byte budget (--cache-bytes)",
                                    value=memory["cache_budget"])
        per_task = GaugeMetricFamily("skeleton_task_resident_bytes", "Bytes a cached task owns", labels=["task"])
        for task, size in memory["tasks"].items():
            per_task.add_metric([task], size)
        yield per_task


# ------------------------------------------------------------------- HTTP app
@dataclass(frozen=True)
class ServeSettings:
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_inputs: int = 256
    max_body_bytes: int = 1 << 20
    batching: bool = True

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_inputs", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise UserError(f"--max-wait-ms must be zero or positive, got {self.max_wait_ms}")


class ApiError(Exception):
    """A request the server refuses: its HTTP status and the message the client reads."""

    def __init__(self, status: int, message: str, task: str = UNKNOWN_TASK):
        super().__init__(message)
        self.status, self.task = status, task


def _queues(model: ServedModel) -> tuple[Predict, Callable[[str, list], tuple[str, list]]]:
    """What runs one pass, and which queue a request joins with what: a queue per task, its examples;
    or, for a model whose passes mix tasks (plain prompt tuning), one queue of (task, example) pairs."""
    if not getattr(model, "mixes_tasks", False):
        return model.predict, lambda task, examples: (task, examples)

    def predict(_queue: str, tagged: list) -> list[dict]:
        return model.predict_mixed(tagged)

    return predict, lambda task, examples: (MIXED, [(task, e) for e in examples])


def create_app(model: ServedModel, settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The FastAPI app; its batcher (app.state.batcher) starts now and stops when the app shuts down."""
    metrics = Metrics(model)
    predict, enqueue = _queues(model)
    batcher = Batcher(predict, max_batch=settings.max_batch, max_wait_s=settings.max_wait_ms / 1000,
                      batching=settings.batching, on_batch=metrics.observe_batch)
    names = list(model.task_names())

    @asynccontextmanager
    async def lifespan(_app):
        yield
        batcher.close()

    app = FastAPI(title="skeleton_ds", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher, app.state.metrics, app.state.model = batcher, metrics, model

    @app.exception_handler(HTTPException)  # unknown path, wrong method: the same {"error"} body as ours
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": f"{exc.detail}: {request.method} {request.url.path}"}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=422)

    @app.post("/v1/classify")
    async def classify(request: Request) -> JSONResponse:
        start, task = time.perf_counter(), UNKNOWN_TASK
        try:
            task, inputs = _parse_request(await _read_body(request, settings.max_body_bytes), names, settings)
            examples = _examples(model, task, inputs)  # pure Python, no lock, at most --max-inputs records
            status, payload = 200, {"predictions": await asyncio.wrap_future(batcher.submit(*enqueue(task, examples)))}
        except ApiError as e:
            task, status, payload = e.task, e.status, {"error": str(e)}
        except Exception as e:  # noqa: BLE001 - inside the forward pass: this request fails, the server serves on
            status, payload = 500, {"error": f"prediction failed: {type(e).__name__}: {e}"}
        metrics.observe_request(task, status, time.perf_counter() - start)
        return JSONResponse(payload, status_code=status)

    @app.get("/v1/tasks")
    def tasks() -> dict:  # a plain def: FastAPI runs it in a thread, off the event loop
        return {"tasks": model.describe(), "memory": model.memory()}

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        ok = batcher.alive()
        return JSONResponse({"status": "ok" if ok else "worker stopped", "tasks": len(names)},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    def metrics_text() -> Response:
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) before it is parsed when Content-Length says it is too large, or when the
    bytes actually read grow past it (a chunked body, which declares no length)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, f"Content-Length {declared!r} is not a number")
        if int(declared) > limit:
            raise ApiError(413, f"the request body is {int(declared)} bytes; this server takes at most {limit} "
                                f"(--max-body-bytes)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is over {limit} bytes, the most this server takes (--max-body-bytes)")
    return bytes(body)


def _parse_request(body: bytes, names: list[str], settings: ServeSettings) -> tuple[str, list]:
    """400 for a body that is not {"task": str, "inputs": list}, 404 for an unknown task, 422 for no
    inputs, 413 for too many; the records themselves are the model's to check (422)."""
    try:
        request = json.loads(body)
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(request, dict):
        raise ApiError(400, 'the request body must be a JSON object {"task": ..., "inputs": [...]}')
    task, inputs = request.get("task"), request.get("inputs")
    if not isinstance(task, str):
        raise ApiError(400, f'"task" must be a task name (a string), got {_kind(task)}; tasks: {", ".join(names)}')
    if task not in names:
        raise ApiError(404, f"unknown task {task!r}: this server answers {', '.join(names)} (GET /v1/tasks)")
    if not isinstance(inputs, list):
        raise ApiError(400, f'"inputs" must be a list of records or strings, got {_kind(inputs)}', task)
    if not inputs:
        raise ApiError(422, '"inputs" is empty: give at least one record or string', task)
    if len(inputs) > settings.max_inputs:
        raise ApiError(413, f"{len(inputs)} inputs in one request; this server takes at most {settings.max_inputs} "
                            f"(--max-inputs): split the request", task)
    return task, inputs


def _examples(model: ServedModel, task: str, inputs: list) -> list[Example]:
    try:
        return model.parse_inputs(task, inputs)
    except UserError as e:
        raise ApiError(422, str(e), task) from None
    except KeyError:
        raise ApiError(404, f"unknown task {task!r} (GET /v1/tasks)") from None


def _kind(value: object) -> str:
    return "nothing" if value is None else f"a JSON {type(value).__name__.replace('dict', 'object').replace('str', 'string')}"


# ----------------------------------------------------------------- running it
def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a port in use fails at once, in one line.
    Port 0 takes a free port (the address printed at start names it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}): pick another --port or --host") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run(app, sock: socket.socket, log_level: str = "warning") -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM shut down gracefully)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False))
    server.run(sockets=[sock])
