"""One ``ddk train`` run under the chaos supervisor: :class:`Supervisor` starts the driver, fires each fault of
the schedule at its moment, restarts what was killed after the fault's delay (as a deployment's restart policy
would: a teacher or the controller on the same port and SQLite file, the driver with the same command, so the
run resumes from its latest checkpoint), and restarts a driver, teacher or controller that exits by itself
(counted as unplanned). A train worker is replaced by Ray Train itself (``ray.max_failures``).

A fault fires at the first fresh step record at or after its step that suits its phase while its target is up
(a replica that is down is not killed again: the other one is, or the fault waits), and not at a record that a
killed driver's workers, or a group that lost a worker, wrote before the next attempt took over the run. Every
kill is a SIGKILL: of the process group (teacher, controller, driver) or of one ``ray::RayTrainWorker`` process,
found among the descendants of this cluster's raylet.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from chaos.cluster import REPO, Cluster, alive, unread_requests
from chaos.schedule import KINDS, Fault, phase_steps
from ddk.launcher import Child

ALPHA = 0.5  # the kit's mixture.alpha (passed explicitly below)
POLL_S = 0.02
ARM_S = 15.0  # how long a mid-evaluation fault waits for its step's checkpoint to be complete
FREEZE_S = 10.0  # mid-grading: how long the frozen replicas wait for a request before they are thawed
ON_POLICY_NEW_TOKENS = 16  # --on-policy: rollout.max_new_tokens (long enough that generating takes a while)


class MetricsTail:
    """The run's metrics.jsonl, re-read when it changes; ``poll`` gives the step records that are new since
    the last call (none when the file was rewritten: a resumed attempt truncates it)."""

    def __init__(self, path: Path):
        self.path = path
        self.key = None
        self.records: list[dict] = []
        self.rewrites = 0  # times the file was replaced or shortened (a resumed attempt truncates it)

    def poll(self) -> list[dict]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            if self.key is not None:
                self.key, self.records = None, []
                self.rewrites += 1
            return []
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if key == self.key:
            return []
        grew = self.key is not None and st.st_ino == self.key[0] and st.st_size > self.key[1]
        first = self.key is None
        if not first and not grew:
            self.rewrites += 1
        self.key = key
        text = self.path.read_text(encoding="utf-8", errors="replace")
        lines = text.split("\n")[:-1]  # a torn last line is not a record yet
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        old = len(self.records)
        self.records = records
        if grew or first:
            return [r for r in records[old if grew else 0:] if r.get("event") == "step"]
        return []

    def has_eval(self, step: int) -> bool:
        return any(r.get("event") == "eval" and r.get("step") == step for r in self.records)


@dataclass
class RunResult:
    run_id: str
    out: str
    rc: int | None = None
    wall_s: float | None = None
    timed_out: bool = False
    driver_starts: int = 0
    driver_unplanned: int = 0
    restarts: dict = field(default_factory=dict)
    unplanned: dict = field(default_factory=dict)
    faults: list = field(default_factory=list)
    step_s_median: float | None = None
    teacher_failures_logged: int = 0
    teacher_cut_mid_request: int = 0
    ray_resumes: int = 0
    storage_resumes: int = 0


def train_sets(args, cl: Cluster, run_id: str, out: Path) -> list[str]:
    sets = {"run_id": run_id, "output_dir": str(out), "controller.url": cl.controller.child.url,
            "teacher.urls": "[" + ",".join(t.child.url for t in cl.teachers) + "]",
            "train.steps": args.steps, "train.batch_size": args.batch_size, "train.lr": "2e-3",
            "mixture.interval_steps": args.interval, "mixture.alpha": ALPHA, "checkpoint.every_steps": args.every,
            "checkpoint.keep": 2, "ray.num_workers": 2, "ray.address": f"127.0.0.1:{cl.gcs}",
            "ray.max_failures": 2 * args.faults + 5, "eval.sequences_per_domain": 4, "seed": args.seed,
            "data.cache_dir": str(cl.kit.parent / "token-cache")}
    if getattr(args, "on_policy", False):  # every conversation row a rollout of the student (chaos.chat's domain)
        sets.update(args.chat)
        sets.update({"kd.on_policy": 1, "rollout.max_new_tokens": ON_POLICY_NEW_TOKENS})
    out_args = []
    for k, v in sets.items():
        out_args += ["--set", f"{k}={v}"]
    return out_args


class Supervisor:
    """Start the driver, fire ``faults``, restart what dies, until the driver exits 0 (or the deadline):
    :meth:`run` polls every ``POLL_S`` seconds; each poll is :meth:`tick`."""

    def __init__(self, args, cl: Cluster, run_id: str, out: Path, faults: list[Fault], deadline: float,
                 say=print) -> None:
        self.args, self.cl, self.faults, self.deadline, self.say = args, cl, faults, deadline, say
        self.rng = random.Random(args.seed * 7919 + 1)  # run-time choices: which replica, which worker
        self.res = RunResult(run_id, str(out), restarts={k: 0 for k in KINDS}, unplanned={k: 0 for k in KINDS})
        self.driver = Child(["train", str(cl.kit / "train.yaml"), *train_sets(args, cl, run_id, out)],
                            cl.work / "logs" / f"driver-{run_id}.log", None, cl.env, name=f"driver-{run_id}",
                            cwd=REPO)
        cl.drivers.append(self.driver)
        self.storage = out / "ray" / run_id
        self.tail = MetricsTail(out / "metrics.jsonl")
        self.pending = list(faults)
        self.fired: list[Fault] = []
        self.armed: tuple[Fault, int, float] | None = None  # a mid-evaluation fault waiting for its checkpoint
        self.frozen: tuple[Fault, int, list, float] | None = None  # mid-grading: (fault, step, replicas, since)
        self.victim = None  # mid-grading: the frozen replica, handed to kill_teacher
        self.hold_s = 0.0
        self.driver_due: float | None = None
        self.step_times: list[float] = []
        self.last_fresh: float | None = None
        self.valid = {p: set(v) for p, v in phase_steps(args.steps, args.interval, args.every).items()}
        self.t0 = time.monotonic()
        self.complete_step = None

    def rel(self, t: float) -> float:
        return round(t - self.t0, 2)

    def run(self) -> RunResult:
        self.t0 = time.monotonic()
        self.driver.start()
        self.res.driver_starts = 1
        from ddk.trainer.checkpoint import complete_step  # imports torch: seconds, not while a fault is armed

        self.complete_step = complete_step
        while self.tick(time.monotonic()):
            time.sleep(POLL_S)
        res = self.res
        res.wall_s = round(time.monotonic() - self.t0, 1)
        res.faults = [asdict(f) for f in self.faults]
        res.step_s_median = round(statistics.median(self.step_times), 3) if self.step_times else None
        return res

    def tick(self, now: float) -> bool:
        """One poll; False when the run is over (the driver finished, gave up, or the deadline passed)."""
        if now > self.deadline:
            self.res.timed_out = True
            self.say(f"  [{self.rel(now):7.1f}s] duration limit reached: stopping")
            return False
        if self.cl.ray.poll() is not None:  # the schedule never kills the head: a head that exited ends the run now
            self.res.timed_out = True        # (rather than the driver retrying the GCS until the duration limit)
            self.say(f"  [{self.rel(now):7.1f}s] the Ray head exited ({self.cl.ray.returncode}): stopping; "
                     f"{self.cl.ray.log_text()[-300:]!r}")
            return False
        if not self.watch_driver(now):
            return False
        self.watch_services(now)
        self.restart_due(now)
        self.mark_services_up()
        self.on_records(now)
        for f in self.fired:
            if f.orphans and f.orphans_gone_at is None and not any(alive(p) for p in f.orphans):
                f.orphans_gone_at = self.rel(now)
        self.fire_armed(now)
        return True

    # -- restarts ------------------------------------------------------------------------------------------
    def watch_driver(self, now: float) -> bool:
        """An exited driver: done (exit 0), or restarted in 2 s (an unplanned exit); False when done or when
        it exited too often."""
        res = self.res
        rc = self.driver.poll() if self.driver_due is None else None
        if rc is None:
            return True
        if rc == 0:
            res.rc = 0
            for f in self.fired:  # a killed driver's orphaned workers can write the run's last steps themselves
                if f.kind == "driver" and f.recovered_at is None:  # (Ray ends them a moment later): its restart
                    f.recovered_at = self.rel(now)  # then resumed, found every step done and exported, and the
            return False                            # run recovered when it finished
        res.driver_unplanned += 1
        res.unplanned["driver"] += 1
        self.driver_due = now + 2.0
        self.say(f"  [{self.rel(now):7.1f}s] supervisor: the driver exited with {rc}; restarting it in 2 s")
        if res.driver_unplanned > 2 * len(self.faults) + 5:
            res.rc = rc
            self.say("  too many driver exits: giving up")
            return False
        return True

    def watch_services(self, now: float) -> None:
        """A teacher or the controller that exited by itself is restarted in 2 s (unplanned)."""
        for s in self.cl.services:
            if s.restart_due is None and s.child.poll() is not None:
                s.unplanned += 1
                self.res.unplanned["teacher" if s.name.startswith("teacher") else "controller"] += 1
                s.restart_due = now + 2.0
                self.say(f"  [{self.rel(now):7.1f}s] supervisor: {s.name} exited with {s.child.returncode}; "
                         "restarting it in 2 s")

    def restart_due(self, now: float) -> None:
        for s in self.cl.services:
            if s.restart_due is not None and now >= s.restart_due:
                s.restart_due = None
                s.start()
                self.say(f"  [{self.rel(now):7.1f}s] supervisor: restarted {s.name}")
        if self.driver_due is not None and now >= self.driver_due:
            self.driver_due = None
            self.driver.start()
            self.res.driver_starts += 1
            self.say(f"  [{self.rel(now):7.1f}s] supervisor: restarted the driver (same command)")
            for f in self.fired:
                if f.kind == "driver" and f.up_at is None:
                    f.up_at = self.rel(now)

    def mark_services_up(self) -> None:
        """A killed teacher or controller healthy again."""
        for f in self.fired:
            if f.up_at is None and f.kind in ("teacher", "controller"):
                svc = next(s for s in self.cl.services if s.name == f.target)
                if svc.up.is_set() and svc.up_at is not None and svc.up_at > self.t0 + f.fired_at:
                    f.up_at = self.rel(svc.up_at)

    # -- the run's step records ----------------------------------------------------------------------------
    def on_records(self, now: float) -> None:
        """New step records: step times, recoveries, and the next fault when this is its moment."""
        fresh = self.tail.poll()
        if not fresh:
            return
        if self.last_fresh is not None and len(fresh) == 1:
            self.step_times.append(now - self.last_fresh)
        self.last_fresh = now
        s = int(fresh[-1]["step"])
        self.note_recoveries(len(fresh), s, now)
        if self.armed is not None and s != self.armed[1]:
            self.armed = None
        # a record of a group whose worker or driver was killed (written before the next attempt took over
        # metrics.jsonl) is no moment for the next fault: whatever it kills is dying already
        stale = any(f.kind in ("worker", "driver") and self.tail.rewrites == f.rewrites_at_kill for f in self.fired)
        if self.frozen is not None and s > self.frozen[1]:  # the next step went by without the frozen replica
            self.thaw()
        waiting = self.armed is not None or self.frozen is not None
        if not waiting and self.pending and not stale and self.suits(self.pending[0], s):
            self.next_fault(s, now)

    def note_recoveries(self, n_fresh: int, s: int, now: float) -> None:
        for f in self.fired:
            resumed = f.kind not in ("worker", "driver") or self.tail.rewrites > f.rewrites_at_kill
            if f.kind == "driver" and not resumed:
                f.orphan_steps += n_fresh
            if f.recovered_at is None and s > f.fired_step and resumed:
                f.recovered_at = self.rel(now)
                if f.kind == "worker" and f.up_at is None:  # the new group stepping
                    f.up_at = self.rel(now)

    def suits(self, f: Fault, s: int) -> bool:
        """At or after its step, in its phase; or at any step once no step of its phase is left (so that a
        fault that had to wait is still injected)."""
        steps = self.args.steps
        if s < f.step or s >= steps:
            return False
        return s in self.valid[f.phase] or not any(s < v < steps - 1 for v in self.valid[f.phase])

    def next_fault(self, s: int, now: float) -> None:
        """The first pending fault at step ``s``: fired now, or armed (mid-evaluation at a checkpoint step:
        fired once that checkpoint is complete, :meth:`fire_armed`)."""
        f = self.pending[0]
        if f.phase == "mid-grading":  # at any step it suits: the freeze waits for a grading request
            self.freeze(f, s, now)
        elif s not in self.valid[f.phase]:
            f.phase += " (window passed: next step)"
            if self.fire(f, s, now):
                self.pending.pop(0)
        elif f.phase == "mid-evaluation" and s % self.args.every == 0:
            self.armed = (f, s, now + ARM_S)  # wait for its checkpoint to be complete, then kill in the eval
        elif self.fire(f, s, now):
            self.pending.pop(0)

    def freeze(self, f: Fault, s: int, now: float) -> None:
        """mid-grading, first half: SIGSTOP every replica that is up, right after the step-``s`` record. Their
        kernels still accept connections and requests, nothing answers; the feed prefetched step ``s + 1``'s
        top-k long before, so what arrives is the workers' grading of step ``s + 1``. :meth:`fire_armed` kills
        the first replica holding an unread request (:func:`~chaos.cluster.unread_requests`) and thaws the
        others, so the request is cut in flight and the client fails over; nothing within ``FREEZE_S``: all
        thawed, the fault waits for its next step."""
        up = [t for t in self.cl.teachers if t.up.is_set() and t.child.poll() is None]
        for t in up:
            t.child.signal_group(signal.SIGSTOP)
        if up:
            self.frozen = (f, s, up, now)

    def thaw(self, keep=None) -> None:
        """SIGCONT the frozen replicas (but ``keep``, about to be killed)."""
        for t in self.frozen[2]:
            if t is not keep:
                t.child.signal_group(signal.SIGCONT)
        self.frozen = None

    def fire_frozen(self, now: float) -> None:
        f, s, replicas, since = self.frozen
        holding = [t for t in replicas if unread_requests(t.child.port)]
        if holding:
            self.victim, self.hold_s = holding[0], now - since
            self.thaw(keep=holding[0])
            if self.fire(f, s, now):
                self.pending.pop(0)
        elif now - since > FREEZE_S:
            self.thaw()

    def fire_armed(self, now: float) -> None:
        if self.frozen is not None:
            self.fire_frozen(now)
        if self.armed is None:
            return
        f, s, give_up = self.armed
        ckpt = self.storage / f"step-{s:08d}"
        if self.tail.has_eval(s) or now > give_up:
            self.armed = None  # missed it: the next suitable step
        elif ckpt.is_dir() and self.complete_step(ckpt) == s:
            self.armed = None
            if self.fire(f, s, now):
                self.pending.pop(0)

    # -- the kills -----------------------------------------------------------------------------------------
    def fire(self, f: Fault, s: int, now: float) -> bool:
        """SIGKILL ``f``'s target at step ``s`` (False: its target is not up, the fault waits)."""
        landed = self.landed(f, s)
        kill = {"teacher": self.kill_teacher, "controller": self.kill_controller, "worker": self.kill_worker,
                "driver": self.kill_driver}[f.kind]
        if not kill(f, now):
            return False
        f.fired_step, f.fired_at, f.landed = s, self.rel(now), landed
        f.rewrites_at_kill = self.tail.rewrites
        self.fired.append(f)
        self.res.restarts[f.kind] += 1 if f.kind != "worker" else 0
        self.say(f"  [{self.rel(now):7.1f}s] fault {f.index}: SIGKILL {f.target} ({f.kind}, {f.phase}, step {s}; "
                 f"{landed or '-'})" + (f", restart in {f.delay:.1f}s" if f.kind != "worker"
                                       else ", Ray Train replaces it"))
        return True

    def landed(self, f: Fault, s: int) -> str:
        """What the kill interrupts, seen from here: the checkpoint in storage yet, the evaluation recorded."""
        if f.phase == "mid-checkpoint":
            there = (self.storage / f"step-{s:08d}").exists()
            return "checkpoint in storage" if there else "checkpoint not yet in storage"
        if f.phase == "mid-evaluation":
            self.tail.poll()
            return "evaluation already recorded" if self.tail.has_eval(s) else "evaluation not yet recorded"
        if f.phase in ("mid-rollout", "mid-grading"):
            self.tail.poll()
            late = any(r.get("event") == "step" and r.get("step") == s + 1 for r in self.tail.records)
            held = (f"a request held {self.hold_s:.2f} s after the step-{s} record, cut; " if self.victim else "")
            return (held + f"rollouts take {generation_s(self.tail.records, s):.2f} s, grading "
                    f"{grading_s(self.tail.records, s):.2f} s" + (f"; step {s + 1} already recorded" if late else ""))
        return ""

    def kill_teacher(self, f: Fault, now: float) -> bool:
        victim, self.victim = getattr(self, "victim", None), None  # mid-grading: the frozen replica
        if victim is None:
            up = [t for t in self.cl.teachers if t.up.is_set() and t.child.poll() is None]
            if not up:
                return False
            victim = self.rng.choice(up)
        victim.kill()
        victim.restart_due = now + f.delay
        f.target = victim.name
        return True

    def kill_controller(self, f: Fault, now: float) -> bool:
        c = self.cl.controller
        if not c.up.is_set() or c.child.poll() is not None:
            return False
        c.kill()
        c.restart_due = now + f.delay
        f.target = "controller"
        return True

    def kill_worker(self, f: Fault, now: float) -> bool:
        pids = self.cl.train_worker_pids()
        if len(pids) < 2:
            return False
        pid = self.rng.choice(pids)
        ranks = dict(re.findall(r"pid=(\d+)\) world_rank=(\d+)", self.driver.log_text()))
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        f.target = f"worker pid {pid}" + (f" (rank {ranks[str(pid)]})" if str(pid) in ranks else "")
        return True

    def kill_driver(self, f: Fault, now: float) -> bool:
        if self.driver.poll() is not None or self.driver_due is not None:
            return False
        f.target = f"driver pid {self.driver.pid}"
        f.orphans = self.cl.train_worker_pids()
        self.driver.kill()
        self.driver_due = now + f.delay
        return True


def _onpolicy(records: list[dict], step: int) -> dict:
    """Rank 0's ``onpolicy`` record of the latest step up to ``step`` at which it made rollouts ({}: none)."""
    got = [r["onpolicy"] for r in records if r.get("event") == "step" and r.get("step", 0) <= step
           and (r.get("onpolicy") or {}).get("generation_s") is not None]
    return got[-1] if got else {}


def generation_s(records: list[dict], step: int) -> float:
    """How long generating rollouts takes: rank 0's ``onpolicy.generation_s`` of the latest step up to ``step``
    that had rollouts (0 when none had)."""
    return float(_onpolicy(records, step).get("generation_s") or 0.0)


def grading_s(records: list[dict], step: int) -> float:
    return float(_onpolicy(records, step).get("grading_s") or 0.0)


def harvest_logs(log_text: str, res: RunResult) -> None:
    """Counts from the driver's log, which has every line of its workers (RAY_DEDUP_LOGS=0)."""
    rid = re.escape(res.run_id)
    res.ray_resumes = len(set(re.findall(rf"pid=(\d+)\)\S* rank 0: resumed from \S*/{rid}/(\S+) at step", log_text)))
    res.storage_resumes = len(set(re.findall(rf"pid=(\d+)\)\S* \S*/{rid}/(step-\d+) is a complete checkpoint newer",
                                             log_text)))
    res.teacher_failures_logged = len(re.findall(r"teacher topk on \S+ failed", log_text))
    res.teacher_cut_mid_request = len(re.findall(r"teacher topk on \S+ failed \(attempt \d+\): "
                                                 r"(?:ReadError|RemoteProtocolError|ReadTimeout)", log_text))
