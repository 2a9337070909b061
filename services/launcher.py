"""Start ``ddk`` processes and stop them without leftovers: the one way every ddk process is started.

:func:`start` runs ``python -m ddk.cli <argv>`` (plus ``--port P`` when given) as a :class:`Child`: in its own
process group (so stopping it also stops anything it spawned, such as vLLM's engine process), with its output in a
log file (every line of it: ``DDK_LOG_DETAIL=1``, see ddk.logsetup), and on Linux with PR_SET_PDEATHSIG (SIGTERM
when the thread that started it ends, even by SIGKILL: start children from the main thread). A :class:`Child` is
Popen-like (``pid``, ``poll``, ``wait``, ``returncode``) and adds ``wait_healthy``, ``kill`` (SIGKILL of the group,
as a crash), ``stop`` (SIGTERM, then SIGKILL) and ``restart`` (on the same port). :class:`Services` (``ddk demo``,
``ddk compare``) is a context manager over several children: leaving it, normally, on an exception or on Ctrl-C /
SIGTERM, stops every child it started and waits for their ports to be free again. tests/procs.py and
bench/common.py are thin wrappers over this module.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from ddk.logsetup import DETAIL_ENV

log = logging.getLogger("ddk.launcher")

DDK = (sys.executable, "-m", "ddk.cli")  # the program of a child unless told otherwise


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_bound(port: int) -> bool:
    """True while a socket holds the port. SO_REUSEADDR so that connections lingering in TIME_WAIT
    (normal after a server closes them) do not count: only a live listener or bound socket does."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def wait_port_free(port: int, timeout: float = 10.0) -> bool:
    """Wait until nothing holds ``port`` (at most ``timeout`` s); whether it is free."""
    deadline = time.monotonic() + timeout
    while port_is_bound(port):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def kill_group(proc, timeout: float = 20.0, first: int = signal.SIGTERM) -> None:
    """Signal the process group of ``proc`` (a Popen or a :class:`Child`, the group's leader) with ``first``
    (SIGTERM; SIGCONT after it, so a stopped group gets it too), SIGKILL the group if the leader lingers
    ``timeout`` s, and reap the leader."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, first)
            os.killpg(proc.pid, signal.SIGCONT)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
    try:  # the group may outlive its leader (engine processes): make sure it is gone
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def wait_healthy(url: str, proc=None, timeout: float = 300.0, log_path: Path | None = None) -> None:
    """Poll ``url`` until it answers 200; fail early (with the log's tail) if ``proc`` (a Popen or a
    :class:`Child`) exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path and log_path.exists() else ""
            cmd = " ".join(map(str, proc.args)) if isinstance(proc.args, (list, tuple)) else str(proc.args)
            raise RuntimeError(f"`{cmd[:200]}` exited with code {proc.returncode} before {url} was healthy; "
                               f"log tail:\n{tail}")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} not healthy after {timeout:.0f}s")


@functools.lru_cache(maxsize=1)
def _die_with_parent():
    """A preexec_fn asking Linux to SIGTERM the child when its parent dies (PR_SET_PDEATHSIG), or None.

    prctl is looked up here, in the parent, so that the child only calls it between fork and exec."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return preexec


class Child:
    """``program + argv`` (+ ``--port P``) in its own process group, output to ``log_path`` (None: discarded).

    Not running until :meth:`start`; restartable (on the same port, the log appended). Popen-like, so
    :func:`kill_group` and :func:`wait_healthy` take it as they take a Popen. ``popen`` is the current process.
    """

    def __init__(self, argv: list[str], log_path: Path | None = None, port: int | None = None,
                 env: dict | None = None, *, name: str | None = None, program=DDK, cwd: Path | None = None,
                 append: bool = True):
        self.argv, self.port, self.env, self.cwd, self.append = list(argv), port, env, cwd, append
        self.log_path = Path(log_path) if log_path is not None else None
        self.program = list(program)
        self.name = name or Path((self.argv or self.program or ["?"])[0]).name
        self.popen: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{port}" if port else None
        self._stopped = False

    # -- Popen-like -----------------------------------------------------------------------------------------
    @property
    def args(self) -> list[str]:
        return self.program + self.argv + (["--port", str(self.port)] if self.port else [])

    @property
    def pid(self) -> int:
        return self._running().pid

    @property
    def returncode(self) -> int | None:
        return self._running().returncode

    def poll(self) -> int | None:
        return self._running().poll()

    def wait(self, timeout: float | None = None) -> int:
        return self._running().wait(timeout)

    def send_signal(self, sig: int) -> None:
        """``sig`` to the leader only, as Popen does (see :meth:`signal_group`)."""
        self._running().send_signal(sig)

    def _running(self) -> subprocess.Popen:
        if self.popen is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.popen

    # -- life cycle -----------------------------------------------------------------------------------------
    def start(self) -> "Child":
        """Start it (again, once it has exited: on the same port, the log appended)."""
        if self.popen is not None and self.popen.poll() is None:
            raise RuntimeError(f"{self.name} is already running (pid {self.popen.pid})")
        restart = self.popen is not None
        env = dict(os.environ)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_path, "ab" if self.append or restart else "wb")
            env[DETAIL_ENV] = "1"  # its output is a log file: every line (ddk.logsetup), not the quiet console's
        else:
            out = subprocess.DEVNULL
        env.update(self.env or {})
        try:
            self.popen = subprocess.Popen(self.args, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True,
                                          env=env, preexec_fn=_die_with_parent())
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        self._stopped = False
        log.info("%s %s (pid %d%s), log %s", "restarted" if restart else "started", self.name, self.popen.pid,
                 f", port {self.port}" if self.port else "", self.log_path)
        return self

    def wait_healthy(self, path: str = "/healthz", timeout: float = 300.0) -> "Child":
        """Until ``url + path`` answers 200; fails early, with the log's tail, if it exits first."""
        if self.url is None:
            raise RuntimeError(f"{self.name} has no port to ask")
        wait_healthy(self.url + path, self, timeout, log_path=self.log_path)
        return self

    def signal_group(self, sig: int) -> None:
        """``sig`` to the whole process group (nothing if it is gone)."""
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the group, as a crash would (no clean shutdown), and reap the leader."""
        if self.popen is None:
            return
        self.signal_group(signal.SIGKILL)
        self.popen.wait(10)

    def stop(self, timeout: float = 20.0, first: int = signal.SIGTERM) -> None:
        """:func:`kill_group` (``first``, then SIGKILL after ``timeout`` s), then wait for the port to be free.
        Nothing if it was never started or is stopped already."""
        if self.popen is None or self._stopped:
            return
        kill_group(self.popen, timeout, first)
        if self.port:
            wait_port_free(self.port)
        self._stopped = True
        log.info("stopped %s", self.name)

    close = stop  # so that contextlib.closing and `with` stop it

    def restart(self) -> "Child":
        """Stop it if it runs, and start it again on the same port."""
        self.stop()
        return self.start()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start(argv: list[str], log_path: Path | None = None, port: int | None = None, env: dict | None = None,
          **kw) -> Child:
    """Start ``python -m ddk.cli <argv>`` (``--port port`` added when given) as a :class:`Child` (``kw``: its
    ``name``, ``program``, ``cwd``, ``append``)."""
    return Child(argv, log_path, port, env, **kw).start()


class _Terminated(KeyboardInterrupt):
    """SIGTERM turned into an exception, so the same cleanup runs as for Ctrl-C."""


def _raise_terminated(signum, frame):
    raise _Terminated()


class Services:
    """Children started in their own process groups; all stopped on exit, whatever the exit."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.children: list[Child] = []
        self._old_term = None

    def __enter__(self) -> "Services":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._old_term = signal.signal(signal.SIGTERM, _raise_terminated)
        except ValueError:  # not the main thread
            self._old_term = None
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()
        if self._old_term is not None:
            signal.signal(signal.SIGTERM, self._old_term)

    def start(self, name: str, argv: list[str], port: int | None = None, env: dict | None = None) -> Child:
        """:func:`start` with the log in ``log_dir/<name>.log``; stopped with the others on exit."""
        child = start(argv, self.log_dir / f"{name}.log", port, env, name=name)
        self.children.append(child)
        return child

    def run(self, name: str, argv: list[str], env: dict | None = None) -> int:
        """Run a child to completion in its own group (killed with it on interrupt); its exit code."""
        child = self.start(name, argv, env=env)
        try:
            return child.wait()
        finally:
            child.stop()

    def stop_all(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.children.clear()
