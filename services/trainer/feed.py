"""Teacher feed: draw the next batches and fetch their teacher outputs ahead of the student.

The student's forward/backward and the teacher's top-k request for the *next* batch run at the same
time: a background thread draws batches from the sampler, asks the teacher service for their top-k
log-probabilities and puts the finished batches into a bounded queue; the training loop takes them
in step order and records how long it waited (``teacher_wait_s``, ~0 when the teacher keeps up).

Weights and prefetching. A batch must be drawn with the domain weights in force at its step, and
the weights change only when an evaluation (at an interval boundary, or a late retry after the
controller was unreachable) returns a new version. The weights live in one place, the run's
:class:`~ddk.trainer.mixture_sync.MixtureSync` (``mixture``): :meth:`TeacherFeed.schedule` reads them
there for a *window* of steps ``[start, stop)`` and prefetches only inside it; the loop schedules the
next window once the new weights are known. When weights change inside a window the loop calls
:meth:`TeacherFeed.cancel`: queued batches are dropped and the sampler is rewound to its state
after the last batch actually trained on, so discarded draws leave no trace (the sampler's state
is snapshotted with every batch for that reason; it is also what a checkpoint stores: the feed is
the checkpoint's per-rank ``sampler`` entry, :meth:`state_dict` / :meth:`load_state_dict`).

Gradient accumulation (``micro_batches`` M > 1): the sampler draws one batch of M x ``batch_size`` rows per
step (a pure function of the step, as before), which the producer splits into M micro-batches, each fetched
from the teacher on its own and queued on its own; :meth:`TeacherFeed.next` hands them out in order, and the
step counts as consumed (the sampler state a checkpoint stores) after its last micro-batch. All of a step's
micro-batches come from one draw, so under one weights version.

The sampler is only touched by the producer thread while a window is active and by the caller
otherwise, so no lock is needed around it.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from ddk.teacher.routes import ask

log = logging.getLogger(__name__)

DEFAULT_DEPTH = 4  # (micro-)batches fetched ahead; small: each holds [B, L, k] teacher outputs


class Sampler(Protocol):
    def draw(self, step: int, weights: dict[str, float], batch_size: int) -> list[tuple[str, int]]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Batch:
    """One step's training batch (with gradient accumulation: one of the step's micro-batches)."""

    step: int                      # optimiser steps completed before this batch (0-based step index)
    rows: list[tuple[str, int]]    # (domain, block index) per row
    input_ids: torch.Tensor        # int64 [B, seq_len + 1]: inputs are [:, :-1], labels [:, 1:]
    teacher: Any | None            # TeacherOutput for input_ids (rows j predict token j+1), None for CPT
    sampler_state: dict            # the sampler's state right after drawing this batch
    micro: int = 0                 # which micro-batch of the step (0 .. micros - 1)
    micros: int = 1                # micro-batches per step (train.grad_accum_steps)
    labels: torch.Tensor | None = None  # int64 [B, seq_len] targets, -100 where not trained on (conversation
    #                                     domains: only assistant tokens); None: every token, input_ids[:, 1:]

    def targets(self) -> torch.Tensor:
        """The next-token targets of ``input_ids[:, :-1]``: ``labels``, or ``input_ids[:, 1:]``."""
        return self.labels if self.labels is not None else self.input_ids[:, 1:]


def domain_labels(domains: dict) -> Callable[[Sequence[tuple[str, int]]], np.ndarray] | None:
    """The feed's ``labels(rows)`` for ``domains`` (name -> :class:`~ddk.data.domains.PackedDomain`): each row's
    :meth:`~ddk.data.domains.PackedDomain.targets` (a conversation domain's assistant tokens only); None when
    every domain is text (then every token is a label and batches carry no labels)."""
    if not any(getattr(d, "conversations", False) for d in domains.values()):
        return None

    def labels(rows: Sequence[tuple[str, int]]) -> np.ndarray:
        return np.concatenate([domains[dn].targets([i]) for dn, i in rows])
    return labels


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class TeacherFeed:
    """Bounded prefetch of (batch, teacher outputs) over a window of steps with fixed weights.

    ``blocks(rows) -> np.ndarray [B, seq_len + 1]`` gathers the token blocks of the drawn rows; ``labels(rows) ->
    np.ndarray [B, seq_len]`` (optional: conversation domains) their targets, -100 where not trained on;
    ``teacher`` is a :class:`~ddk.teacher.client.TeacherClient` (or anything with ``topk``),
    or None when the loss needs no teacher (CPT): then no request is ever made. ``micro_batches``: batches of
    ``batch_size`` per step (:meth:`next` is called that many times per step). ``mixture``: where the weights
    in force are read (anything with ``weights``: the run's MixtureSync).
    """

    def __init__(self, sampler: Sampler, blocks: Callable[[Sequence[tuple[str, int]]], np.ndarray],
                 batch_size: int, teacher: Any | None = None, top_k: int = 0,
                 depth: int = DEFAULT_DEPTH, micro_batches: int = 1, *, mixture: Any,
                 labels: Callable[[Sequence[tuple[str, int]]], np.ndarray] | None = None):
        if depth < 1:
            raise ValueError("depth must be >= 1")
        if micro_batches < 1:
            raise ValueError("micro_batches must be >= 1")
        self.micro_batches = int(micro_batches)
        self._next_micro = 0
        self.sampler = sampler
        self.mixture = mixture
        self.blocks = blocks
        self.labels = labels
        self.batch_size = batch_size
        self.teacher = teacher
        self.top_k = top_k
        self.depth = depth
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._window: tuple[int, int] | None = None
        self._next_step: int | None = None          # the step next() expects
        self._consumed_state = copy.deepcopy(sampler.state_dict())

    # -- window control ------------------------------------------------------------------------
    @property
    def window(self) -> tuple[int, int] | None:
        """The active window [start, stop), or None when idle."""
        return self._window

    def covers(self, step: int) -> bool:
        return self._window is not None and self._window[0] <= step < self._window[1] \
            and self._next_step == step

    def schedule(self, start: int, stop: int) -> None:
        """Prefetch batches for steps ``start .. stop-1``, drawn with the mixture's weights as they are now."""
        if stop <= start:
            raise ValueError(f"empty window [{start}, {stop})")
        self.cancel()
        self.sampler.load_state_dict(copy.deepcopy(self._consumed_state))
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.depth)
        self._window = (start, stop)
        self._next_step = start
        self._next_micro = 0
        self._thread = threading.Thread(
            target=self._produce, name=f"teacher-feed-{start}",
            args=(start, stop, dict(self.mixture.weights), self._stop, self._queue), daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        """Stop prefetching; drop queued batches; rewind the sampler to the last consumed batch."""
        if self._thread is not None:
            self._stop.set()
            while self._thread.is_alive():
                try:  # unblock a producer waiting on a full queue
                    self._queue.get(timeout=0.05)
                except queue.Empty:
                    pass
            self._thread.join()
            self._thread = None
        self._window = None
        self._next_step = None
        self._next_micro = 0
        self.sampler.load_state_dict(copy.deepcopy(self._consumed_state))

    def close(self) -> None:
        self.cancel()

    # -- consumer ------------------------------------------------------------------------------
    def next(self, step: int) -> tuple[Batch, float]:
        """The (next micro-)batch for ``step`` and the seconds spent waiting for it."""
        if not self.covers(step):
            raise RuntimeError(f"step {step} is outside the feed's window {self._window} "
                               f"(next expected {self._next_step})")
        t0 = time.perf_counter()
        item = self._queue.get()
        waited = time.perf_counter() - t0
        if isinstance(item, _Failure):
            self._thread.join()
            self._thread = None
            self._window = None
            raise item.exc
        assert item.step == step and item.micro == self._next_micro, (item.step, item.micro, step,
                                                                      self._next_micro)
        if item.micro + 1 < item.micros:  # more micro-batches of this step to come
            self._next_micro += 1
            return item, waited
        self._next_micro = 0
        self._consumed_state = item.sampler_state
        self._next_step = step + 1
        if self._next_step >= self._window[1]:
            self._thread.join()
            self._thread = None
            self._window = None
        return item, waited

    def state_dict(self) -> dict:
        """The sampler's state after the last batch handed out (what a checkpoint must store)."""
        return copy.deepcopy(self._consumed_state)

    def load_state_dict(self, state: dict) -> None:
        """Restore the sampler's position (the feed idle). A state that does not fit this sampler (domains,
        seed, rank or world size changed) is logged and skipped: the block order then starts afresh."""
        self.cancel()
        try:
            self.sampler.load_state_dict(copy.deepcopy(state))
        except (ValueError, KeyError) as e:
            log.warning("sampler state not reusable (%s); its block order starts afresh", e)
            return
        self._consumed_state = copy.deepcopy(self.sampler.state_dict())

    # -- producer ------------------------------------------------------------------------------
    def _produce(self, start: int, stop: int, weights: dict[str, float], stop_event: threading.Event,
                 out: queue.Queue) -> None:
        try:
            for step in range(start, stop):
                if stop_event.is_set():
                    return
                B, M = self.batch_size, self.micro_batches
                drawn = self.sampler.draw(step, weights, B * M)
                state = copy.deepcopy(self.sampler.state_dict())
                for m in range(M):
                    if stop_event.is_set():
                        return
                    rows = drawn[m * B:(m + 1) * B]
                    ids = torch.from_numpy(np.asarray(self.blocks(rows), dtype=np.int64))
                    teacher = None if self.teacher is None else \
                        ask(self.teacher, ids, self.top_k, [dn for dn, _ in rows])  # rows to their domain's route
                    labels = None if self.labels is None else \
                        torch.from_numpy(np.asarray(self.labels(rows), dtype=np.int64))
                    batch = Batch(step=step, rows=list(rows), input_ids=ids, teacher=teacher,
                                  sampler_state=state, micro=m, micros=M, labels=labels)
                    while not stop_event.is_set():
                        try:
                            out.put(batch, timeout=0.1)
                            break
                        except queue.Full:
                            continue
        except BaseException as e:  # handed to the consumer, raised in the training loop
            log.debug("teacher feed failed", exc_info=True)
            while not stop_event.is_set():
                try:
                    out.put(_Failure(e), timeout=0.1)
                    return
                except queue.Full:
                    continue
