"""Python client of the teacher service, used by the trainer.

``TeacherClient(urls).topk(input_ids, top_k)`` sends one request per batch, reads the binary frames
as they stream in and writes each into preallocated tensors ``[B, L-1, k]``; ``topk_ragged(sequences,
top_k)`` does the same for sequences of different lengths and returns one output per sequence. It keeps one
keep-alive ``httpx.Client`` per replica, spreads batches round-robin over the replicas, and
retries with exponential backoff: a replica that refuses connections or breaks a stream is skipped
for ``cooldown`` seconds and then tried again; a 503 (queue full, loading) is retried after the
server's Retry-After. Safe to share between threads (the trainer prefetches from one).
``token`` (the content of the train config's ``teacher.token_file``) is sent as ``Authorization: Bearer`` to
every replica.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import threading
import time
from dataclasses import dataclass

import httpx
import numpy as np
import torch

from .wire import DTYPES, MEDIA_TYPE, FrameReader, WireError

log = logging.getLogger(__name__)


@dataclass
class TeacherOutput:
    ids: torch.Tensor  # int64 [B, L-1, k]   top-k token ids, sorted by logprob descending
    logprobs: torch.Tensor  # float32 [B, L-1, k] natural-log probs at temperature 1, full-vocab normalised
    target_logprob: torch.Tensor  # float32 [B, L-1]    logprob of the actual next token input_ids[:, 1:]


@dataclass
class SequenceOutput:
    """One sequence's answer from :meth:`TeacherClient.topk_ragged` (L: that sequence's length)."""

    ids: torch.Tensor  # int64 [L-1, k]
    logprobs: torch.Tensor  # float32 [L-1, k]
    target_logprob: torch.Tensor  # float32 [L-1]


class TeacherUnavailable(Exception):
    """No replica answered after all retries."""


class TeacherRequestError(ValueError):
    """The teacher rejected the request (4xx other than 503): retrying would not help."""

    def __init__(self, status: int, detail) -> None:
        super().__init__(f"teacher answered {status}: {detail}")
        self.status = status
        self.detail = detail


class _Retryable(Exception):
    """One attempt failed in a way another attempt may fix."""

    def __init__(self, message: str, *, replica_down: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.replica_down = replica_down
        self.retry_after = retry_after


class _Replica:
    def __init__(self, url: str, timeout: float, token: str | None = None) -> None:
        self.url = url.rstrip("/")
        # keep-alive expiry below the server's 30 s idle timeout (server.py): a connection the
        # server may be closing is never reused
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self.http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
                                 headers=headers,
                                 limits=httpx.Limits(max_connections=100, max_keepalive_connections=20,
                                                     keepalive_expiry=5.0))
        self.down_until = 0.0


class TeacherClient:
    def __init__(self, urls: str | list[str], *, dtype: str = "float16", timeout: float = 120.0,
                 max_retries: int | None = None, retry_for: float = 300.0, backoff: float = 0.5,
                 max_backoff: float = 10.0, cooldown: float = 5.0, token: str | None = None) -> None:
        if isinstance(urls, str):
            urls = [u for u in urls.split(",") if u.strip()]
        if not urls:
            raise ValueError("urls: at least one teacher URL is required")
        if dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        # retries are budgeted in time (a teacher restart takes seconds to minutes), and optionally
        # also in attempts; the wait between attempts grows exponentially up to max_backoff
        self.max_retries = None if max_retries is None else int(max_retries)
        self.retry_for = float(retry_for)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.cooldown = float(cooldown)
        self._replicas = [_Replica(u.strip(), timeout, token) for u in urls]
        self._rr = itertools.count()
        self._lock = threading.Lock()

    # -- replica choice ---------------------------------------------------------------------
    def _pick(self, tried: set[int]) -> _Replica:
        """Next replica round-robin, skipping ones marked down (and, within one call, ones already
        tried); when every replica is down, the one whose cool-down ends first."""
        n = len(self._replicas)
        now = time.monotonic()
        with self._lock:
            start = next(self._rr)
        order = [(start + i) % n for i in range(n)]
        for pool in ([i for i in order if self._replicas[i].down_until <= now and i not in tried],
                     [i for i in order if self._replicas[i].down_until <= now]):
            if pool:
                return self._replicas[pool[0]]
        return min(self._replicas, key=lambda r: r.down_until)

    def _call(self, what: str, attempt_fn):
        """Run ``attempt_fn(replica)`` with failover and exponential backoff, for at most ``retry_for``
        seconds (and ``max_retries`` retries when set)."""
        tried: set[int] = set()
        last: Exception | None = None
        deadline = time.monotonic() + self.retry_for
        attempt = 0
        while True:
            rep = self._pick(tried)
            tried.add(self._replicas.index(rep))
            try:
                return attempt_fn(rep)
            except _Retryable as e:
                last = e
                if e.replica_down:
                    rep.down_until = time.monotonic() + self.cooldown
                log.warning("teacher %s on %s failed (attempt %d): %s", what, rep.url, attempt + 1, e)
                if self.max_retries is not None and attempt >= self.max_retries:
                    break
                attempt += 1
                alive_other = any(r.down_until <= time.monotonic() and r is not rep for r in self._replicas)
                if e.replica_down and alive_other and len(tried) < len(self._replicas):
                    continue  # fail over at once to a replica not tried yet
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * (0.75 + 0.5 * random.random())
                if e.retry_after is not None:
                    delay = max(delay, e.retry_after)
                if time.monotonic() + delay > deadline:
                    break
                time.sleep(delay)
                if len(tried) >= len(self._replicas):
                    tried.clear()
        raise TeacherUnavailable(f"teacher {what} failed on every replica after {attempt + 1} attempts "
                                 f"({self.retry_for:.0f} s budget): {last}")

    @staticmethod
    def _check_status(r: httpx.Response) -> None:
        if r.status_code == 200:
            return
        try:
            r.read()
            detail = r.json()["detail"]
        except Exception:  # not our JSON error body (a proxy, a crash): keep what there is
            try:
                detail = r.text[:500]
            except Exception:
                detail = "(no body)"
        if r.status_code in (429, 503) or r.status_code >= 500:
            ra = r.headers.get("retry-after")
            retry_after = float(ra) if ra and ra.replace(".", "", 1).isdigit() else None
            raise _Retryable(f"{r.status_code}: {detail}", replica_down=r.status_code >= 500 and r.status_code != 503,
                             retry_after=retry_after)
        raise TeacherRequestError(r.status_code, detail)

    # -- API --------------------------------------------------------------------------------
    def info(self) -> dict:
        """``GET /v1/info`` of a replica: model, backend, vocab_size, max_seq_len, max_top_k,
        tokenizer_fingerprint."""

        return self._get_json("/v1/info", "info")

    def tokenizer_files(self) -> dict:
        """``GET /v1/tokenizer`` of a replica: ``{"files": {name: JSON}, "tokenizer_fingerprint"}``."""
        return self._get_json("/v1/tokenizer", "tokenizer")

    def _get_json(self, path: str, what: str) -> dict:
        """``GET path`` of a replica (retried and failed over as every call), its JSON body."""

        def attempt(rep: _Replica) -> dict:
            try:
                r = rep.http.get(path)
            except httpx.TransportError as e:
                raise _Retryable(f"{type(e).__name__}: {e}", replica_down=True) from None
            self._check_status(r)
            return r.json()

        return self._call(what, attempt)

    def tokenizer(self):
        """The teacher's own tokenizer, rebuilt here from ``GET /v1/tokenizer`` (a ``PreTrainedTokenizerFast``
        from its files in a temporary folder: data only, no code) and checked: its
        ``ddk.fingerprint.tokenizer_fingerprint`` must equal ``/v1/info``'s (ValueError otherwise)."""
        import os
        import tempfile

        from transformers import PreTrainedTokenizerFast

        from ddk.fingerprint import tokenizer_fingerprint

        answer = self.tokenizer_files()
        files = answer.get("files") or {}
        if "tokenizer.json" not in files:
            raise ValueError("teacher /v1/tokenizer: the answer has no tokenizer.json")
        with tempfile.TemporaryDirectory(prefix="ddk-teacher-tokenizer-") as tmp:
            for name, content in files.items():
                if name not in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                    continue  # only the known data files; a name is never a path
                with open(os.path.join(tmp, name), "w", encoding="utf-8") as fh:
                    json.dump(content, fh, ensure_ascii=False)
            tok = PreTrainedTokenizerFast.from_pretrained(tmp, trust_remote_code=False)
        expected = self.info().get("tokenizer_fingerprint")
        got = tokenizer_fingerprint(tok)
        if got != expected:
            raise ValueError(f"teacher /v1/tokenizer: the rebuilt tokenizer's fingerprint {got} differs from "
                             f"/v1/info's {expected}")
        return tok

    def topk(self, input_ids, top_k: int) -> TeacherOutput:
        """Top-k of the teacher for every position of ``input_ids`` [B, L] (tensor or equal-length lists).

        Sequences of different lengths: :meth:`topk_ragged`."""
        if isinstance(input_ids, torch.Tensor):
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids: expected [B, L], got shape {tuple(input_ids.shape)}")
            rows = input_ids.detach().to("cpu", torch.int64).tolist()
        else:
            rows = [[int(t) for t in row] for row in input_ids]
        if not rows or len({len(r) for r in rows}) != 1 or len(rows[0]) < 2:
            raise ValueError("input_ids: need a non-empty batch of equal-length sequences of >= 2 ids "
                             "(topk_ragged takes sequences of different lengths)")
        b, length, k = len(rows), len(rows[0]), int(top_k)

        def new() -> TeacherOutput:
            return TeacherOutput(ids=torch.empty((b, length - 1, k), dtype=torch.int64),
                                 logprobs=torch.empty((b, length - 1, k), dtype=torch.float32),
                                 target_logprob=torch.empty((b, length - 1), dtype=torch.float32))

        def put(out: TeacherOutput, f) -> None:
            out.ids[f.index].copy_(torch.from_numpy(f.ids.astype(np.int64)))
            out.logprobs[f.index].copy_(torch.from_numpy(f.logprobs.astype(np.float32)))
            out.target_logprob[f.index].copy_(torch.from_numpy(f.target_logprob.astype(np.float32)))

        return self._call("topk", lambda rep: self._stream(rep, rows, k, new, put))

    def topk_ragged(self, sequences, top_k: int) -> list[SequenceOutput]:
        """Top-k for sequences of any lengths (each >= 2 ids) in one request: one :class:`SequenceOutput`
        per sequence, in request order, sequence i holding ``len(sequences[i]) - 1`` rows. The sum of the
        lengths must stay within the teacher's ``--max-batch-tokens`` (else ``TeacherRequestError`` 413)."""
        rows = [[int(t) for t in (s.detach().to("cpu", torch.int64).reshape(-1).tolist()
                                  if isinstance(s, torch.Tensor) else s)] for s in sequences]
        if not rows or min(len(r) for r in rows) < 2:
            raise ValueError("sequences: need a non-empty list of sequences of >= 2 ids each")
        k = int(top_k)

        def new() -> list:
            return [None] * len(rows)

        def put(out: list, f) -> None:
            out[f.index] = SequenceOutput(ids=torch.from_numpy(f.ids.astype(np.int64)),
                                          logprobs=torch.from_numpy(f.logprobs.astype(np.float32)),
                                          target_logprob=torch.from_numpy(f.target_logprob.astype(np.float32)))

        return self._call("topk", lambda rep: self._stream(rep, rows, k, new, put))

    def _stream(self, rep: _Replica, rows: list[list[int]], k: int, new, put):
        """One attempt: POST ``rows``, check every frame against its sequence (index seen once, R = L_i - 1
        rows of k) and ``put(out, frame)`` it into ``out = new()``; all sequences must arrive."""
        b = len(rows)
        body = json.dumps({"input_ids": rows, "top_k": k, "dtype": self.dtype}, separators=(",", ":")).encode()
        headers = {"Accept": MEDIA_TYPE, "Content-Type": "application/json"}
        out = new()
        seen = np.zeros(b, dtype=bool)
        reader = FrameReader()
        try:
            with rep.http.stream("POST", "/v1/topk", content=body, headers=headers) as r:
                self._check_status(r)
                for chunk in r.iter_bytes():
                    for f in reader.feed(chunk):
                        if not 0 <= f.index < b or seen[f.index] or f.ids.shape != (len(rows[f.index]) - 1, k):
                            raise WireError(f"unexpected frame index={f.index} shape={f.ids.shape}")
                        seen[f.index] = True
                        put(out, f)
            reader.close()
        except httpx.TransportError as e:  # refused, reset, broken stream: try another replica
            raise _Retryable(f"{type(e).__name__}: {e}", replica_down=True) from None
        except WireError as e:
            raise _Retryable(f"bad stream: {e}", replica_down=True) from None
        if not seen.all():
            raise _Retryable(f"stream ended after {int(seen.sum())} of {b} sequences", replica_down=True)
        return out

    def close(self) -> None:
        for rep in self._replicas:
            rep.http.close()

    def __enter__(self) -> "TeacherClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
