"""The chaos run's processes: a Ray head of its own (``ray start --head --block``, 2 CPUs, its own temp dir and
ports, so other Ray clusters on the machine are neither seen nor touched), two teacher replicas (hf engine, the
quick kit's teacher) and the controller (SQLite), each a :class:`ddk.launcher.Child` on loopback; the drivers
the supervisor starts are added to :attr:`Cluster.drivers`. Every process the harness started carries a marker
in its environment (or this cluster's temp dir on its command line), so :meth:`Cluster.close` ends them all and
reports any left.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from ddk.launcher import Child, free_port, port_is_bound

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
MARKER_ENV = "DDK_CHAOS_MARKER"


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


def unread_requests(port: int) -> int:
    """Established TCP connections to local ``port`` whose receive queue holds bytes the server has not read
    (``/proc/net/tcp`` and ``tcp6``: state 01, rx_queue > 0): requests waiting at a stopped server."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                rows = fh.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if len(f) > 4 and f[3] == "01" and int(f[1].rsplit(":", 1)[1], 16) == port and \
                    int(f[4].split(":")[1], 16) > 0:
                n += 1
    return n


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
