"""The teacher's HTTP app (FastAPI): the "Teacher HTTP API (v1)" contract.

- ``GET /healthz``: 200 once the engine is loaded and its worker runs, 503 before.
- ``GET /v1/info``: model, backend, vocab_size, max_seq_len, max_top_k, tokenizer_fingerprint,
  model_fingerprint.
- ``POST /v1/topk``: ``{"input_ids": [[...]], "top_k": k, "dtype"?: "float16"|"float32"}``, sequences
  of any lengths (2..max_seq_len each, at most max_batch_tokens in all);
  binary frames (``application/x-ddk-topk``, see ``wire.py``) streamed one per sequence as the
  engine finishes it, or one JSON object with ``Accept: application/json``. With a token
  (``--token-file``) it needs ``Authorization: Bearer <token>`` (401 without, 403 wrong); the other
  routes stay open.
- ``POST /v1/generate``: ``{"input_ids": [[...]], "max_new_tokens": n, "stop_ids"?: [...]}``: greedy answers
  ``{"sequences": [{"ids", "finish_reason"}]}`` (``ddk.teacher.generation``; ``ddk eval --tasks --teacher``),
  behind the same token as /v1/topk.
- ``GET /metrics``: Prometheus text.

With a cache (``--cache-dir``, a :class:`~ddk.teacher.store.TopkStore` keyed by model_fingerprint), each
sequence of a request is looked up first: the ones found are answered from the store without the
engine, the others go to the engine and are stored. Every answer then passes through the store's
encoding (a miss is answered as it will be read back), so the first answer and every later one are
the same bytes; with the float16 encoding and float16 frames they are also the bytes of an uncached
server.

The app is a thin layer: request checks live in ``validate.py``, batching in ``batcher.py``, the
model in ``engines.py``. The engine loads in a background thread so that ``/healthz`` can answer
503 while a large teacher (or vLLM's start-up compilation) takes its time.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import sqlite3
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
from .store import StoreError, TopkStore, decode_entry
from .tokenizer_route import tokenizer_router
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
        self.engine_batches = Counter("ddk_teacher_engine_batches", "engine calls", registry=r)
        self.engine_sequences = Counter("ddk_teacher_engine_sequences", "sequences the engine scored", registry=r)
        self.engine_tokens = Counter("ddk_teacher_engine_tokens", "tokens the engine scored (unpadded)", registry=r)
        self.cache_hits = Counter("ddk_teacher_cache_hits", "sequences answered from the top-k store", registry=r)
        self.cache_misses = Counter("ddk_teacher_cache_misses", "sequences not in the top-k store", registry=r)
        self.cache_bytes = Gauge("ddk_teacher_cache_bytes", "bytes of the entries in the top-k store", registry=r)
        self.generate_requests = Counter("ddk_teacher_generate_requests", "generate requests by HTTP status",
                                         ["status"], registry=r)
        self.generated_tokens = Counter("ddk_teacher_generated_tokens", "tokens generated by /v1/generate",
                                        registry=r)

    def on_batch(self, sequences: int, padded_tokens: int, seconds: float, tokens: int | None = None) -> None:
        self.batch_seconds.observe(seconds)
        self.batch_sequences.observe(sequences)
        self.engine_batches.inc()
        self.engine_sequences.inc(sequences)
        self.engine_tokens.inc(padded_tokens if tokens is None else tokens)


def _error(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _ready(state: dict) -> bool:
    """The engine is loaded and its batcher thread runs."""
    b = state["batcher"]
    return b is not None and b._thread is not None and b._thread.is_alive()


def model_fingerprint_of(model_dir: str | Path | None) -> str | None:
    """:func:`ddk.fingerprint.model_fingerprint` of the model folder (None without one)."""
    if model_dir is None:
        return None
    from ddk.fingerprint import model_fingerprint

    return model_fingerprint(model_dir)


def _open_cache(cache: dict | None, model_fp: str | None, vocab_size: int, metrics: Metrics) -> TopkStore | None:
    """The top-k store of ``--cache-dir`` (``cache``: dir, max_bytes, encoding), its size shown in /metrics."""
    if not cache or not cache.get("dir"):
        return None
    if model_fp is None:
        raise ValueError("--cache-dir needs a model folder to fingerprint")
    store = TopkStore(Path(cache["dir"]) / "topk.sqlite", encoding=cache.get("encoding") or "float16",
                      vocab_size=vocab_size, max_bytes=cache.get("max_bytes"))
    metrics.cache_bytes.set_function(lambda: store.stats()["bytes"])
    log.info("top-k cache: %s", store.stats())
    return store


def _load(state: dict, load_engine: Callable[[], object], model_dir, max_batch_tokens: int, max_queue: int,
          metrics: Metrics, on_load_error: Callable[[BaseException], None] | None, cache: dict | None = None) -> None:
    """Load the engine and start its batcher (in a background thread), filling ``state``; a failure is kept
    in ``state["error"]`` (reported by /healthz) and handed to ``on_load_error``."""
    try:
        t0 = time.perf_counter()
        engine = load_engine()
        fingerprint = tokenizer_fingerprint_of(model_dir)
        model_fp = model_fingerprint_of(model_dir)
        state["cache"] = _open_cache(cache, model_fp, engine.vocab_size, metrics)
        batcher = Batcher(engine, max_batch_tokens=max_batch_tokens, max_queue=max_queue,
                          on_batch=metrics.on_batch)
        batcher.start()
        state["info"] = {"model": str(model_dir or engine.model), "backend": engine.backend,
                         "vocab_size": engine.vocab_size, "max_seq_len": engine.max_seq_len,
                         "max_top_k": engine.max_top_k, "tokenizer_fingerprint": fingerprint,
                         "model_fingerprint": model_fp}
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
               on_load_error: Callable[[BaseException], None] | None = None,
               cache_dir: str | Path | None = None, cache_max_bytes: int | None = None,
               cache_encoding: str = "float16", token: str | None = None) -> FastAPI:
    """Build the app; ``load_engine()`` runs in a background thread at start-up.

    ``max_batch_tokens`` bounds one request (the sum of its sequence lengths, else 413) and one
    engine batch (padded for the hf engine, see batcher.py); ``max_queue`` bounds the requests
    waiting (else 503 + Retry-After); ``max_body_bytes`` bounds the request body (else 413;
    default: room for max_batch_tokens ids written as JSON). ``cache_dir``: the top-k store (``cache_dir/topk.sqlite``,
    at most ``cache_max_bytes`` of entries, written in ``cache_encoding``); ``token``: the bearer token /v1/topk needs.
    """
    if max_body_bytes is None:
        max_body_bytes = 16 * max_batch_tokens + 4096
    state = {"engine": None, "batcher": None, "info": None, "error": None, "cache": None}
    cache = {"dir": cache_dir, "max_bytes": cache_max_bytes, "encoding": cache_encoding} if cache_dir else None
    metrics = Metrics(lambda: state["batcher"])

    lifespan = _lifespan(state, (state, load_engine, model_dir, max_batch_tokens, max_queue, metrics,
                                 on_load_error, cache))
    app = FastAPI(title="ddk teacher", version="1", lifespan=lifespan)
    app.state.teacher = state
    app.include_router(tokenizer_router(model_dir, state))  # GET /v1/tokenizer (tokenizer_route.py)
    _add_generate_route(app, state, token, metrics, max_body_bytes, max_batch_tokens)  # POST /v1/generate

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
        denied = _check_token(request, token)
        if denied is not None:
            metrics.requests.labels(str(denied.status_code)).inc()
            return denied
        if not _ready(state):
            metrics.requests.labels("503").inc()
            return _error(503, "loading", {"Retry-After": "5"})
        accepted = await _accept(request, state, metrics, max_body_bytes, max_batch_tokens, max_queue)
        if isinstance(accepted, Response):
            return accepted
        req, hits, missing, job = accepted
        n_seq, n_tokens = len(req.input_ids), req.tokens

        first = await _first_output(job, metrics)
        if isinstance(first, Response):
            return first
        if state["cache"] is not None:
            metrics.cache_hits.inc(len(hits))
            metrics.cache_misses.inc(len(missing))
        items = _answers(hits, missing, job, first, state["cache"], state["info"]["model_fingerprint"], req)

        def done() -> None:
            metrics.requests.labels("200").inc()
            metrics.tokens.inc(n_tokens)
            metrics.sequences.inc(n_seq)
            metrics.latency.observe(time.perf_counter() - t0)

        accept = request.headers.get("accept", "")
        if "application/json" in accept and MEDIA_TYPE not in accept:
            return await _json_answer(items, job, n_seq, metrics, done)
        return StreamingResponse(_frames(items, job, n_seq, req.dtype, metrics, done), media_type=MEDIA_TYPE)
    return app


def _add_generate_route(app: FastAPI, state: dict, token: str | None, metrics: Metrics, max_body_bytes: int,
                        max_batch_tokens: int) -> None:
    """``POST /v1/generate``: one generation at a time (the batcher's top-k batches go on beside it)."""
    lock = threading.Lock()

    @app.post("/v1/generate")
    async def generate(request: Request):
        return await _generate(request, state, token, metrics, max_body_bytes, max_batch_tokens, lock)


async def _generate(request: Request, state: dict, token: str | None, metrics: Metrics, max_body_bytes: int,
                    max_batch_tokens: int, lock: threading.Lock) -> Response:
    """``POST /v1/generate`` (ddk.teacher.generation): greedy answers as ``{"sequences": [{"ids",
    "finish_reason"}]}``; the same token as /v1/topk; bad bodies 4xx naming the field."""
    from .generation import parse_generate_request

    denied = _check_token(request, token)
    if denied is None and not _ready(state):
        denied = _error(503, "loading", {"Retry-After": "5"})
    if denied is None and not hasattr(state["engine"], "generate"):
        denied = _error(501, f"backend {state['info']['backend']}: no generate")
    if denied is not None:
        metrics.generate_requests.labels(str(denied.status_code)).inc()
        return denied
    info = state["info"]
    try:
        body = await read_body(request, max_body_bytes)
        req = parse_generate_request(body, vocab_size=info["vocab_size"], max_seq_len=info["max_seq_len"],
                                     max_batch_tokens=max_batch_tokens)
    except RequestError as e:
        metrics.generate_requests.labels(str(e.status)).inc()
        return _error(e.status, e.detail)

    def run():
        with lock:
            return state["engine"].generate(req.input_ids, req.max_new_tokens, req.stop_ids)

    try:
        answers = await asyncio.to_thread(run)
    except Exception as e:  # the engine failed: a clean error naming it
        log.exception("generate failed")
        metrics.generate_requests.labels("503").inc()
        return _error(503, f"engine error: {type(e).__name__}: {e}")
    metrics.generate_requests.labels("200").inc()
    metrics.generated_tokens.inc(sum(len(ids) for ids, _ in answers))
    return JSONResponse({"sequences": [{"ids": ids, "finish_reason": why} for ids, why in answers]})


def _lifespan(state: dict, load_args: tuple):
    """The app's lifespan: the engine loads in a background thread (``_load(*load_args)``) while the server
    already answers; at shutdown the batcher, the engine and the cache are closed."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=_load, name="teacher-load", daemon=True, args=load_args).start()
        yield
        if state["batcher"] is not None:
            state["batcher"].stop()
        if state["engine"] is not None:
            state["engine"].close()
        if state["cache"] is not None:
            state["cache"].close()

    return lifespan


async def _first_output(job, metrics):
    """The engine's first output for ``job`` (None without a job: everything came from the cache), or the 503
    to answer when the engine failed before any output (a clean error, not a broken stream)."""
    if job is None:
        return None
    first = await job.results.get()
    if isinstance(first, BaseException):
        job.cancel()
        metrics.requests.labels("503").inc()
        return _error(503, f"engine error: {type(first).__name__}: {first}")
    return first


def _check_token(request: Request, token: str | None) -> JSONResponse | None:
    """None when /v1/topk may go on (no token configured, or the right one); else the 401/403 to answer.
    Checked before the body is read; the comparison takes constant time (as the controller's writes)."""
    if token is None:
        return None
    auth = request.headers.get("authorization", "")
    if not auth.lower().startswith("bearer "):
        return _error(401, "authorization: this teacher needs 'Authorization: Bearer <token>' for /v1/topk",
                      {"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(auth[7:].strip().encode(), token.encode()):
        return _error(403, "authorization: wrong token")
    return None


async def _accept(request: Request, state: dict, metrics: Metrics, max_body_bytes: int, max_batch_tokens: int,
                  max_queue: int):
    """Read and check a /v1/topk request, look its sequences up in the cache and queue a job for the others:
    ``(request, hits {index: Entry}, missing [index], job or None)``, or the 4xx/503 to answer."""
    info = state["info"]
    try:
        body = await read_body(request, max_body_bytes)
        req = parse_topk_request(body, vocab_size=info["vocab_size"], max_seq_len=info["max_seq_len"],
                                 max_top_k=info["max_top_k"], max_batch_tokens=max_batch_tokens)
    except RequestError as e:
        metrics.requests.labels(str(e.status)).inc()
        return _error(e.status, e.detail)
    n_seq = len(req.input_ids)
    hits: dict = {}
    cache = state["cache"]
    if cache is not None:
        try:
            found = await asyncio.to_thread(cache.get_many, info["model_fingerprint"], req.input_ids, req.top_k)
            hits = {i: e for i, e in enumerate(found) if e is not None}
        except sqlite3.Error as e:  # a store that cannot be read is a miss, not a failed request
            log.warning("top-k cache: lookup failed (%s); asking the engine", e)
    missing = [i for i in range(n_seq) if i not in hits]
    job = None
    if missing:
        job = Job([req.input_ids[i] for i in missing] if hits else req.input_ids, req.top_k)
        try:
            state["batcher"].submit(job)
        except QueueFull as e:
            metrics.requests.labels("503").inc()
            return _error(503, f"queue full ({max_queue} requests waiting); retry later",
                          {"Retry-After": str(e.retry_after)})
    return req, hits, missing, job


async def _answers(hits: dict, missing: list[int], job: Job | None, first, cache: TopkStore | None,
                   model_fp: str | None, req):
    """A request's answers as ``(index, TopK or Entry)`` (an engine failure as an exception item): the cached
    ones first, then the engine's as they come, each passed through the cache's encoding and stored."""
    for i in sorted(hits):
        yield i, hits[i]
    if job is None:
        return
    item = first
    for n in range(len(missing)):
        if isinstance(item, BaseException):
            yield item
            return
        j, res = item
        i = missing[j]
        if cache is not None:
            blob = cache.encode(res.ids, res.logprobs, res.target_logprob)
            res = decode_entry(blob)  # answered as it will be read back: hits and misses agree
            try:
                await asyncio.to_thread(cache.put_blob, model_fp, req.input_ids[i], blob)
            except (sqlite3.Error, OSError, StoreError) as e:  # a full disk must not fail the answer
                log.warning("top-k cache: could not store a sequence (%s)", e)
        yield i, res
        if n + 1 < len(missing):
            item = await job.results.get()


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


async def _json_answer(items, job: Job | None, n_seq: int, metrics: Metrics, done: Callable[[], None]) -> Response:
    """All of a request's sequences as one JSON document (the debugging format); an engine error is a 503."""
    answers = {}
    try:
        async for item in items:
            if isinstance(item, BaseException):
                metrics.requests.labels("503").inc()
                return _error(503, f"engine error: {type(item).__name__}: {item}")
            answers[item[0]] = item[1]
    finally:
        if job is not None:
            job.cancel()
    seqs = [{"ids": answers[i].ids.tolist(), "logprobs": answers[i].logprobs.tolist(),
             "target_logprob": answers[i].target_logprob.tolist()} for i in range(n_seq)]
    content = json.dumps({"sequences": seqs}, separators=(",", ":"))
    done()
    return Response(content, media_type="application/json")


async def _frames(items, job: Job | None, n_seq: int, dtype, metrics: Metrics, done: Callable[[], None]):
    """A request's sequences as binary frames, each sent as soon as it is ready (the cached ones first)."""
    try:
        async for item in items:
            if isinstance(item, BaseException):  # mid-stream: abort; the client retries
                metrics.requests.labels("500").inc()
                raise item
            i, res = item
            yield encode_frame(i, res.ids, res.logprobs, res.target_logprob, dtype)
        done()
    finally:
        if job is not None:
            job.cancel()
