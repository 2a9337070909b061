"""The controller's HTTP API (FastAPI): runs, evaluations -> DDK weights, history, progress, SSE push, metrics,
page.

A thin layer over :mod:`ddk.controller.store` (state, transactions, and the one check of an evaluation against
its run, ``spec.check_evaluation``) and :mod:`ddk.controller.policies` (the math). Contract: docs/api.md.

Errors are always JSON ``{"detail": "<field>: <why>"}``: 404 unknown run, 409 conflicting spec or old step,
422 bad input (including NaN/Infinity, which Python's JSON parser would otherwise accept), 413 bodies over
the limit, 401/403 for writes without / with a wrong bearer token.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, get_type_hints

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, create_model
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ddk.controller import policies
from ddk.controller.spec import MAX_STEPS, DomainDiagnostics, Invalid, check_run_spec
from ddk.controller.store import Conflict, NotFound, Store
from ddk.vocab import SIGNAL_LABELS, SIGNALS, WeightsVersion

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # 1 MiB: a run spec or an evaluation is a few KB even with hundreds of domains
STATIC = Path(__file__).parent / "static"
WRITE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


# -- request bodies --------------------------------------------------------------------------------------
class RunCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    run_id: str
    domains: list[str]
    policy: str = "ddk"
    alpha: float = 0.5
    interval_steps: int = Field(default=1000, strict=True)
    initial_weights: dict[str, float] | None = None
    policy_params: dict[str, Any] | None = None  # checked by the policy's own model (spec.check_run_spec)
    gap_estimate: str = "raw"  # raw | shrunk, checked by spec.check_run_spec


class ErrorBody(BaseModel):
    """Every error answer: ``{"detail": "<field>: <why>"}`` (declared so the OpenAPI schema says so)."""
    detail: str


# A value the JSON schema documents but this model does not check: the evaluation's values are checked once,
# against the run's domains, by the store (spec.check_evaluation), which names the field in its 422.
_NonNegative = Annotated[Any, WithJsonSchema({"type": "number", "minimum": 0})]


class EvaluationIn(BaseModel):
    """The evaluation body's shape (which keys, objects where objects belong); the values: spec.check_evaluation."""
    model_config = ConfigDict(extra="forbid")
    step: int = Field(strict=True)
    student_loss: dict[str, _NonNegative]
    teacher_loss: dict[str, _NonNegative] | None = None
    tokens: dict[str, _NonNegative] | None = None  # student tokens trained per domain so far (cumulative); optional
    # per domain (any of the run's) the distillation diagnostics, every field optional (issue 14)
    diagnostics: dict[str, Annotated[dict[str, Any], WithJsonSchema(DomainDiagnostics.model_json_schema())]] | None \
        = None
    # per domain (any of the run's) the standard error of log(PPL_S / PPL_T), finite and >= 0 (issue 24)
    log_ratio_se: dict[str, _NonNegative] | None = None
    # what q = exp(student_loss - teacher_loss) measures (ddk.vocab.SIGNALS; mixture.signal); absent: ratio
    signal: Annotated[Any, WithJsonSchema({"type": "string", "enum": list(SIGNALS)})] = None


_Seconds = Annotated[float | None, Field(ge=0)]


class OnPolicyIn(BaseModel):
    """An on-policy step's numbers (issue 28; rank 0's, the trainer's metrics.jsonl ``onpolicy``), every field
    optional: seconds in generation, teacher grading and training the rollout rows, rollout tokens per second of
    generation, the rollout engine's weight version lag (steps) and the mean completion length (tokens) per domain,
    keyed by the run's domains (checked by the store, ``store.check_onpolicy``, which knows them)."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    generation_s: _Seconds = None
    grading_s: _Seconds = None
    training_s: _Seconds = None
    rollout_tokens_per_s: _Seconds = None
    version_lag: int | None = Field(default=None, strict=True, ge=0)
    completion_len: dict[str, Annotated[float, Field(ge=0)]] | None = None


class ProgressIn(BaseModel):
    """A trainer's progress report: the optimiser step reached, of ``total_steps``, and that step's numbers.
    The ranges are checked again by ``spec.check_progress`` (step <= total_steps, which a schema cannot say)."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    step: int = Field(strict=True, ge=0, le=MAX_STEPS)
    total_steps: int = Field(strict=True, ge=1, le=MAX_STEPS)
    loss: float | None = None
    ce: float | None = None
    kl: float | None = None
    tokens_per_s: float | None = Field(default=None, ge=0)
    onpolicy: OnPolicyIn | None = None  # an on-policy step's (kd.on_policy > 0); older trainers leave it out


# -- answers ---------------------------------------------------------------------------------------------
# A weights version, declared for the OpenAPI schema: built from ddk.vocab.WeightsVersion's fields, so the API's
# model and the one type cannot drift apart (pydantic on Python 3.11 does not take a typing.TypedDict itself).
WeightsOut = create_model(
    "WeightsOut", __doc__=WeightsVersion.__doc__,
    **{name: (tp, ...) for name, tp in get_type_hints(WeightsVersion).items()})
# The answer to an evaluation: the new weights version, with ``warning`` only when there is one (the domains' gaps
# within their standard errors: "the mixture is steering by noise; raise eval tokens").
EvaluationOut = create_model("EvaluationOut", __base__=WeightsOut, warning=(str | None, None))


class OnPolicyOut(BaseModel):
    """The on-policy numbers as stored: the fields the report sent (null ones left out)."""
    generation_s: float | None = None
    grading_s: float | None = None
    training_s: float | None = None
    rollout_tokens_per_s: float | None = None
    version_lag: int | None = None
    completion_len: dict[str, float] | None = None


class ProgressOut(BaseModel):
    """The latest progress report of a run, with when the controller received it; ``onpolicy`` only when the
    report had it."""
    step: int
    total_steps: int
    loss: float | None
    ce: float | None
    kl: float | None
    tokens_per_s: float | None
    updated_at: str
    onpolicy: OnPolicyOut | None = None


class LossPoint(BaseModel):
    step: int
    loss: float
    ce: float | None
    kl: float | None


class ProgressView(BaseModel):
    """``GET /v1/runs/{run_id}/progress``: the latest report (null before the first) and the loss curve."""
    latest: ProgressOut | None
    points: list[LossPoint]


# -- the push --------------------------------------------------------------------------------------------
class Broker:
    """Wakes the SSE subscribers (in this process): a run's streams when it has a new version, and the
    all-runs streams (subscribed as ``None``) on any change, new versions, new runs and progress alike.

    A wake-up carries no data: the subscriber reads from the store what is newer than what it sent, so it
    never skips a version even when two evaluations finish out of order. Call it on the event loop's thread.
    """

    def __init__(self) -> None:
        self._subs: dict[str | None, set[asyncio.Event]] = {}

    def subscribe(self, run_id: str | None) -> asyncio.Event:
        ev = asyncio.Event()
        self._subs.setdefault(run_id, set()).add(ev)
        return ev

    def unsubscribe(self, run_id: str | None, ev: asyncio.Event) -> None:
        subs = self._subs.get(run_id, set())
        subs.discard(ev)
        if not subs:
            self._subs.pop(run_id, None)

    def publish(self, run_id: str | None) -> None:
        """A new version of ``run_id`` (its streams and the all-runs ones wake); None: the all-runs ones only."""
        for ev in (*(self._subs.get(run_id, ()) if run_id is not None else ()), *self._subs.get(None, ())):
            ev.set()

    def count(self) -> int:
        return sum(len(s) for s in self._subs.values())


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(weights: WeightsVersion) -> str:
    """One SSE message: the id is the version (so EventSource's Last-Event-ID resumes), data the JSON."""
    return f"id: {weights['version']}\ndata: {json.dumps(weights)}\n\n"


def sse_named(event: str, data: dict) -> str:
    """One named SSE message of the all-runs stream (``event:`` is what EventSource listeners key on)."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def changes(store: Store, before: dict[str, tuple[int, int]]) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """The all-runs stream's messages for what changed since the marks ``before`` (``Store.marks``), and the
    new marks: ``run`` for a new run, ``weights`` per new version, ``progress`` for a new report. The store keeps
    only a run's latest report, so when more than one came since the marks (a trainer reporting faster than the
    stream reads, as under load) the progress message also carries the loss curve as the store keeps it
    (``points``), which a client takes instead of adding the one report's point to its own."""
    after, out = store.marks(), []
    for run_id, (version, seq) in after.items():
        old = before.get(run_id)
        if old is None:  # the run object carries its current weights and status
            run = store.get_run(run_id)
            out.append(sse_named("run", {**run, "status": store.status(run_id, run["weights"], run["created_at"])}))
            continue
        if version == old[0] and seq == old[1]:
            continue
        status = store.status(run_id)
        if version > old[0]:
            for w in store.weights_since(run_id, old[0]):
                out.append(sse_named("weights", {"run_id": run_id, **w, "status": status}))
        if seq == old[1] + 1:
            out.append(sse_named("progress", {"run_id": run_id, **store.latest_progress(run_id), "status": status}))
        elif seq > old[1]:  # reports this stream never sent: their points are only in the stored curve
            progress = store.progress(run_id)
            out.append(sse_named("progress", {"run_id": run_id, **progress["latest"], "status": status,
                                              "points": progress["points"]}))
    return out, after


async def wakeups(wake: asyncio.Event, keepalive_s: float, should_stop: Callable[[], bool]):
    """When an SSE stream should re-read the store: each time it is woken (a publish), and every ``keepalive_s``
    anyway (another process may write the same file). Yields whether a keep-alive is due when nothing is new;
    checks ``should_stop`` every second so that a shutting-down server ends its streams promptly."""
    idle = 0.0
    while not should_stop():
        try:
            await asyncio.wait_for(wake.wait(), timeout=1.0)
        except asyncio.TimeoutError:
            idle += 1.0
            if idle < keepalive_s:
                continue
        wake.clear()
        yield idle >= keepalive_s
        idle = 0.0


# -- middleware ------------------------------------------------------------------------------------------
class Guard:
    """Pure ASGI middleware: bearer token on writes, then the body-size limit.

    Done here rather than as FastAPI dependencies so it runs before the body is parsed: an unauthenticated
    or oversized request is refused without reading (or being confused by) its body.
    """

    def __init__(self, app, token: str | None, max_body: int = MAX_BODY_BYTES):
        self.app, self.token, self.max_body = app, token, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in WRITE_METHODS:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.token is not None:
            auth = headers.get("authorization", "")
            if not auth.lower().startswith("bearer "):
                return await _reply(send, 401, "authorization: this controller needs 'Authorization: Bearer <token>' "
                                               "for writes", {"www-authenticate": "Bearer"})
            if not hmac.compare_digest(auth[7:].strip().encode(), self.token.encode()):
                return await _reply(send, 403, "authorization: wrong token")
        try:
            declared = int(headers.get("content-length", "0"))
        except ValueError:
            return await _reply(send, 400, "content-length: not an integer")
        if declared > self.max_body:
            return await _reply(send, 413, f"body: larger than {self.max_body} bytes")
        # read the whole body (also when chunked), refusing it as soon as it passes the limit, then replay it
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return await _reply(send, 413, f"body: larger than {self.max_body} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _reply(send, status: int, detail: str, headers: dict | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


class CountRequests:
    """Pure ASGI middleware: count requests by method, route template and status for /metrics."""

    def __init__(self, app, counter: Counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "other")
            self.counter.labels(scope["method"], route, str(status["code"])).inc()


# -- the app ---------------------------------------------------------------------------------------------
def create_app(db: str | Path, token: str | None = None, *, keepalive_s: float = 15.0,
               should_stop: Callable[[], bool] = lambda: False) -> FastAPI:
    """Build the controller app on the SQLite file ``db``.

    token:       when set, writes need ``Authorization: Bearer <token>``; reads stay open.
    keepalive_s: SSE keep-alive comment period (also how often a stream re-reads the store, catching
                 versions written by another process on the same file).
    should_stop: polled by open SSE streams so that a shutting-down server ends them promptly.
    """
    store = Store(db)
    broker = Broker()
    registry = CollectorRegistry()
    requests_total = Counter("ddk_controller_requests", "HTTP requests", ["method", "route", "status"],
                             registry=registry)
    Gauge("ddk_controller_sse_subscribers", "open SSE streams", registry=registry).set_function(broker.count)
    registry.register(_StoreCollector(store))

    app = FastAPI(title="ddk controller", version="1",
                  description="DDK domain weights: per-domain losses in, sampling mixture out.",
                  responses={422: {"model": ErrorBody, "description": "Bad input"}})  # not FastAPI's list form
    app.state.store, app.state.broker = store, broker
    _add_error_handlers(app)
    _add_routes(app, store, broker)
    _add_streams(app, store, broker, keepalive_s, should_stop)

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics():
        return PlainTextResponse(generate_latest(registry), media_type="text/plain; version=0.0.4")

    app.add_middleware(Guard, token=token)
    app.add_middleware(CountRequests, counter=requests_total)  # outermost: counts 401/403/413 too
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Errors are always ``{"detail": "<field>: <why>"}``."""
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": _describe(exc.errors())}, status_code=422)

    @app.exception_handler(Invalid)
    async def _invalid(request: Request, exc: Invalid):
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound):
        return JSONResponse({"detail": str(exc.args[0])}, status_code=404)

    @app.exception_handler(Conflict)
    async def _conflict(request: Request, exc: Conflict):
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)


def _add_routes(app: FastAPI, store: Store, broker: Broker) -> None:
    """The JSON endpoints and the page."""
    @app.get("/healthz")
    def healthz():
        store.ping()
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        # the gap column's label per signal: ddk.vocab's one list, written into the page's script
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8")
                            .replace("/*SIGNAL_LABELS*/{}", json.dumps(SIGNAL_LABELS)))

    @app.post("/v1/runs", status_code=201)
    async def create_run(body: RunCreate):
        spec = check_run_spec(body.run_id, body.domains, body.policy, body.alpha, body.interval_steps,
                              body.initial_weights, body.policy_params, body.gap_estimate)
        run, created = await run_in_threadpool(store.create_run, spec)
        if created:
            broker.publish(None)
        return JSONResponse(run, status_code=201 if created else 200)

    @app.get("/v1/policies")
    def list_policies():
        """Every registered policy: ``{"policies": [{"name", "summary", "needs_teacher", "run_fields",
        "params": {name: {"type", "default", "description", bounds...}}}, ...]}``."""
        return {"policies": policies.describe()}

    @app.get("/v1/runs")
    def list_runs():
        """Every run object, each with its ``status`` (state, step of total_steps, updated_at, ...)."""
        return {"runs": store.list_runs(status=True)}

    @app.get("/v1/runs/{run_id}")
    def get_run(run_id: str):
        return store.get_run(run_id)

    @app.post("/v1/runs/{run_id}/evaluations", response_model=EvaluationOut, response_model_exclude_none=True)
    async def post_evaluation(run_id: str, body: EvaluationIn):
        weights = await run_in_threadpool(store.add_evaluation, run_id, body.step, body.student_loss,
                                          body.teacher_loss, body.tokens, body.diagnostics, body.log_ratio_se,
                                          body.signal)
        broker.publish(run_id)
        return weights

    @app.get("/v1/runs/{run_id}/weights", response_model=WeightsOut)
    def get_weights(run_id: str):
        return store.weights(run_id)

    @app.get("/v1/runs/{run_id}/history")
    def history(run_id: str):
        return {"versions": store.history(run_id)}

    # response_model_exclude_unset: ``onpolicy`` (and its fields) only where the store's answer has them
    @app.post("/v1/runs/{run_id}/progress", response_model=ProgressOut, response_model_exclude_unset=True,
              responses={404: {"model": ErrorBody, "description": "Unknown run"}})
    async def post_progress(run_id: str, body: ProgressIn):
        report = body.model_dump()
        if body.onpolicy is not None:  # the fields sent (the store checks them against the run's domains)
            report["onpolicy"] = body.onpolicy.model_dump(exclude_none=True)
        progress = await run_in_threadpool(store.add_progress, run_id, **report)
        broker.publish(None)
        return progress

    @app.get("/v1/runs/{run_id}/progress", response_model=ProgressView, response_model_exclude_unset=True,
             responses={404: {"model": ErrorBody, "description": "Unknown run"}})
    def get_progress(run_id: str):
        return store.progress(run_id)


def _add_streams(app: FastAPI, store: Store, broker: Broker, keepalive_s: float,
                 should_stop: Callable[[], bool]) -> None:
    """The SSE streams: every run's changes (the page), and one run's weights versions (the trainer, ddk weights)."""
    @app.get("/v1/events")
    async def all_events():
        """SSE for every run: a ``runs`` snapshot first (on each connection, so a reconnect re-syncs), then
        ``run``, ``weights`` and ``progress`` messages as they happen."""
        wake = broker.subscribe(None)

        async def stream():
            try:
                yield "retry: 2000\n\n"
                marks = await run_in_threadpool(store.marks)  # before the snapshot: a race repeats, never skips
                runs = await run_in_threadpool(store.list_runs, True)
                yield sse_named("runs", {"runs": runs})
                async for keepalive_due in wakeups(wake, keepalive_s, should_stop):
                    messages, marks = await run_in_threadpool(changes, store, marks)
                    for m in messages:
                        yield m
                    if not messages and keepalive_due:
                        yield ": keep-alive\n\n"
            finally:
                broker.unsubscribe(None, wake)

        return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.get("/v1/runs/{run_id}/events")
    async def events(run_id: str, request: Request):
        current = await run_in_threadpool(store.weights, run_id)  # 404 before the stream starts
        try:
            resume_after = int(request.headers.get("last-event-id", ""))
        except ValueError:
            resume_after = -1
        wake = broker.subscribe(run_id)

        async def stream():
            try:
                yield "retry: 2000\n\n"
                last = resume_after
                # the current weights first, so a subscriber needs no separate GET to start
                if current["version"] > last:
                    yield sse_event(current)
                    last = current["version"]
                async for keepalive_due in wakeups(wake, keepalive_s, should_stop):
                    newer = await run_in_threadpool(store.weights_since, run_id, last)
                    for w in newer:
                        yield sse_event(w)
                        last = w["version"]
                    if not newer and keepalive_due:
                        yield ": keep-alive\n\n"
            finally:
                broker.unsubscribe(run_id, wake)

        return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)


class _StoreCollector:
    """Prometheus collector that reads totals and current weights from the store at scrape time."""

    def __init__(self, store: Store):
        self.store = store

    def collect(self):
        counts = self.store.counts()
        runs = GaugeMetricFamily("ddk_controller_runs", "runs in the store")
        runs.add_metric([], counts["runs"])
        evals = GaugeMetricFamily("ddk_controller_evaluations", "evaluations recorded (all runs)")
        evals.add_metric([], counts["evaluations"])
        version = GaugeMetricFamily("ddk_controller_weights_version", "current weights version", labels=["run_id"])
        weight = GaugeMetricFamily("ddk_controller_weight", "current sampling weight", labels=["run_id", "domain"])
        for run_id, w in self.store.current_all():
            version.add_metric([run_id], w["version"])
            for domain, value in w["weights"].items():
                weight.add_metric([run_id, domain], value)
        yield from (runs, evals, version, weight)

    def describe(self):
        return []  # collected lazily: registering must not query the store


def _describe(errors) -> str:
    """Pydantic errors -> one line naming the fields, e.g. "student_loss.code: Input should be a finite number"."""
    parts = []
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if e.get("type") == "json_invalid":
            parts.append(f"body: malformed JSON ({e.get('ctx', {}).get('error', e.get('msg'))})")
        else:
            parts.append(f"{'.'.join(loc) or 'body'}: {e.get('msg')}")
    return "; ".join(parts)
