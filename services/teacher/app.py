"""The teacher's HTTP app (FastAPI): the "Teacher HTTP API (v1)" contract.

- ``GET /healthz``: 200 once the engine is loaded and its worker runs, 503 before.
- ``GET /v1/info``: model, backend, vocab_size, max_seq_len, max_top_k, tokenizer_fingerprint.
- ``POST /v1/topk``: ``{"input_ids": [[...]], "top_k": k, "dtype"?: "float16"|"float32"}``;
  binary frames (``application/x-ddk-topk``, see ``wire.py``) streamed one per sequence as the
  engine finishes it, or one JSON object with ``Accept: application/json``.
- ``GET /metrics``: Prometheus text.

The app is a thin layer: request checks live in ``validate.py``, batching in ``batcher.py``, the
model in ``engines.py``. The engine loads in a background thread so that ``/healthz`` can answer
503 while a large teacher (or vLLM's start-up compilation) takes its time.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)

from .batcher import Batcher, Job, QueueFull
from .validate import RequestError, parse_topk_request
from .wire import MEDIA_TYPE, encode_frame

log = logging.getLogger(__name__)
disable_created_metrics()  # no *_created series: they only add noise to the scrape


def tokenizer_fingerprint_of(model_dir: str | Path | None) -> str | None:
    """Fingerprint of the tokenizer saved with the model (None when the directory has none)."""
    if model_dir is None:
        return None
    from transformers import AutoTokenizer

    from ddk.fingerprint import tokenizer_fingerprint

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except (OSError, ValueError) as e:
        log.warning("no tokenizer in %s (%s); tokenizer_fingerprint will be null", model_dir, e)
        return None
    return tokenizer_fingerprint(tok)


class Metrics:
    def __init__(self, batcher_ref: Callable[[], Batcher | None]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ddk_teacher_requests", "top-k requests by HTTP status", ["status"], registry=r)
        self.tokens = Counter("ddk_teacher_tokens", "input tokens scored", registry=r)
        self.sequences = Counter("ddk_teacher_sequences", "sequences scored", registry=r)
        self.latency = Histogram("ddk_teacher_request_seconds", "top-k request latency (to last byte)",
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60),
                                 registry=r)
        self.batch_seconds = Histogram("ddk_teacher_batch_seconds", "engine time per batch",
                                       buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10),
                                       registry=r)
        self.batch_sequences = Histogram("ddk_teacher_batch_sequences", "sequences per engine batch",
                                         buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        depth = Gauge("ddk_teacher_queue_depth", "requests waiting for the engine", registry=r)
        depth.set_function(lambda: (batcher_ref().queue_depth if batcher_ref() else 0))
        seqs = Gauge("ddk_teacher_queue_sequences", "sequences waiting for the engine", registry=r)
        seqs.set_function(lambda: (batcher_ref().queued_sequences if batcher_ref() else 0))

    def on_batch(self, sequences: int, padded_tokens: int, seconds: float) -> None:
        self.batch_seconds.observe(seconds)
        self.batch_sequences.observe(sequences)


def _error(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _ready(state: dict) -> bool:
    """The engine is loaded and its batcher thread runs."""
    b = state["batcher"]
    return b is not None and b._thread is not None and b._thread.is_alive()


def _load(state: dict, load_engine: Callable[[], object], model_dir, max_batch_tokens: int, max_queue: int,
          metrics: Metrics, on_load_error: Callable[[BaseException], None] | None) -> None:
    """Load the engine and start its batcher (in a background thread), filling ``state``; a failure is kept
    in ``state["error"]`` (reported by /healthz) and handed to ``on_load_error``."""
    try:
        t0 = time.perf_counter()
        engine = load_engine()
        fingerprint = tokenizer_fingerprint_of(model_dir)
        batcher = Batcher(engine, max_batch_tokens=max_batch_tokens, max_queue=max_queue,
                          on_batch=metrics.on_batch)
        batcher.start()
        state["info"] = {"model": str(model_dir or engine.model), "backend": engine.backend,
                         "vocab_size": engine.vocab_size, "max_seq_len": engine.max_seq_len,
                         "max_top_k": engine.max_top_k, "tokenizer_fingerprint": fingerprint}
        state["engine"], state["batcher"] = engine, batcher
        log.info("teacher ready in %.1fs: %s", time.perf_counter() - t0, state["info"])
    except BaseException as e:  # reported through /healthz and on_load_error
        log.exception("teacher engine failed to load")
        state["error"] = e
        if on_load_error is not None:
            on_load_error(e)


def create_app(load_engine: Callable[[], object], *, model_dir: str | Path | None = None,
               max_batch_tokens: int = 16384, max_queue: int = 64,
               max_body_bytes: int | None = None,
               on_load_error: Callable[[BaseException], None] | None = None) -> FastAPI:
    """Build the app; ``load_engine()`` runs in a background thread at start-up.

    ``max_batch_tokens`` bounds one request (B x L, else 413) and one engine batch; ``max_queue``
    bounds the requests waiting (else 503 + Retry-After); ``max_body_bytes`` bounds the request
    body (else 413; default: room for max_batch_tokens ids written as JSON).
    """
    if max_body_bytes is None:
        max_body_bytes = 16 * max_batch_tokens + 4096
    state = {"engine": None, "batcher": None, "info": None, "error": None}
    metrics = Metrics(lambda: state["batcher"])

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = threading.Thread(target=_load, name="teacher-load", daemon=True,
                                  args=(state, load_engine, model_dir, max_batch_tokens, max_queue, metrics,
                                        on_load_error))
        loader.start()
        yield
        if state["batcher"] is not None:
            state["batcher"].stop()
        if state["engine"] is not None:
            state["engine"].close()

    app = FastAPI(title="ddk teacher", version="1", lifespan=lifespan)
    app.state.teacher = state

    @app.get("/healthz")
    async def healthz():
        if state["error"] is not None:
            return _error(503, f"engine failed to load: {state['error']}")
        if not _ready(state):
            return _error(503, "loading")
        return {"status": "ok", "backend": state["info"]["backend"]}

    @app.get("/v1/info")
    async def info():
        if state["info"] is None:
            return _error(503, "loading", {"Retry-After": "5"})
        return state["info"]

    @app.get("/metrics", response_class=PlainTextResponse)  # so the OpenAPI schema says text/plain
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/topk")
    async def topk(request: Request):
        t0 = time.perf_counter()
        if not _ready(state):
            metrics.requests.labels("503").inc()
            return _error(503, "loading", {"Retry-After": "5"})
        accepted = await _accept(request, state, metrics, max_body_bytes, max_batch_tokens, max_queue)
        if isinstance(accepted, Response):
            return accepted
        req, job = accepted
        n_seq, length = req.input_ids.shape

        first = await job.results.get()  # an engine failure before any output is a clean 503
        if isinstance(first, BaseException):
            job.cancel()
            metrics.requests.labels("503").inc()
            return _error(503, f"engine error: {type(first).__name__}: {first}")

        def done() -> None:
            metrics.requests.labels("200").inc()
            metrics.tokens.inc(n_seq * length)
            metrics.sequences.inc(n_seq)
            metrics.latency.observe(time.perf_counter() - t0)

        accept = request.headers.get("accept", "")
        if "application/json" in accept and MEDIA_TYPE not in accept:
            return await _json_answer(job, first, n_seq, metrics, done)
        return StreamingResponse(_frames(job, first, n_seq, req.dtype, metrics, done), media_type=MEDIA_TYPE)

    return app


async def _accept(request: Request, state: dict, metrics: Metrics, max_body_bytes: int, max_batch_tokens: int,
                  max_queue: int):
    """Read and check a /v1/topk request and queue its job: ``(request, job)``, or the 4xx/503 to answer."""
    info = state["info"]
    try:
        body = await read_body(request, max_body_bytes)
        req = parse_topk_request(body, vocab_size=info["vocab_size"], max_seq_len=info["max_seq_len"],
                                 max_top_k=info["max_top_k"], max_batch_tokens=max_batch_tokens)
    except RequestError as e:
        metrics.requests.labels(str(e.status)).inc()
        return _error(e.status, e.detail)
    job = Job(req.input_ids, req.top_k)
    try:
        state["batcher"].submit(job)
    except QueueFull as e:
        metrics.requests.labels("503").inc()
        return _error(503, f"queue full ({max_queue} requests waiting); retry later",
                      {"Retry-After": str(e.retry_after)})
    return req, job


async def read_body(request: Request, max_body_bytes: int) -> bytes:
    """The request body, refused (413) as soon as it passes ``max_body_bytes`` (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
        raise RequestError(413, f"body: {declared} bytes exceed the limit of {max_body_bytes}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            raise RequestError(413, f"body: more than the limit of {max_body_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _json_answer(job: Job, first, n_seq: int, metrics: Metrics, done: Callable[[], None]) -> Response:
    """All of a job's sequences as one JSON document (the debugging format); an engine error is a 503."""
    answers = {}
    item = first
    while True:
        if isinstance(item, BaseException):
            metrics.requests.labels("503").inc()
            return _error(503, f"engine error: {type(item).__name__}: {item}")
        answers[item[0]] = item[1]
        if len(answers) == n_seq:
            break
        item = await job.results.get()
    seqs = [{"ids": answers[i].ids.tolist(), "logprobs": answers[i].logprobs.tolist(),
             "target_logprob": answers[i].target_logprob.tolist()} for i in range(n_seq)]
    content = json.dumps({"sequences": seqs}, separators=(",", ":"))
    done()
    return Response(content, media_type="application/json")


async def _frames(job: Job, first, n_seq: int, dtype, metrics: Metrics, done: Callable[[], None]):
    """A job's sequences as binary frames, each sent as soon as the engine has it."""
    item, sent = first, 0
    try:
        while True:
            if isinstance(item, BaseException):  # mid-stream: abort; the client retries
                metrics.requests.labels("500").inc()
                raise item
            i, res = item
            yield encode_frame(i, res.ids, res.logprobs, res.target_logprob, dtype)
            sent += 1
            if sent == n_seq:
                break
            item = await job.results.get()
        done()
    finally:
        job.cancel()
