"""Server-side batching: many concurrent requests, one engine worker thread.

Each request becomes a :class:`Job` whose sequences (of any lengths: ragged requests are fine) wait
in one FIFO queue. A single worker thread takes sequences from the head of the queue, from as many
jobs as fit in ``max_batch_tokens``, runs the engine once, and hands every sequence's answer back to
the event loop of its request, which streams it out at once.

The budget counts what the engine computes: an engine that right-pads a batch to its longest
sequence (``engine.pads_batches``, True for the hf engine and for engines that do not say) is
charged sequences x longest; one that packs prompts without padding (vLLM) is charged the sum of
the lengths. The queue stays FIFO either way (no reordering by length), so a long sequence behind
short ones closes the batch rather than overtaking them. So eight trainer
workers calling together share engine batches instead of queueing one behind another, and a
request's first frames leave before its last sequences are scored.

The queue is bounded by ``max_queue`` waiting requests: a full queue raises :class:`QueueFull`
(the app answers 503 with Retry-After) instead of growing without bound.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """Too many requests waiting; ``retry_after`` is a hint in seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"queue full; retry after {retry_after}s")
        self.retry_after = retry_after


@dataclass(eq=False)
class Job:
    """One request: ``input_ids`` B sequences (a [B, L] array or a list of 1-D arrays of any lengths),
    one ``top_k``; answers arrive on ``results``.

    Each item on ``results`` is ``(index, TopK)`` or an exception (the engine failed). Create the
    job inside the request's event loop.
    """

    input_ids: np.ndarray | list
    top_k: int
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    results: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    untaken: int = 0  # sequences not yet picked by the worker
    lengths: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.lengths = [len(s) for s in self.input_ids]

    def cancel(self) -> None:
        """The client went away: drop the sequences that were not scored yet."""
        self.cancelled = True

    def _deliver(self, item) -> None:
        if not self.cancelled:
            self.loop.call_soon_threadsafe(self.results.put_nowait, item)


class Batcher:
    def __init__(self, engine, *, max_batch_tokens: int = 16384, max_queue: int = 64,
                 on_batch=None, padded: bool | None = None) -> None:
        self.engine = engine
        self.max_batch_tokens = int(max_batch_tokens)
        # count the budget padded (sequences x longest) or in real tokens; default: what the engine says
        self.padded = bool(getattr(engine, "pads_batches", True)) if padded is None else bool(padded)
        self.max_queue = int(max_queue)
        self.on_batch = on_batch  # callback(sequences, padded_tokens, seconds, tokens) for metrics
        self._cond = threading.Condition()
        self._units: deque[tuple[Job, int]] = deque()  # (job, sequence index)
        self._waiting_jobs = 0
        self._queued_tokens = 0
        self._tokens_per_s = 0.0  # moving average, for the Retry-After hint
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- the event loop's side ---------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue every sequence of ``job``; raises QueueFull when ``max_queue`` jobs are waiting."""
        b = len(job.lengths)
        with self._cond:
            if self._waiting_jobs >= self.max_queue:
                raise QueueFull(self._retry_after())
            job.untaken = b
            self._units.extend((job, i) for i in range(b))
            self._waiting_jobs += 1
            self._queued_tokens += sum(job.lengths)
            self._cond.notify()

    @property
    def queue_depth(self) -> int:
        """Requests waiting with at least one sequence not yet taken by the engine."""
        return self._waiting_jobs

    @property
    def queued_sequences(self) -> int:
        return len(self._units)

    def _retry_after(self) -> int:
        if self._tokens_per_s <= 0:
            return 1
        return int(min(30, max(1, math.ceil(self._queued_tokens / self._tokens_per_s))))

    # -- the worker thread ------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="teacher-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _take_batch(self) -> list[tuple[Job, int]]:
        """Pop sequences from the head while the batch (padded or real tokens, see the module doc) stays
        within max_batch_tokens; the first sequence is always taken (a request never exceeds the limit)."""
        batch: list[tuple[Job, int]] = []
        longest = real = 0
        while self._units:
            job, i = self._units[0]
            if job.cancelled:
                self._units.popleft()
                self._account_taken(job, i)
                continue
            length = job.lengths[i]
            new_longest = max(longest, length)
            cost = (len(batch) + 1) * new_longest if self.padded else real + length
            if batch and cost > self.max_batch_tokens:
                break
            self._units.popleft()
            self._account_taken(job, i)
            batch.append((job, i))
            longest, real = new_longest, real + length
        return batch

    def _account_taken(self, job: Job, i: int) -> None:
        job.untaken -= 1
        self._queued_tokens -= job.lengths[i]
        if job.untaken == 0:
            self._waiting_jobs -= 1

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._units and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                batch = self._take_batch()
            if not batch:
                continue
            seqs = [job.input_ids[i] for job, i in batch]
            ks = [job.top_k for job, _ in batch]
            t0 = time.perf_counter()
            try:
                results = self.engine.topk(seqs, ks)
            except Exception as e:  # hand the failure to every request in the batch; keep serving
                log.exception("engine failed on a batch of %d sequences", len(batch))
                for job, _ in batch:
                    job._deliver(e)
                continue
            dt = time.perf_counter() - t0
            tokens = sum(len(s) for s in seqs)
            rate = tokens / max(dt, 1e-6)
            self._tokens_per_s = rate if self._tokens_per_s == 0 else 0.8 * self._tokens_per_s + 0.2 * rate
            for (job, i), res in zip(batch, results):
                job._deliver((i, res))
            if self.on_batch is not None:
                self.on_batch(len(batch), len(batch) * max(len(s) for s in seqs), dt, tokens)
