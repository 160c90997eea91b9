"""HTTP serving of many task skeletons on one base model (`skeleton-ds serve`), with dynamic batching.

    skeleton-ds serve --base minilm --task-dir runs/minilm-sst2 --task-dir runs/minilm-rte --port 8000
    curl -s localhost:8000/v1/classify -d '{"task": "sst2", "inputs": ["a gripping, funny film"]}'

Endpoints: `POST /v1/classify` ({"task", "inputs"} -> {"predictions": [{"label", "probabilities"}]}),
`GET /v1/tasks` (the registered tasks and memory), `GET /healthz`, `GET /metrics` (Prometheus text).
A bad request gets a 4xx and `{"error": "..."}`, and the server goes on serving.

Why a batcher: a forward pass over 32 examples costs far less than 32 passes over one, so concurrent
requests are merged into one pass. With many tasks and a long-tail load, one task's queue rarely holds
more than one request, so by default (`--batching cross-task`) a pass mixes tasks: the shared modules run
once over all its rows and each task's sliced projections on its own rows (skeleton_ds.serving.cross_task). The
policy (`Batcher`) in README words: **one worker runs every forward pass; each task has a FIFO
queue; a pass takes whole requests round-robin across the waiting tasks, one request per task per round,
up to `--max-batch` examples in all, so every waiting task gets a share of each pass.** A pass starts when
`--max-batch` examples wait or the oldest request has waited `--max-wait-ms`; a request is never split,
and one larger than `--max-batch` runs alone. `--batching per-task` keeps one task per pass (tasks take
turns), `--batching off` runs every request alone: the comparisons.

Under overload the server refuses rather than queueing without bound: at most `--max-queue` examples
wait (a request beyond gets 503 with Retry-After), and a request not answered within `--timeout-ms` gets
504 and is withdrawn. `/healthz` fails (503) when the worker has stopped or one pass has run longer than
`--stall-s`. A failure inside a pass answers 500 with an incident id; the details go to the server log.

Which thread runs the passes: `run` serves HTTP from a second thread and runs the passes on the main
thread, the one that loaded the model. libgomp keeps one pool of OpenMP threads per thread that starts a
parallel region; a second pool on the same cores counts as more threads than CPUs, and libgomp then
spins only briefly before it puts a worker to sleep, so every small operator paid a futex wake. Passes run
from a fresh thread measured 1.9x slower than from the main thread (docs/results/profile_server.json).

`--mode prompt-tuning` serves plain prompt tuning instead (`PromptTuningModel`: the full base, each
task's stage-1 prompt), the baseline the skeletons are measured against; its passes mix tasks the same way.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import signal
import socket
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from collections.abc import Callable, Iterator, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException

from skeleton_ds.errors import UserError
from skeleton_ds.serving.mix_rule import LOAD_WEIGHT, MixRule
from skeleton_ds.serving.settings import MIX_RULES, POLICIES, ServeSettings  # noqa: F401 - ServeSettings: API

if TYPE_CHECKING:  # importing the model pulls in torch; the batcher and the HTTP layer do not need it
    from skeleton_ds.serving.baselines import PromptTuningModel, SeparateCompactModels
    from skeleton_ds.serving.multitask import MultiTaskModel
    from skeleton_ds.tasks import Example

    ServedModel = MultiTaskModel | PromptTuningModel | SeparateCompactModels

Predict = Callable[[str, "list[Example]"], "list[dict]"]
UNKNOWN_TASK = "-"  # the metrics label of requests that name no registered task (bounded label values)
MIXED = "*"  # the batch metrics label of a pass that mixes tasks
LOG = logging.getLogger("skeleton_ds.serving.server")


# -------------------------------------------------------------------- batching


class Overloaded(Exception):
    """The queue is full: the request is refused at once (503), with when to retry."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Expired(Exception):
    """A request reached its deadline before its pass ran: dropped unrun, answered 504."""


@dataclass
class _Request:
    task: str
    examples: list[Example]
    future: Future
    enqueued: float  # time.monotonic()
    deadline: float = math.inf  # past it the caller has been answered 504: never computed

    def expired(self, now: float) -> bool:
        return now >= self.deadline


@dataclass
class _Queue:
    requests: deque[_Request] = field(default_factory=deque)
    examples: int = 0


class Batcher:
    """Merges concurrent requests into passes of at most `max_batch` examples, from one worker thread.

    Each task has a FIFO queue. Policies:
    - "cross-task": a pass takes whole requests round-robin across the tasks that have any, one request per
      task per round, until `max_batch` examples; `predict(MIXED, [(task, example), ...])` runs it. Every
      waiting task gets a share of each pass, so a burst on one task delays another by at most one pass.
      With fewer than `mix_min` examples waiting (light load), the task with the oldest request runs alone
      instead (`predict(task, examples)`): a mixed pass of a few rows from as many tasks costs as much per row
      as one-task passes, and holds every row until the slowest finishes. From `mix_min` waiting, `mix_by`
      "count" always mixes; "cost" mixes while mixed passes serve rows in fewer busy seconds per row than
      one-task passes under the load now, each way measured in its own steady state and measured again from
      time to time (mix_rule.MixRule). Whether mixing pays depends on the model and the tasks: measured, it
      does for MiniLM tasks of one length and not for SmolLM2's tasks of mixed lengths.
    - "per-task": a pass holds one task's requests; the ready tasks take turns (round-robin), so a burst on
      one task delays another by at most one pass per busy task. `predict(task, examples)`.
    - "off": every request is its own pass, at once (the comparison baseline).
    A pass starts when `max_batch` examples are waiting (for its task, per-task) or the oldest request has
    waited `max_wait_s`, so a lone request waits at most that. A request larger than `max_batch` runs alone.

    Overload: at most `max_queue` examples wait (0: no bound); `submit` refuses more with `Overloaded`, whose
    retry hint is the time the queue takes to drain at the measured rate. A caller that stops waiting cancels
    its future, and the worker drops it unrun; a request past its deadline (`timeout_s` after it was queued,
    when the caller answers 504) is dropped too, also from a pass taken but not yet run, so no pass computes
    for a client that has gone (`expired` counts them). `predict` is only ever called from the worker thread; an
    exception there fails that pass's requests only, and the worker goes on. `on_batch(task, examples,
    seconds)` is told about every pass.

    The worker is the batcher's own thread, or with `thread=False` whichever thread calls `work()` (it
    returns once `close()` is called): `run` gives it the main thread, where the model's OpenMP pool lives.
    """

    def __init__(self, predict: Predict, *, max_batch: int = 32, max_wait_s: float = 0.005, policy: str = "per-task",
                 max_queue: int = 0, on_batch: Callable[[str, int, float], None] | None = None,
                 timeout_s: float = math.inf, thread: bool = True, mix_min: int = 0, mix_by: str = "count"):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if mix_by not in MIX_RULES:
            raise ValueError(f"mix_by must be one of {MIX_RULES}, got {mix_by!r}")
        self._predict, self._on_batch = predict, on_batch
        self.max_batch, self.max_wait_s, self.policy, self.max_queue = max_batch, max_wait_s, policy, max_queue
        self.timeout_s = timeout_s
        self.mix_min = mix_min  # cross-task: fewer examples waiting than this, and the oldest task runs alone
        self.mix_by = mix_by
        self.mix_rule = MixRule()  # mix_by "cost": which way serves rows faster, measured while serving
        self.load = 0.0  # a moving average of the rows in the server (waiting or running) as each request arrives
        self._running = 0  # rows of the pass now running
        self.expired = 0  # requests dropped unrun past their deadline
        self._queues: dict[str, _Queue] = {}  # insertion order is the round-robin order
        self._turn = 0  # index in the round-robin order where the next search starts
        self._waiting = 0  # examples queued, all tasks
        self._seconds_per_example = 0.0  # a running mean over passes, for the retry hint
        self._busy_since: float | None = None  # when the pass now running started
        self._cond = threading.Condition()
        self._closed = False
        self._working, self._stopped = threading.Event(), threading.Event()
        self._working_thread: threading.Thread | None = None
        self._worker = threading.Thread(target=self.work, name="skeleton-ds-batcher", daemon=True) if thread else None
        if self._worker is not None:
            self._worker.start()

    def submit(self, task: str, examples: Sequence[Example]) -> Future:
        """Queue one request; the future gets its predictions, in order, or the exception of its pass.
        Raises Overloaded when the queue is full."""
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            if self.max_queue and self._waiting + len(examples) > self.max_queue:
                retry = max(1, math.ceil(self._waiting * self._seconds_per_example))
                raise Overloaded(f"the server is at capacity ({self._waiting} examples queued, at most "
                                 f"{self.max_queue}): retry after {retry} s", retry)
            queue = self._queues.setdefault(task, _Queue())
            now = time.monotonic()
            queue.requests.append(_Request(task, list(examples), future, now, now + self.timeout_s))
            queue.examples += len(examples)
            self._waiting += len(examples)
            self.load += LOAD_WEIGHT * (self._waiting + self._running - self.load)
            self._cond.notify()
        return future

    def alive(self) -> bool:
        """The worker has not stopped (with thread=False, also before `work()` is first called)."""
        return not self._stopped.is_set()

    def worker_thread(self) -> str | None:
        """The name of the thread that runs the passes (None before it starts)."""
        return None if self._working_thread is None else self._working_thread.name

    @property
    def own_thread(self) -> bool:
        """Whether the passes run on the batcher's own thread (else on the caller of `work()`)."""
        return self._worker is not None

    def busy_seconds(self) -> float:
        """How long the pass now running has run (0 when idle): a stalled worker shows here."""
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - since

    @property
    def measures_mixing(self) -> bool:
        """Whether the mix rule chooses the passes (cross-task batching by cost), so is told of each pass run."""
        return self.policy == "cross-task" and self.mix_by == "cost"

    def waiting(self) -> int:
        return self._waiting

    def close(self) -> None:
        """Stop the worker after its current pass; requests still queued fail. Safe to call twice."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._worker is not None:
            self._worker.join()
        elif self._working.is_set() and threading.current_thread() is not self._working_thread:
            self._stopped.wait()
        with self._cond:
            left = [r for queue in self._queues.values() for r in queue.requests]
            for queue in self._queues.values():
                queue.requests.clear()
                queue.examples = 0
            self._waiting = 0
        for request in left:
            if request.future.set_running_or_notify_cancel():
                request.future.set_exception(RuntimeError("the server shut down before answering"))

    def work(self) -> None:
        """Run passes until `close()`: the worker loop, on the batcher's own thread or (thread=False) the caller's."""
        self._working_thread = threading.current_thread()
        self._working.set()
        try:
            self._run()
        finally:
            self._stopped.set()

    # ------------------------------------------------------------ the worker
    def _run(self) -> None:
        while (turn := self._next_turn()) is not None:
            task, requests = turn
            requests = self._unexpired(requests)
            if not requests:
                continue
            mixed = task == MIXED
            examples = [(r.task, e) if mixed else e for r in requests for e in r.examples]
            start = self._busy_since = time.monotonic()
            self._running = len(examples)
            try:
                predictions = self._predict(task, examples)
                if len(predictions) != len(examples):
                    raise RuntimeError(f"the model returned {len(predictions)} predictions for {len(examples)} inputs")
            except Exception as e:  # noqa: BLE001 - the batch's requests get it; the worker must survive
                for r in requests:
                    r.future.set_exception(e)
                continue
            finally:
                seconds, self._busy_since, self._running = time.monotonic() - start, None, 0
                per = seconds / max(1, len(examples))
                self._seconds_per_example = 0.8 * self._seconds_per_example + 0.2 * per
                if self.measures_mixing:
                    self.mix_rule.observe(mixed, len(examples), seconds)
                if self._on_batch is not None:
                    self._on_batch(task, len(examples), seconds)
            offset = 0
            for r in requests:
                r.future.set_result(predictions[offset:offset + len(r.examples)])
                offset += len(r.examples)

    def _next_turn(self) -> tuple[str, list[_Request]] | None:
        """Wait until a pass is ready; take it. None once closed."""
        with self._cond:
            while not self._closed:
                turn, wake = self._ready(time.monotonic())
                if turn is not None:
                    return turn
                self._cond.wait(None if wake is None else max(0.0, wake - time.monotonic()))
        return None

    def _ready(self, now: float) -> tuple[tuple[str, list[_Request]] | None, float | None]:
        """The pass to run now, if one is ready; else when to look again (None: when a request arrives)."""
        names = [n for n in self._queues if self._queues[n].requests]
        if not names:
            return None, None
        if self.policy == "cross-task":
            oldest = min(self._queues[n].requests[0].enqueued for n in names)
            if self._waiting < self.max_batch and now < oldest + self.max_wait_s:
                return None, oldest + self.max_wait_s
            if self._waiting < self.mix_min or not self._mixing_pays(len(names)):  # light load, or mixing costs more
                name = min(names, key=lambda n: self._queues[n].requests[0].enqueued)
                requests = self._take(self._queues[name], self.max_batch)
                return ((name, requests) if requests else None), None
            requests = self._take_round_robin()
            return ((MIXED, requests) if requests else None), None
        order = list(self._queues)
        wake = None
        for k in range(len(order)):
            index = (self._turn + k) % len(order)
            queue = self._queues[order[index]]
            if not queue.requests:
                continue
            deadline = queue.requests[0].enqueued + self.max_wait_s
            if self.policy == "off" or queue.examples >= self.max_batch or now >= deadline:
                self._turn = index + 1
                requests = self._take(queue, self.max_batch if self.policy == "per-task" else 0)
                if requests:
                    return (order[index], requests), None
                continue  # all were cancelled
            wake = deadline if wake is None else min(wake, deadline)
        return None, wake

    def _mixing_pays(self, tasks: int) -> bool:
        """Whether the next pass, with rows of `tasks` tasks waiting, mixes them: always (mix_by "count"), or as
        the measurements of the mix rule say (mix_by "cost")."""
        return self.mix_by == "count" or self.mix_rule.mix(tasks, self.load)

    def _unexpired(self, requests: list[_Request]) -> list[_Request]:
        """A taken pass less the requests whose deadline has passed since (their callers are answered 504)."""
        now = time.monotonic()
        kept = [r for r in requests if not r.expired(now)]
        for r in requests:
            if r.expired(now):
                self._expire(r, running=True)
        return kept

    def _expire(self, request: _Request, *, running: bool) -> None:
        """Fail a request past its deadline with Expired (its caller answers 504), never computing it."""
        if running or request.future.set_running_or_notify_cancel():
            self.expired += 1
            request.future.set_exception(Expired("past its deadline before its pass ran"))

    def _pop(self, queue: _Queue) -> _Request | None:
        """The head request, or None when its caller has gone (a cancelled future, or past its deadline):
        dropped unrun."""
        head = queue.requests.popleft()
        queue.examples -= len(head.examples)
        self._waiting -= len(head.examples)
        if head.expired(time.monotonic()):
            self._expire(head, running=False)
            return None
        return head if head.future.set_running_or_notify_cancel() else None

    def _take(self, queue: _Queue, limit: int) -> list[_Request]:
        """Whole requests from one queue's head, up to `limit` examples (at least one request; 0: exactly one)."""
        taken: list[_Request] = []
        size = 0
        while queue.requests:
            if taken and (not limit or size + len(queue.requests[0].examples) > limit):
                break
            if (head := self._pop(queue)) is not None:
                taken.append(head)
                size += len(head.examples)
        return taken

    def _take_round_robin(self) -> list[_Request]:
        """One request per task per round, tasks in turn from where the last pass stopped, up to max_batch."""
        order, start = list(self._queues), self._turn
        taken: list[_Request] = []
        size, progress = 0, True
        while progress:
            progress = False
            for k in range(len(order)):
                index = (start + k) % len(order)
                queue = self._queues[order[index]]
                now = time.monotonic()
                while queue.requests and (queue.requests[0].future.done() or queue.requests[0].expired(now)):
                    self._pop(queue)  # the caller has gone
                if not queue.requests or (taken and size + len(queue.requests[0].examples) > self.max_batch):
                    continue
                if (head := self._pop(queue)) is not None:
                    taken.append(head)
                    size += len(head.examples)
                    progress = True
                    self._turn = index + 1
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

    def watch_batcher(self, batcher: Batcher) -> None:
        """What the batcher counts, read at each scrape: skeleton_requests_expired_total (requests dropped unrun
        past their deadline: work not done for a client already answered 504) and, under cross-task batching by
        cost, what the mix rule measured (skeleton_mix_seconds_per_row by way, skeleton_mix_probes_total)."""
        self.registry.register(_BatcherCollector(batcher))

    def observe_request(self, task: str, status: int, seconds: float) -> None:
        self.requests.labels(task, str(status)).inc()
        self.latency.labels(task).observe(seconds)

    def observe_batch(self, task: str, examples: int, seconds: float) -> None:
        self.batch_size.labels(task).observe(examples)
        self.batch_seconds.labels(task).observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _BatcherCollector:
    def __init__(self, batcher: Batcher):
        self.batcher = batcher

    def collect(self) -> Iterator:
        family = CounterMetricFamily("skeleton_requests_expired", "Requests dropped unrun past their --timeout-ms "
                                     "deadline")
        family.add_metric([], self.batcher.expired)
        yield family
        if not self.batcher.measures_mixing:
            return
        rule = self.batcher.mix_rule
        yield CounterMetricFamily("skeleton_mix_probes", "Times the mix rule started probing both ways",
                                  value=rule.epochs)
        cost = GaugeMetricFamily("skeleton_mix_seconds_per_row", "Busy seconds per row each way served in the "
                                 "mix rule's last probe of it", labels=["way"])
        for mixed, way in ((True, "mixed"), (False, "one-task")):
            if mixed in rule.cost:
                cost.add_metric([way], rule.cost[mixed])
        yield cost


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
        resident = GaugeMetricFamily("skeleton_resident_bytes",
                                     "Bytes held: the shared base, and the cached tasks' own", labels=["part"])
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
class ApiError(Exception):
    """A request the server refuses: its HTTP status, the message the client reads, and any headers."""

    def __init__(self, status: int, message: str, task: str = UNKNOWN_TASK, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.task, self.headers = status, task, headers


def _predict(model: ServedModel, policy: str) -> Predict:
    """What runs one pass: the model's mixed pass for cross-task batching, else its one-task pass."""
    if policy != "cross-task":
        return model.predict
    if not getattr(model, "mixes_tasks", False):
        raise UserError("this model cannot mix tasks in one pass: build it with MultiTaskModel(..., mix_tasks=True), "
                        "or serve with --batching per-task")

    def predict(queue: str, examples: list) -> list[dict]:
        if queue != MIXED:  # a one-task pass (Batcher.mix_min, mix_by): the task's own model, no routing
            return model.predict(queue, examples)
        return model.predict_mixed(examples)

    return predict


def create_app(model: ServedModel, settings: ServeSettings = ServeSettings(), *,
               batcher_thread: bool = True) -> FastAPI:
    """The FastAPI app; its batcher (app.state.batcher) stops when the app shuts down. It starts now on its
    own thread, or with batcher_thread=False when `run` gives it the calling (main) thread."""
    metrics = Metrics(model)
    batcher = Batcher(_predict(model, settings.batching), max_batch=settings.max_batch,
                      max_wait_s=settings.max_wait_ms / 1000, policy=settings.batching, max_queue=settings.max_queue,
                      on_batch=metrics.observe_batch, timeout_s=settings.timeout_ms / 1000, thread=batcher_thread,
                      mix_min=settings.mix_min, mix_by=settings.mix_by)
    metrics.watch_batcher(batcher)
    names = list(model.task_names())

    @asynccontextmanager
    async def lifespan(_app):
        yield
        batcher.close()

    app = FastAPI(title="skeleton_ds", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher, app.state.metrics, app.state.model = batcher, metrics, model

    if settings.api_key is not None:
        expected = f"Bearer {settings.api_key}".encode()

        @app.middleware("http")
        async def require_key(request: Request, call_next):
            """Every route but /healthz needs the key; a missing or wrong one is refused before the body is read
            or anything is queued. Compared in constant time (hmac.compare_digest)."""
            given = request.headers.get("authorization", "").encode()
            if request.url.path != "/healthz" and not hmac.compare_digest(given, expected):
                return JSONResponse({"error": "missing or wrong API key: send 'Authorization: Bearer <key>' (the "
                                              "server's --api-key or SKELETON_DS_API_KEY)"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
            return await call_next(request)

    @app.exception_handler(HTTPException)  # unknown path, wrong method: the same {"error"} body as ours
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": f"{exc.detail}: {request.method} {request.url.path}"},
                            status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=422)

    @app.post("/v1/classify")
    async def classify(request: Request) -> JSONResponse:
        start, task, headers = time.perf_counter(), UNKNOWN_TASK, None
        try:
            task, inputs = _parse_request(await _read_body(request, settings.max_body_bytes), names, settings)
            examples = _examples(model, task, inputs)  # pure Python, no lock, at most --max-inputs records
            status, payload = 200, {"predictions": await _answer(batcher, task, examples, settings.timeout_ms)}
        except ApiError as e:
            task, status, payload, headers = e.task, e.status, {"error": str(e)}, e.headers
        except Exception:  # noqa: BLE001 - inside the forward pass: this request fails, the server serves on
            incident = uuid.uuid4().hex[:12]
            LOG.exception("prediction failed (incident %s, task %s)", incident, task)
            status, payload = 500, {"error": f"prediction failed (incident {incident}, in the server log)"}
        metrics.observe_request(task, status, time.perf_counter() - start)
        return JSONResponse(payload, status_code=status, headers=headers)

    @app.get("/v1/tasks")
    def tasks() -> dict:  # a plain def: FastAPI runs it in a thread, off the event loop
        return {"tasks": model.describe(), "memory": model.memory()}

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        busy = batcher.busy_seconds()
        if not batcher.alive():
            status = "worker stopped"
        elif busy > settings.stall_s:
            status = f"worker stalled: one pass has run {busy:.0f} s (--stall-s {settings.stall_s:g})"
        else:
            status = "ok"
        return JSONResponse({"status": status, "tasks": len(names), "queued_examples": batcher.waiting(),
                             "pass_seconds": round(busy, 3), "worker_thread": batcher.worker_thread()},
                            status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    def metrics_text() -> Response:
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _answer(batcher: Batcher, task: str, examples: list, timeout_ms: float) -> list[dict]:
    """The request's predictions; 503 (with Retry-After) when the queue is full, 504 past its deadline (the
    request is then withdrawn: the worker drops it unrun if it has not started)."""
    try:
        future = batcher.submit(task, examples)
    except Overloaded as e:
        raise ApiError(503, str(e), task, {"Retry-After": str(e.retry_after_s)}) from None
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout_ms / 1000)
    except (asyncio.TimeoutError, Expired):
        future.cancel()
        raise ApiError(504, f"no answer within {timeout_ms:g} ms (--timeout-ms): the server is busy, retry later",
                       task) from None


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
            raise ApiError(413, f"the request body is over {limit} bytes, "
                                f"the most this server takes (--max-body-bytes)")
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
    return ("nothing" if value is None
            else f"a JSON {type(value).__name__.replace('dict', 'object').replace('str', 'string')}")


# ----------------------------------------------------------------- running it
def is_loopback(host: str) -> bool:
    """Whether `host` binds to this machine only (a name is resolved; one that does not resolve counts as not)."""
    import ipaddress

    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


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
    """Serve until interrupted (Ctrl-C / SIGTERM shut down gracefully). An app made with
    batcher_thread=False runs its passes on this thread, which must be the main thread (the one that
    loaded the model), and HTTP on another (why: the module docstring)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False))
    batcher: Batcher = app.state.batcher
    if batcher.own_thread:
        server.run(sockets=[sock])
        return
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("run() drives the batcher's passes on the main thread: call it from there")

    def stop(signum: int, _frame) -> None:  # what uvicorn does in the main thread: graceful, then forced
        server.force_exit = server.should_exit and signum == signal.SIGINT
        server.should_exit = True

    def serve_http() -> None:
        try:
            server.run(sockets=[sock])
        finally:
            batcher.close()  # the lifespan closes it too; this covers an HTTP side that failed to start

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    http = threading.Thread(target=serve_http, name="skeleton-ds-http", daemon=True)
    http.start()
    try:
        batcher.work()  # returns when the app shuts down
    finally:
        server.should_exit = True
        http.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
