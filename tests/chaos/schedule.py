"""The chaos schedule: which part dies, in which phase of the run, at which step, and how long until the
supervisor restarts it. Pure (a seed in, the same faults out).

The phases, as the supervisor sees them (the run's ``metrics.jsonl`` and its checkpoint folders):

* ``mid-request``: right after the step record of a step that is neither an interval boundary nor a checkpoint
  step, while the teacher feed is fetching the next batches;
* ``mid-checkpoint``: right after the step record of a checkpoint step, while the checkpoint is being written
  and reported;
* ``mid-evaluation``: at an interval boundary, after its checkpoint (when it has one) is complete and before
  the evaluation's record appears.

With ``--on-policy`` (``kd.on_policy: 1``: every step starts with the workers' rollouts, then their grading by
the teachers) teachers and workers die in two more phases, at the same steps as ``mid-request`` (neither an
interval boundary nor a checkpoint step, so the next step starts right after the record):

* ``mid-rollout`` (a worker): right after the step record, while the workers generate the next step's
  rollouts;
* ``mid-grading`` (a teacher): right after the step record the supervisor freezes both replicas (SIGSTOP: their
  kernels still take connections and requests, nothing answers). The feed prefetched the next step's top-k long
  before, so what arrives is a worker's grading request; the first replica holding an unread request (its
  socket's receive queue, /proc/net/tcp) is SIGKILLed with the request in flight, the other thawed, and the
  client fails over to it. Nothing within 10 s: both thawed, the fault waits for its next step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

KINDS = ("teacher", "controller", "worker", "driver")
PHASES = ("mid-request", "mid-checkpoint", "mid-evaluation")
ON_POLICY_PHASES = {"teacher": ("mid-grading",), "worker": ("mid-rollout",)}  # --on-policy: per kind


@dataclass
class Fault:
    index: int
    kind: str
    phase: str
    step: int          # fires at the first suitable fresh step record >= this step
    delay: float       # seconds before the supervisor restarts what was killed (not for a worker: Ray does)
    # filled in when it fires
    fired_step: int | None = None
    fired_at: float | None = None       # seconds since the run's start
    target: str | None = None           # which replica / worker pid / driver pid
    landed: str | None = None           # what was observed at the kill moment
    up_at: float | None = None          # the killed part back (healthy / restarted / new workers stepping)
    recovered_at: float | None = None   # the first step record past fired_step after the kill (for a worker
    #                                     or the driver: written by the attempt that resumed)
    orphans: list = field(default_factory=list)  # driver kill: its train workers, alive at the kill
    orphans_gone_at: float | None = None  # ... all gone (Ray ends the dead driver's actors)
    orphan_steps: int = 0               # step records written after the kill by the dead driver's workers
    rewrites_at_kill: int = 0


def phase_steps(steps: int, interval: int, every: int) -> dict[str, list[int]]:
    """The steps (1..N-1) where each phase can be hit."""
    boundary = {s for s in range(1, steps) if s % interval == 0}
    ckpt = {s for s in range(1, steps) if s % every == 0}
    plain = sorted(set(range(1, steps)) - boundary - ckpt)
    return {"mid-request": plain, "mid-checkpoint": sorted(ckpt), "mid-evaluation": sorted(boundary),
            "mid-rollout": plain, "mid-grading": plain}


def kind_phases(kind: str, on_policy: bool = False) -> tuple[str, ...]:
    """The phases a fault of ``kind`` may be drawn in: :data:`PHASES`; with ``on_policy`` a teacher dies
    mid-grading and a worker mid-rollout."""
    return ON_POLICY_PHASES.get(kind, PHASES) if on_policy else PHASES


def make_schedule(seed: int, steps: int, faults: int, interval: int, every: int,
                  kinds: tuple[str, ...] = KINDS, delay: tuple[float, float] = (1.0, 5.0),
                  on_policy: bool = False) -> list[Fault]:
    """``faults`` faults, every kind at least once (when there are enough), at distinct steps in 1..N-2; each
    in a phase of :func:`kind_phases` (``on_policy`` off: the same schedule as before the on-policy phases)."""
    rng = random.Random(seed)
    picked = list(kinds) if faults >= len(kinds) else rng.sample(list(kinds), faults)
    picked += [rng.choice(kinds) for _ in range(faults - len(picked))]
    rng.shuffle(picked)
    valid = {p: [s for s in v if s <= steps - 2] for p, v in phase_steps(steps, interval, every).items()}
    used: set[int] = set()
    planned = []
    if on_policy:  # the kinds bound to the on-policy phases draw their steps first (fewer steps suit them)
        picked.sort(key=lambda k: k not in ON_POLICY_PHASES)
    for kind in picked:
        allowed = kind_phases(kind, on_policy)
        phases = [p for p in allowed if set(valid[p]) - used] or list(allowed)
        phase = rng.choice(phases)
        free = sorted(set(valid[phase]) - used) or valid[phase] or list(range(1, max(2, steps - 1)))
        step = rng.choice(free)
        used.add(step)
        planned.append((step, kind, phase, round(rng.uniform(*delay), 2)))
    planned.sort()
    return [Fault(i + 1, kind, phase, step, d) for i, (step, kind, phase, d) in enumerate(planned)]
