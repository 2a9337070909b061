"""Chaos: a real DDK run while a seeded schedule SIGKILLs its parts and a supervisor restarts them.

Everything is real and on loopback: a Ray head (``ray start --head --block``, 2 CPUs, its own temp dir and
ports, so other Ray clusters on the machine are neither seen nor touched), two teacher replicas (hf engine,
the quick kit's teacher), the controller (SQLite), and the ``ddk train`` driver (2 Ray Train workers) connected
to that head through ``ray.address``, so that a killed driver leaves the cluster and its restart reconnects.

The schedule (``--faults F``, ``--seed S``) is a list of faults, each: a kind (a teacher replica, the controller,
a Ray Train worker, the ``ddk train`` driver; every kind at least once when F >= 4), a phase and a step where it
fires, and the supervisor's restart delay. The phases, as seen from here (the run's ``metrics.jsonl`` and its
checkpoint folders in Ray Train's storage):

* ``mid-request``: right after the step record of a step that is neither an interval boundary nor a checkpoint
  step, while the teacher feed is fetching the next batches;
* ``mid-checkpoint``: right after the step record of a checkpoint step, while the checkpoint is being written
  and reported (each fault records whether its folder was in storage yet);
* ``mid-evaluation``: at an interval boundary, after its checkpoint (when it has one) is complete and before
  the evaluation's record appears (each fault records whether it was still missing at the kill).

A fault fires at the first fresh step record at or after its step that suits its phase while its target is up
(a replica that is down is not killed again: the other one is, or the fault waits), and not at a record that a
killed driver's workers, or a group that lost a worker, wrote before the next attempt took over the run. Every
kill is a SIGKILL: of the process group (teacher, controller, driver) or of one ``ray::RayTrainWorker`` process,
found by psutil among the descendants of this cluster's raylet. The supervisor then restarts what was killed
after the fault's delay, as a deployment's restart policy would: a teacher or the controller on the same port
(and SQLite file), the driver with the same command (so the run resumes from its latest checkpoint). A train
worker is replaced by Ray Train itself (``ray.max_failures``). A driver, teacher or controller that exits by itself is restarted too
(counted as unplanned).

Afterwards the checks (all must pass; exit 0):

* the driver finished (exit 0) within ``--duration-limit``, and every planned fault was injected;
* ``metrics.jsonl`` holds every step 1..N exactly once, in order, an evaluation at each boundary exactly once,
  and one ``end`` record; each step's weights are the controller's weights of the version it names;
* the controller's history: versions 0, 1, 2 ... (no gap, no duplicate), one per interval at steps 0, K, 2K ...
  N, and each version's weights are the DDK update of its recorded losses, recomputed here independently
  (:func:`paper_update`, written again from the paper, not imported);
* the final student loads with transformers and gives finite logits; when the schedule killed only teachers
  and train workers, it equals the fault-free run (same seed; ``--baseline``) within float tolerance;
* no process this script started is left (``ray start``, gcs, raylet and workers included), no port held.

It prints the faults per kind, each fault's outcome, the restarts, the time lost and the wall time against the
fault-free run.

Run:  .venv/bin/python bench/chaos.py --steps 60 --faults 20 --seed 1          # the long schedule
      .venv/bin/python bench/chaos.py --steps 9 --faults 4 --seed 2 --no-baseline    # the suite's short one
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO  # noqa: E402
from ddk.launcher import Child, free_port, port_is_bound  # noqa: E402

VENV_BIN = Path(sys.executable).parent
KINDS = ("teacher", "controller", "worker", "driver")
PHASES = ("mid-request", "mid-checkpoint", "mid-evaluation")
MARKER_ENV = "DDK_CHAOS_MARKER"
ALPHA = 0.5  # the kit's mixture.alpha (passed explicitly below)
POLL_S = 0.02


# ----------------------------------------------------------------------------------------------------------
# the schedule

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
    return {"mid-request": sorted(set(range(1, steps)) - boundary - ckpt),
            "mid-checkpoint": sorted(ckpt), "mid-evaluation": sorted(boundary)}


def make_schedule(seed: int, steps: int, faults: int, interval: int, every: int,
                  kinds: tuple[str, ...] = KINDS, delay: tuple[float, float] = (1.0, 5.0)) -> list[Fault]:
    """``faults`` faults, every kind at least once (when there are enough), at distinct steps in 1..N-2."""
    rng = random.Random(seed)
    picked = list(kinds) if faults >= len(kinds) else rng.sample(list(kinds), faults)
    picked += [rng.choice(kinds) for _ in range(faults - len(picked))]
    rng.shuffle(picked)
    valid = {p: [s for s in v if s <= steps - 2] for p, v in phase_steps(steps, interval, every).items()}
    used: set[int] = set()
    planned = []
    for kind in picked:
        phases = [p for p in PHASES if set(valid[p]) - used] or list(PHASES)
        phase = rng.choice(phases)
        free = sorted(set(valid[phase]) - used) or valid[phase] or list(range(1, max(2, steps - 1)))
        step = rng.choice(free)
        used.add(step)
        planned.append((step, kind, phase, round(rng.uniform(*delay), 2)))
    planned.sort()
    return [Fault(i + 1, kind, phase, step, d) for i, (step, kind, phase, d) in enumerate(planned)]


# ----------------------------------------------------------------------------------------------------------
# the paper's update, written again (not ddk.controller.mixture): Liu et al. 2024, DDK, arXiv 2407.16154

def paper_update(student: dict, teacher: dict, previous: dict | None, alpha: float) -> dict[str, float]:
    """q_i = PPL_S,i / PPL_T,i = exp(L_S,i - L_T,i). First evaluation: r = softmax(q). Later ones:
    psi_i = r_prev,i * exp(q_i), r = alpha * psi / sum(psi) + (1 - alpha) / N."""
    names = sorted(student)
    q = [math.exp(student[n] - teacher[n]) for n in names]
    if previous is None:
        logits = q
    else:
        logits = [math.log(previous[n]) + qi if previous[n] > 0 else -math.inf for n, qi in zip(names, q)]
    top = max(logits)
    e = [math.exp(x - top) for x in logits]
    z = sum(e)
    psi = [x / z for x in e]
    if previous is None:
        return dict(zip(names, psi))
    return {n: alpha * p + (1.0 - alpha) / len(names) for n, p in zip(names, psi)}


# ----------------------------------------------------------------------------------------------------------
# processes

def proc_pids(pred) -> list[int]:
    """Pids of /proc entries whose (cmdline, environ bytes, session id, ppid) satisfy ``pred``."""
    out = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            ppid, session = int(fields[1]), int(fields[3])
            try:
                with open(f"/proc/{entry}/environ", "rb") as fh:
                    environ = fh.read()
            except OSError:
                environ = b""
        except (OSError, ValueError, IndexError):
            continue
        if fields[0] == "Z":
            continue
        if pred(cmd, environ, session, ppid):
            out.append(int(entry))
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Service:
    """A teacher replica or the controller: a launcher Child and whether it answers /healthz."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict):
        self.name = name
        self.child = Child(argv, log, free_port(), env, name=name, cwd=REPO)
        self.up = threading.Event()
        self.up_at: float | None = None
        self.restarts = 0
        self.unplanned = 0
        self.restart_due: float | None = None

    def start(self) -> None:
        self.up.clear()
        self.child.start()
        threading.Thread(target=self._watch, name=f"health-{self.name}", daemon=True).start()

    def _watch(self) -> None:
        try:
            self.child.wait_healthy(timeout=600)
        except Exception:  # noqa: BLE001 - it died again or never came up: the supervisor sees the exit
            return
        self.up_at = time.monotonic()
        self.up.set()

    def kill(self) -> None:
        self.up.clear()
        self.child.kill()


class Cluster:
    """The Ray head, two teacher replicas and the controller; :meth:`close` leaves nothing behind."""

    def __init__(self, kit: Path, work: Path):
        self.kit, self.work = kit, work
        self.marker = uuid.uuid4().hex
        self.temp_dir = tempfile.mkdtemp(prefix="ddkchaos-", dir="/tmp")  # short: Ray's socket paths
        self.gcs = free_port()
        self.env = {MARKER_ENV: self.marker, "RAY_ADDRESS": f"127.0.0.1:{self.gcs}", "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_AUTH_MODE": "disabled", "RAY_DEDUP_LOGS": "0", "TOKENIZERS_PARALLELISM": "false",
                    "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}
        logs = work / "logs"
        self.ray = Child(["start", "--head", f"--port={self.gcs}", "--node-ip-address=127.0.0.1",
                          f"--temp-dir={self.temp_dir}", "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false",
                          f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                          f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
                          f"--ray-client-server-port={free_port()}", "--disable-usage-stats", "--block"],
                         logs / "ray-head.log", None, self.env, name="ray-head", program=[str(VENV_BIN / "ray")],
                         cwd=REPO, append=False)
        teacher = ["teacher", "serve", "--model", str(kit / "teacher"), "--backend", "hf"]
        self.teachers = [Service(f"teacher-{i}", teacher, logs / f"teacher-{i}.log", self.env) for i in range(2)]
        self.controller = Service("controller", ["controller", "serve", "--db", str(work / "controller.sqlite")],
                                  logs / "controller.log", self.env)
        self.services = [*self.teachers, self.controller]
        self.drivers: list[Child] = []

    def open(self, timeout: float = 300) -> None:
        self.ray.start()
        for s in self.services:
            s.start()
        deadline = time.monotonic() + timeout
        while True:
            if self.ray.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.ray.returncode}: {self.ray.log_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.gcs), timeout=1):
                    pass
                if self.raylet_pids():
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("Ray head not up")
            time.sleep(0.5)
        for s in self.services:
            if not s.up.wait(max(1.0, deadline - time.monotonic())):
                raise TimeoutError(f"{s.name} not healthy: {s.child.log_text()[-2000:]}")

    # -- Ray's processes ------------------------------------------------------------------------------------
    def raylet_pids(self) -> list[int]:
        return proc_pids(lambda cmd, env, sess, ppid: "raylet" in cmd.split(" ")[0] and self.temp_dir in cmd)

    def train_worker_pids(self) -> list[int]:
        """``ray::RayTrainWorker`` processes of this cluster (children of its raylet)."""
        raylets = set(self.raylet_pids())
        return sorted(proc_pids(lambda cmd, env, sess, ppid: ppid in raylets and "RayTrainWorker" in cmd))

    def ours(self) -> list[int]:
        """Every live process this script started, directly or not: the marker in its environment, this
        cluster's temp dir on its command line, a session of ours, or a descendant of any of those."""
        sessions = {c.popen.pid for c in [self.ray, *(s.child for s in self.services), *self.drivers]
                    if c.popen is not None}
        needle = f"{MARKER_ENV}={self.marker}".encode()
        found = set(proc_pids(lambda cmd, env, sess, ppid: needle in env or self.temp_dir in cmd or sess in sessions))
        # and their descendants (a Ray worker's environ may be overwritten by its process title)
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as fh:
                        rest = fh.read().rsplit(")", 1)[1].split()
                    if rest[0] != "Z":
                        children.setdefault(int(rest[1]), []).append(int(entry))
                except (OSError, ValueError, IndexError):
                    pass
        todo = list(found)
        while todo:
            for c in children.get(todo.pop(), []):
                if c not in found and c != os.getpid():
                    found.add(c)
                    todo.append(c)
        return sorted(found)

    def close(self) -> list[int]:
        """Stop everything; the pids still alive after that (should be [])."""
        for d in self.drivers:
            if d.popen is not None:
                d.stop(timeout=10)
        for s in self.services:
            if s.child.popen is not None:
                s.child.stop(timeout=10)
        if self.ray.popen is not None:  # a throwaway cluster: no graceful teardown needed
            self.ray.kill()
        for _ in range(3):
            left = self.ours()
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if not left:
                break
            time.sleep(1.0)
        deadline = time.monotonic() + 20
        while (left := self.ours()) and time.monotonic() < deadline:
            time.sleep(0.5)
        return left

    def ports_held(self) -> list[int]:
        return [p for p in [self.gcs, *(s.child.port for s in self.services)] if port_is_bound(p)]


# ----------------------------------------------------------------------------------------------------------
# one run under the supervisor

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
    out_args = []
    for k, v in sets.items():
        out_args += ["--set", f"{k}={v}"]
    return out_args


def supervise(args, cl: Cluster, run_id: str, out: Path, faults: list[Fault], deadline: float,
              say=print) -> RunResult:
    """Start the driver, fire ``faults``, restart what dies, until the driver exits 0 (or the deadline)."""
    rng = random.Random(args.seed * 7919 + 1)  # run-time choices: which replica, which worker
    res = RunResult(run_id, str(out), restarts={k: 0 for k in KINDS}, unplanned={k: 0 for k in KINDS})
    driver = Child(["train", str(cl.kit / "train.yaml"), *train_sets(args, cl, run_id, out)],
                   cl.work / "logs" / f"driver-{run_id}.log", None, cl.env, name=f"driver-{run_id}", cwd=REPO)
    cl.drivers.append(driver)
    storage = out / "ray" / run_id
    tail = MetricsTail(out / "metrics.jsonl")
    pending = list(faults)
    fired: list[Fault] = []
    armed: tuple[Fault, int, float] | None = None  # a mid-evaluation fault waiting for its checkpoint
    driver_due: float | None = None
    t0 = time.monotonic()
    driver.start()
    res.driver_starts = 1
    step_times: list[float] = []
    last_fresh: float | None = None

    def rel(t: float) -> float:
        return round(t - t0, 2)

    def restart_due(now: float) -> None:
        nonlocal driver_due
        for s in cl.services:
            if s.restart_due is not None and now >= s.restart_due:
                s.restart_due = None
                s.start()
                say(f"  [{rel(now):7.1f}s] supervisor: restarted {s.name}")
        if driver_due is not None and now >= driver_due:
            driver_due = None
            driver.start()
            res.driver_starts += 1
            say(f"  [{rel(now):7.1f}s] supervisor: restarted the driver (same command)")
            for f in fired:
                if f.kind == "driver" and f.up_at is None:
                    f.up_at = rel(now)

    def fire(f: Fault, s: int, now: float) -> bool:
        nonlocal driver_due
        landed = ""
        if f.phase == "mid-checkpoint":
            landed = "checkpoint in storage" if (storage / f"step-{s:08d}").exists() else "checkpoint not yet in storage"
        elif f.phase == "mid-evaluation":
            tail.poll()
            landed = "evaluation already recorded" if tail.has_eval(s) else "evaluation not yet recorded"
        if f.kind == "teacher":
            up = [t for t in cl.teachers if t.up.is_set() and t.child.poll() is None]
            if not up:
                return False
            victim = rng.choice(up)
            victim.kill()
            victim.restart_due = now + f.delay
            f.target = victim.name
        elif f.kind == "controller":
            c = cl.controller
            if not c.up.is_set() or c.child.poll() is not None:
                return False
            c.kill()
            c.restart_due = now + f.delay
            f.target = "controller"
        elif f.kind == "worker":
            pids = cl.train_worker_pids()
            if len(pids) < 2:
                return False
            pid = rng.choice(pids)
            ranks = dict(re.findall(r"pid=(\d+)\) world_rank=(\d+)", driver.log_text()))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return False
            f.target = f"worker pid {pid}" + (f" (rank {ranks[str(pid)]})" if str(pid) in ranks else "")
        elif f.kind == "driver":
            if driver.poll() is not None or driver_due is not None:
                return False
            f.target = f"driver pid {driver.pid}"
            f.orphans = cl.train_worker_pids()
            driver.kill()
            driver_due = now + f.delay
        f.fired_step, f.fired_at, f.landed = s, rel(now), landed
        f.rewrites_at_kill = tail.rewrites
        fired.append(f)
        res.restarts[f.kind] += 1 if f.kind != "worker" else 0
        say(f"  [{rel(now):7.1f}s] fault {f.index}: SIGKILL {f.target} ({f.kind}, {f.phase}, step {s}; {landed or '-'})"
            + (f", restart in {f.delay:.1f}s" if f.kind != "worker" else ", Ray Train replaces it"))
        return True

    def suits(f: Fault, s: int) -> bool:
        """At or after its step, in its phase; or at any step once no step of its phase is left (so that a
        fault that had to wait is still injected)."""
        if s < f.step or s >= args.steps:
            return False
        return s in valid[f.phase] or not any(s < v < args.steps - 1 for v in valid[f.phase])

    valid = {p: set(v) for p, v in phase_steps(args.steps, args.interval, args.every).items()}
    from ddk.trainer.checkpoint import complete_step  # imports torch: seconds, not while a fault is armed

    while True:
        now = time.monotonic()
        if now > deadline:
            res.timed_out = True
            say(f"  [{rel(now):7.1f}s] duration limit reached: stopping")
            break
        rc = driver.poll() if driver_due is None else None
        if rc is not None:
            if rc == 0:
                res.rc = 0
                break
            res.driver_unplanned += 1
            res.unplanned["driver"] += 1
            driver_due = now + 2.0
            say(f"  [{rel(now):7.1f}s] supervisor: the driver exited with {rc}; restarting it in 2 s")
            if res.driver_unplanned > 2 * len(faults) + 5:
                res.rc = rc
                say("  too many driver exits: giving up")
                break
        for s in cl.services:
            if s.restart_due is None and s.child.poll() is not None:
                s.unplanned += 1
                res.unplanned["teacher" if s.name.startswith("teacher") else "controller"] += 1
                s.restart_due = now + 2.0
                say(f"  [{rel(now):7.1f}s] supervisor: {s.name} exited with {s.child.returncode}; restarting it in 2 s")
        restart_due(now)
        for f in fired:  # the killed part back
            if f.up_at is None and f.kind in ("teacher", "controller"):
                svc = next(s for s in cl.services if s.name == f.target)
                if svc.up.is_set() and svc.up_at is not None and svc.up_at > t0 + f.fired_at:
                    f.up_at = rel(svc.up_at)
        fresh = tail.poll()
        if fresh:
            if last_fresh is not None and len(fresh) == 1:
                step_times.append(now - last_fresh)
            last_fresh = now
            s = int(fresh[-1]["step"])
            for f in fired:
                resumed = f.kind not in ("worker", "driver") or tail.rewrites > f.rewrites_at_kill
                if f.kind == "driver" and not resumed:
                    f.orphan_steps += len(fresh)
                if f.recovered_at is None and s > f.fired_step and resumed:
                    f.recovered_at = rel(now)
                    if f.kind == "worker" and f.up_at is None:  # the new group stepping
                        f.up_at = rel(now)
            if armed is not None and s != armed[1]:
                armed = None
            # a record of a group whose worker or driver was killed (written before the next attempt took over
            # metrics.jsonl) is no moment for the next fault: whatever it kills is dying already
            stale = any(f.kind in ("worker", "driver") and tail.rewrites == f.rewrites_at_kill for f in fired)
            if armed is None and pending and not stale and suits(pending[0], s):
                f = pending[0]
                if s not in valid[f.phase]:
                    f.phase += " (window passed: next step)"
                    if fire(f, s, now):
                        pending.pop(0)
                elif f.phase == "mid-evaluation" and s % args.every == 0:
                    armed = (f, s, now + 15.0)  # wait for its checkpoint to be complete, then kill in the eval
                elif fire(f, s, now):
                    pending.pop(0)
        for f in fired:
            if f.orphans and f.orphans_gone_at is None and not any(alive(p) for p in f.orphans):
                f.orphans_gone_at = rel(now)
        if armed is not None:
            f, s, give_up = armed
            if tail.has_eval(s) or now > give_up:
                armed = None  # missed it: the next suitable step
            elif (storage / f"step-{s:08d}").is_dir() and complete_step(storage / f"step-{s:08d}") == s:
                armed = None
                if fire(f, s, now):
                    pending.pop(0)
        time.sleep(POLL_S)
    res.wall_s = round(time.monotonic() - t0, 1)
    res.faults = [asdict(f) for f in faults]
    res.step_s_median = round(statistics.median(step_times), 3) if step_times else None
    return res


def harvest_logs(log_text: str, res: RunResult) -> None:
    """Counts from the driver's log, which has every line of its workers (RAY_DEDUP_LOGS=0)."""
    rid = re.escape(res.run_id)
    res.ray_resumes = len(set(re.findall(rf"pid=(\d+)\)\S* rank 0: resumed from \S*/{rid}/(\S+) at step", log_text)))
    res.storage_resumes = len(set(re.findall(rf"pid=(\d+)\)\S* \S*/{rid}/(step-\d+) is a complete checkpoint newer",
                                             log_text)))
    res.teacher_failures_logged = len(re.findall(r"teacher topk on \S+ failed", log_text))
    res.teacher_cut_mid_request = len(re.findall(r"teacher topk on \S+ failed \(attempt \d+\): "
                                                 r"(?:ReadError|RemoteProtocolError|ReadTimeout)", log_text))


# ----------------------------------------------------------------------------------------------------------
# the checks

def expected_evals(steps: int, interval: int) -> list[int]:
    return sorted(set(range(0, steps + 1, interval)) | {steps})


def check_metrics(records: list[dict], steps: int, interval: int) -> list[str]:
    problems = []
    got = [int(r["step"]) for r in records if r.get("event") == "step"]
    if got != list(range(1, steps + 1)):
        dup = sorted({s for s in got if got.count(s) > 1})
        missing = sorted(set(range(1, steps + 1)) - set(got))
        problems.append(f"metrics: step records {len(got)} (missing {missing[:10]}, duplicated {dup[:10]}, "
                        f"in order: {got == sorted(got)})")
    evals = [int(r["step"]) for r in records if r.get("event") == "eval"]
    if evals != expected_evals(steps, interval):
        problems.append(f"metrics: eval records at {evals}, expected {expected_evals(steps, interval)}")
    ends = sum(r.get("event") == "end" for r in records)
    if ends != 1:
        problems.append(f"metrics: {ends} end records")
    return problems


def check_history(history: list[dict], records: list[dict], steps: int, interval: int) -> tuple[list[str], float]:
    problems = []
    versions = [v["version"] for v in history]
    if versions != list(range(len(history))):
        problems.append(f"history: versions {versions} (gap or duplicate)")
    if not history or history[0]["step"] is not None:
        problems.append("history: no version 0 without a step")
    got = [v["step"] for v in history if v["version"] > 0]
    if got != expected_evals(steps, interval):
        problems.append(f"history: versions at steps {got}, expected one per interval {expected_evals(steps, interval)}")
    worst = 0.0
    by_version = {v["version"]: v for v in history}
    for v in history:
        if v["version"] == 0:
            continue
        prev = by_version.get(v["version"] - 1)
        want = paper_update(v["student_loss"], v["teacher_loss"], prev["weights"] if prev and prev["version"] > 0
                            else None, ALPHA)
        diff = max(abs(want[n] - v["weights"][n]) for n in want)
        worst = max(worst, diff)
        if diff > 1e-9 or set(want) != set(v["weights"]):
            problems.append(f"history: version {v['version']} weights differ from the paper's update by {diff:.3g}")
    for r in records:
        if r.get("event") != "step":
            continue
        v = by_version.get(r["version"])
        if v is None or max(abs(v["weights"][n] - r["weights"][n]) for n in r["weights"]) > 1e-9:
            problems.append(f"metrics: step {r['step']} drew with weights that are not version {r['version']}'s")
            break
    return problems, worst


def check_student(final: Path) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=False, use_safetensors=True,
                                                     dtype=torch.float32)
        with torch.no_grad():
            logits = model(input_ids=torch.arange(16).unsqueeze(0) % model.config.vocab_size).logits
    except Exception as e:  # noqa: BLE001
        return [f"final student does not load: {type(e).__name__}: {e}"]
    return [] if bool(torch.isfinite(logits).all()) else ["final student gives non-finite logits"]


def compare_students(a: Path, b: Path) -> float:
    """Largest absolute difference between two exports' tensors (inf when the keys differ)."""
    from safetensors.torch import load_file

    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    if x.keys() != y.keys():
        return math.inf
    return max(float((x[k].double() - y[k].double()).abs().max()) if x[k].numel() else 0.0 for k in x)


def close_students(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    if x.keys() != y.keys():
        return False
    return all(torch.allclose(x[k], y[k], rtol=1e-4, atol=1e-5) for k in x)


# ----------------------------------------------------------------------------------------------------------
# the report

def report(args, schedule, chaos: RunResult, base: RunResult | None, checks: list[tuple[str, bool, str]],
           say=print) -> None:
    say("")
    say(f"chaos: {args.steps} steps, {args.faults} faults, seed {args.seed}, interval {args.interval}, "
        f"checkpoint every {args.every}, batch {args.batch_size} x 2 workers")
    say("")
    say("| # | kind | phase | planned step | fired at step | target | at the kill | restart delay | "
        "back after | recovered after |")
    say("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for f in chaos.faults:
        def since(t, f=f):
            return f"{t - f['fired_at']:.1f} s" if t is not None and f["fired_at"] is not None else "-"
        seen = [f["landed"]] if f["landed"] else []
        if f["orphans"]:
            seen.append(f"its {len(f['orphans'])} workers lived {since(f['orphans_gone_at'])} more"
                        + (f" and wrote {f['orphan_steps']} step(s)" if f["orphan_steps"] else ""))
        say(f"| {f['index']} | {f['kind']} | {f['phase']} | {f['step']} | {f['fired_step'] or 'not fired'} | "
            f"{f['target'] or '-'} | {'; '.join(seen) or '-'} | {f['delay'] if f['kind'] != 'worker' else 'Ray'} | "
            f"{since(f['up_at'])} | {since(f['recovered_at'])} |")
    say("")
    per_kind = {k: (sum(f["kind"] == k for f in chaos.faults), sum(f["kind"] == k and f["fired_step"] is not None
                                                                  for f in chaos.faults)) for k in KINDS}
    say("faults per kind (injected/planned): " + ", ".join(f"{k} {i}/{p}" for k, (p, i) in per_kind.items()))
    say("restarts by the supervisor: " + ", ".join(f"{k} {chaos.restarts[k]}" for k in ("teacher", "controller", "driver"))
        + "; unplanned exits restarted: " + ", ".join(f"{k} {v}" for k, v in chaos.unplanned.items() if k != "worker"))
    say(f"Ray Train: {chaos.ray_resumes} attempts resumed from a checkpoint (worker-group restarts and driver "
        f"restarts), {chaos.storage_resumes} of them from a checkpoint found in storage, not registered")
    say(f"teacher request failures logged by the workers (each retried or failed over): "
        f"{chaos.teacher_failures_logged}, {chaos.teacher_cut_mid_request} of them cut mid-request (connection "
        f"reset or closed with the request in flight)")
    recov = [f["recovered_at"] - f["fired_at"] for f in chaos.faults if f["recovered_at"] is not None]
    step = chaos.step_s_median or 0.0
    say(f"stall per fault (kill to the first step past it), median {statistics.median(recov):.1f} s, max "
        f"{max(recov):.1f} s; median step {step:.2f} s" if recov else "no fault recovered")
    if base is not None and base.wall_s and chaos.wall_s:
        say(f"wall time: chaos run {chaos.wall_s:.1f} s, fault-free run {base.wall_s:.1f} s: "
            f"{chaos.wall_s - base.wall_s:.1f} s lost to {sum(v for _, v in per_kind.values())} faults "
            f"({(chaos.wall_s - base.wall_s) / max(1, sum(v for _, v in per_kind.values())):.1f} s per fault)")
    else:
        say(f"wall time: chaos run {chaos.wall_s} s (no fault-free run)")
    say("")
    say("checks:")
    for name, ok, detail in checks:
        say(f"  [{'ok' if ok else 'FAIL'}] {name}" + (f": {detail}" if detail else ""))
    say("")
    say("chaos: PASSED" if all(ok for _, ok, _ in checks) else "chaos: FAILED")


# ----------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    p.add_argument("--faults", type=int, default=20, help="faults to inject (default 20)")
    p.add_argument("--seed", type=int, default=1, help="seed of the schedule and of the run (default 1)")
    p.add_argument("--duration-limit", type=float, default=2400.0, help="seconds for everything (default 2400)")
    p.add_argument("--interval", type=int, default=None, help="mixture.interval_steps (default max(3, steps/10))")
    p.add_argument("--every", type=int, default=None, help="checkpoint.every_steps (default max(2, 2*interval/3))")
    p.add_argument("--batch-size", type=int, default=2, help="rows per worker and step (default 2)")
    p.add_argument("--kinds", default=",".join(KINDS), help="fault kinds to draw from (default all four)")
    p.add_argument("--delay", default="1,5", help="restart delay range in seconds (default 1,5)")
    p.add_argument("--no-baseline", action="store_true", help="skip the fault-free run (no equality check, "
                   "no wall-time comparison)")
    p.add_argument("--kit", default=str(REPO / ".cache" / "kit-quick"), help="the quick kit (built when absent)")
    p.add_argument("--out", default=None, help="working directory (default: a temp dir, removed unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    p.add_argument("--json", default=None, help="write the results and checks as JSON here")
    args = p.parse_args(argv)
    args.interval = args.interval or max(3, args.steps // 10)
    args.every = args.every or max(2, (2 * args.interval) // 3)
    args.kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = set(args.kinds) - set(KINDS)
    if unknown or not args.kinds:
        p.error(f"--kinds: unknown {sorted(unknown)} (known: {', '.join(KINDS)})")
    lo, hi = (float(x) for x in args.delay.split(","))
    args.delay = (lo, hi)
    if args.steps < 4:
        p.error("--steps: at least 4")
    return args


def _preload() -> None:
    """Import what the checks need (torch, transformers: seconds on 2 busy cores)."""
    try:
        import safetensors.torch  # noqa: F401
        import transformers  # noqa: F401
    except Exception:  # noqa: BLE001, S110 - the checks import them again and report
        pass


class _Terminated(KeyboardInterrupt):
    pass


def main(argv=None) -> int:
    args = parse_args(argv)
    t_all = time.monotonic()
    deadline = t_all + args.duration_limit
    schedule = make_schedule(args.seed, args.steps, args.faults, args.interval, args.every, args.kinds, args.delay)
    killed_kinds = {f.kind for f in schedule}
    want_equal = killed_kinds <= {"teacher", "worker"}
    print(f"schedule (seed {args.seed}): " + "; ".join(f"{f.index}: {f.kind} {f.phase} step {f.step} "
                                                        f"(+{f.delay}s)" for f in schedule), flush=True)
    kit = Path(args.kit)
    if not (kit / "train.yaml").is_file():
        from ddk.kit.fixtures import build_kit

        build_kit(kit, quick=True, seed=0)
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ddk-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    old_term = signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(_Terminated()))
    cl = Cluster(kit, work)
    base = chaos = None
    history: list[dict] = []
    records: list[dict] = []
    left: list[int] = []
    ports: list[int] = []
    error = None
    tag = f"s{args.seed}-{uuid.uuid4().hex[:6]}"
    try:
        cl.open(timeout=max(30.0, min(300.0, deadline - time.monotonic())))
        print(f"[{time.monotonic() - t_all:6.1f}s] Ray head, 2 teachers and the controller up", flush=True)
        if not args.no_baseline:
            print("fault-free run:", flush=True)
            base = supervise(args, cl, f"chaos-base-{tag}", work / "base", [], deadline)
            harvest_logs(cl.drivers[-1].log_text(), base)
            print(f"  finished in {base.wall_s} s (exit {base.rc})", flush=True)
        print("chaos run:", flush=True)
        chaos = supervise(args, cl, f"chaos-{tag}", work / "chaos", schedule, deadline)
        harvest_logs(cl.drivers[-1].log_text(), chaos)
        threading.Thread(target=_preload, name="preload", daemon=True).start()  # while everything stops
        print(f"  finished in {chaos.wall_s} s (exit {chaos.rc})", flush=True)
        import httpx

        if cl.controller.up.wait(30):
            history = httpx.get(f"{cl.controller.child.url}/v1/runs/{chaos.run_id}/history", timeout=10).json()["versions"]
        from ddk.trainer.metrics import read_metrics

        records = read_metrics(work / "chaos" / "metrics.jsonl")
    except BaseException as e:  # noqa: BLE001 - reported as a failed check after the cleanup
        error = f"{type(e).__name__}: {e}"
        if isinstance(e, KeyboardInterrupt):
            print("interrupted: cleaning up", flush=True)
    finally:
        t_close = time.monotonic()
        left = cl.close()
        ports = cl.ports_held()
        signal.signal(signal.SIGTERM, old_term)
        print(f"[{time.monotonic() - t_all:6.1f}s] everything stopped ({time.monotonic() - t_close:.1f} s)", flush=True)

    checks: list[tuple[str, bool, str]] = []
    if error:
        checks.append(("no error", False, error))
    if chaos is not None:
        checks.append(("driver finished within the limit", chaos.rc == 0 and not chaos.timed_out,
                       f"exit {chaos.rc}, {chaos.wall_s} s" + (" (timed out)" if chaos.timed_out else "")))
        injected = sum(f["fired_step"] is not None for f in chaos.faults)
        checks.append(("every planned fault injected", injected == len(schedule), f"{injected} of {len(schedule)}"))
        p = check_metrics(records, args.steps, args.interval)
        checks.append(("metrics.jsonl: steps 1..N once each, evaluations once per interval", not p, "; ".join(p)))
        hp, worst = check_history(history, records, args.steps, args.interval) if history else (["no history"], 0)
        checks.append(("controller history: one version per interval, the paper's update", not hp,
                       "; ".join(hp) or f"{len(history)} versions, largest difference {worst:.2g}"))
        final = work / "chaos" / "final"
        sp = check_student(final) if (final / "config.json").is_file() else ["no final/ export"]
        checks.append(("final student loads (transformers)", not sp, "; ".join(sp)))
        if base is not None and base.rc == 0 and (final / "model.safetensors").is_file():
            diff = compare_students(final, work / "base" / "final")
            if want_equal:
                checks.append(("equals the fault-free run (rtol 1e-4, atol 1e-5)",
                               close_students(final, work / "base" / "final"), f"largest difference {diff:.3g}"))
            else:
                checks.append(("against the fault-free run (not required: the controller or driver was killed)",
                               True, f"largest difference {diff:.3g}"))
        elif want_equal:
            checks.append(("equals the fault-free run", not args.no_baseline, "skipped (--no-baseline)"))
    checks.append(("no process left", not left, f"{len(left)} left: {left[:10]}" if left else ""))
    checks.append(("no port held", not ports, str(ports) if ports else ""))
    if chaos is not None:
        report(args, schedule, chaos, base, checks)
    else:
        for name, ok, detail in checks:
            print(f"  [{'ok' if ok else 'FAIL'}] {name}" + (f": {detail}" if detail else ""))
        print("chaos: FAILED")
    print(f"total {time.monotonic() - t_all:.1f} s; work dir {work}" + ("" if args.keep or args.out else " (removed)"),
          flush=True)
    passed = all(ok for _, ok, _ in checks)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "passed": passed, "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in checks],
            "schedule": [asdict(f) for f in schedule], "chaos": asdict(chaos) if chaos else None,
            "baseline": asdict(base) if base else None, "total_s": round(time.monotonic() - t_all, 1)}, indent=1))
    if not (args.keep or args.out):
        shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(cl.temp_dir, ignore_errors=True)
    return 0 if passed else 1


if __name__ == "__main__":
    from ddk.runtime import set_process_defaults

    set_process_defaults()
    sys.exit(main())
