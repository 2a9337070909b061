"""The trainer's one copy of the domain mixture: :class:`MixtureSync`.

It owns, in one process:

* the current weights and their version (what the teacher feed draws the next batches with: the feed reads them
  from here when it schedules a window, and hands them to the sampler);
* the evaluations not yet accepted by the controller, oldest first (rank 0 posts them in order: the controller
  wants increasing steps, and an outage across a boundary must not lose an interval);
* the one :class:`RetryPolicy`: the quick attempts of one try (done by the controller client it configures), the
  steps between two tries during the run (1, 2, 4 ... at most 32), and the end of the run, which keeps trying
  for ``end_deadline_s`` seconds (1, 2, 4, 8 s apart) before the export.

A 409 (the controller already has this step: a resumed run, or an answer lost in transit) is resolved by the
controller client (made with ``resolve_conflicts=True``, ``post_evaluation`` returns the version the controller
recorded for the step).

``state_dict()`` / ``load_state_dict()`` hold all of it as plain JSON values; the checkpoint keeps it as the
``mixture`` entry (ddk.trainer.parallel.Distributed). Every rank has one; only rank 0's has a client, the others
take the weights rank 0 broadcasts (:meth:`adopt`). No torch here.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger("ddk.trainer")

__all__ = ["MixtureSync", "RetryPolicy"]


@dataclass(frozen=True)
class RetryPolicy:
    """How an evaluation that does not get through is tried again.

    ``attempts`` and ``backoff_s``: one try's quick attempts, ``backoff_s`` x 1, 2, 4 ... seconds apart (the
    controller client makes them); ``max_gap_steps``: during the run, the next try is 1, 2, 4 ... steps later, at
    most this many; ``end_deadline_s`` and ``end_max_wait_s``: at the end of the run, tries 1, 2, 4 ... seconds
    apart (at most ``end_max_wait_s``) until the deadline, then the run ends without them, and says so.
    """

    attempts: int = 3
    backoff_s: float = 0.25
    max_gap_steps: int = 32
    end_deadline_s: float = 60.0
    end_max_wait_s: float = 8.0

    def next_gap(self, gap: int) -> int:
        return min(gap * 2, self.max_gap_steps)


class MixtureSync:
    """The mixture in force and the evaluations the controller has not got yet (the module docstring).

    ``client``: a :class:`~ddk.controller.client.ControllerClient` (anything with ``post_evaluation``), or None:
    no controller (a fixed mixture), or a rank other than 0.
    """

    def __init__(self, weights: dict[str, float], version: int = 0, *, client: Any | None = None,
                 run_id: str = "", retry: RetryPolicy = RetryPolicy()) -> None:
        self.weights = {k: float(v) for k, v in weights.items()}
        self.version = int(version)
        self.client, self.run_id, self.retry = client, run_id, retry
        self.unposted: list[dict[str, Any]] = []  # {"step", "student_loss", "teacher_loss", ...}, oldest first
        self._next_try = 0   # the step of the next try during the run
        self._gap = 1        # steps to the try after it, when this one fails

    @classmethod
    def connect(cls, url: str | None, token: str | None, run_id: str, weights: dict[str, float], version: int,
                retry: RetryPolicy = RetryPolicy()) -> "MixtureSync":
        """Rank 0's: with a controller client when ``url`` is set (its retries are ``retry``'s attempts)."""
        client = None
        if url:
            from ddk.controller.client import ControllerClient

            client = ControllerClient(url, token, timeout=10.0, max_retries=retry.attempts - 1,
                                      backoff=retry.backoff_s, resolve_conflicts=True)
        return cls(weights, version, client=client, run_id=run_id, retry=retry)

    # -- the weights ---------------------------------------------------------------------------------
    def adopt(self, weights: dict[str, float], version: int) -> bool:
        """Take ``weights``/``version`` (rank 0's, broadcast); whether the version changed."""
        changed = int(version) != self.version
        self.weights, self.version = {k: float(v) for k, v in weights.items()}, int(version)
        return changed

    # -- evaluations ---------------------------------------------------------------------------------
    def submit(self, step: int, student_loss: dict[str, float], teacher_loss: dict[str, float] | None,
               tokens: dict[str, float] | None = None, diagnostics: dict[str, dict] | None = None,
               **fields: Any) -> None:
        """A new evaluation to post, behind any still unposted. ``tokens`` (student tokens trained per domain so
        far), ``diagnostics`` and any further fields of the evaluation body are posted with it when not None."""
        ev: dict[str, Any] = {"step": int(step), "student_loss": dict(student_loss),
                              "teacher_loss": None if teacher_loss is None else dict(teacher_loss)}
        if tokens is not None:
            ev["tokens"] = dict(tokens)
        if diagnostics:
            ev["diagnostics"] = {n: dict(d) for n, d in diagnostics.items()}
        ev.update({k: copy.deepcopy(v) for k, v in fields.items() if v is not None})
        self.unposted = [p for p in self.unposted if p["step"] < ev["step"]] + [ev]
        self._next_try, self._gap = int(step), 1

    def try_post(self, step: int) -> dict | None:
        """At ``step``, when a try is due: post the unposted evaluations oldest first. The newest answer
        ``{version, step, weights}`` accepted (its weights now in force), or None when nothing got through."""
        if not self.unposted or step < self._next_try:
            return None
        if self.client is None:  # fixed mixture without a controller: the weights stay as they are
            self.unposted = []
            return {"version": self.version, "step": int(step), "weights": dict(self.weights)}
        from ddk.controller.client import ControllerUnavailable

        answer = None
        while self.unposted:
            try:
                answer = self._post(self.unposted[0])
            except ControllerUnavailable as e:
                self._next_try = step + self._gap
                log.warning("controller unreachable (%s); keeping weights version %d, retrying at step %d",
                            e, self.version, self._next_try)
                self._gap = self.retry.next_gap(self._gap)
                return answer
            self.unposted.pop(0)
        return answer

    def flush(self, clock: Callable[[], float] | None = None,
              sleep: Callable[[float], None] | None = None) -> list[tuple[int, dict]]:
        """The end of the run: try the unposted evaluations every 1, 2, 4 ... s until they get through or
        ``retry.end_deadline_s`` passes. ``[(newest evaluation step posted, answer), ...]`` per successful try."""
        clock, sleep = clock or time.monotonic, sleep or time.sleep
        deadline, wait, got = clock() + self.retry.end_deadline_s, 1.0, []
        while self.unposted and clock() < deadline:
            eval_step = self.unposted[-1]["step"]
            self._next_try = 0  # due now
            answer = self.try_post(eval_step)
            if answer:
                got.append((eval_step, answer))
            if self.unposted:
                sleep(min(wait, max(0.0, deadline - clock())))
                wait = min(wait * 2, self.retry.end_max_wait_s)
        if self.unposted:
            log.warning("the last evaluation (step %d) never reached the controller", self.unposted[-1]["step"])
        return got

    def _post(self, ev: dict) -> dict:
        """Post one evaluation; its answer, now in force (ControllerUnavailable when the controller is away)."""
        extra = {k: v for k, v in ev.items() if k not in ("step", "student_loss", "teacher_loss") and v is not None}
        answer = self.client.post_evaluation(self.run_id, ev["step"], ev["student_loss"], ev["teacher_loss"],
                                             **extra)
        self.weights = {k: float(v) for k, v in answer["weights"].items()}
        self.version = int(answer["version"])
        return answer

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"weights", "version", "unposted"}``: plain JSON values, copies."""
        return {"weights": dict(self.weights), "version": self.version, "unposted": copy.deepcopy(self.unposted)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights = {k: float(v) for k, v in state["weights"].items()}
        self.version = int(state["version"])
        self.unposted = copy.deepcopy(list(state.get("unposted") or []))
        self._next_try, self._gap = 0, 1  # a resumed run tries its unposted evaluations at once

    def close(self) -> None:
        if self.client is not None and hasattr(self.client, "close"):
            self.client.close()
