"""Start the teacher and the controller as child processes on loopback, and stop them without leftovers.

Used by ``ddk demo`` and ``ddk compare``: each service runs ``python -m ddk.cli ...`` in its own
process group (so stopping it also stops anything it spawned, such as vLLM's engine process), on a free
port of 127.0.0.1, with its log in a file. :class:`Services` is a context manager: leaving it, normally,
on an exception or on Ctrl-C / SIGTERM, terminates every group it started and waits for the ports to
be free again.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

log = logging.getLogger("ddk.launcher")


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


def kill_group(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM the child's process group, SIGKILL it if it lingers."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
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


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 300.0,
                 log_path: Path | None = None) -> None:
    """Poll ``url`` until it answers 200; fail early (with the log's tail) if ``proc`` exits first."""
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


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM us when the parent dies (even by SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _Terminated(KeyboardInterrupt):
    """SIGTERM turned into an exception, so the same cleanup runs as for Ctrl-C."""


def _raise_terminated(signum, frame):
    raise _Terminated()


class Services:
    """Children started in their own process groups; all stopped on exit, whatever the exit."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.procs: list[tuple[str, subprocess.Popen, int | None]] = []
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

    def start(self, name: str, argv: list[str], port: int | None = None, env: dict | None = None) -> subprocess.Popen:
        """Run ``python -m ddk.cli <argv>`` (plus ``--port`` when given) in a new process group."""
        cmd = [sys.executable, "-m", "ddk.cli", *argv] + (["--port", str(port)] if port else [])
        logfile = open(self.log_dir / f"{name}.log", "ab")
        proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, **(env or {})},
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        logfile.close()
        self.procs.append((name, proc, port))
        log.info("started %s (pid %d%s), log %s", name, proc.pid, f", port {port}" if port else "",
                 self.log_dir / f"{name}.log")
        return proc

    def wait_healthy(self, name: str, url: str, timeout: float = 300.0) -> None:
        proc = next(p for n, p, _ in self.procs if n == name)
        wait_healthy(url, proc, timeout, log_path=self.log_dir / f"{name}.log")

    def run(self, name: str, argv: list[str], env: dict | None = None) -> int:
        """Run a child to completion in its own group (killed with it on interrupt); its exit code."""
        proc = self.start(name, argv, env=env)
        try:
            return proc.wait()
        finally:
            kill_group(proc)

    def stop_all(self) -> None:
        for name, proc, port in reversed(self.procs):
            kill_group(proc)
            if port:
                deadline = time.monotonic() + 10
                while port_is_bound(port) and time.monotonic() < deadline:
                    time.sleep(0.2)
            log.info("stopped %s", name)
        self.procs.clear()
