"""Real service processes (uvicorn servers via the `ddk` CLI) on 127.0.0.1 for tests: a thin pytest-side
wrapper over ddk.launcher, whose :class:`~ddk.launcher.Child` every test process is (run from the repo root)."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

from ddk.launcher import Child, free_port, kill_group, wait_healthy  # noqa: F401  (re-exported for tests)

REPO = Path(__file__).resolve().parent.parent
DDK = [sys.executable, "-m", "ddk.cli"]  # for `subprocess.run(DDK + [...])` of one-shot commands


class Proc(Child):
    """``ddk <args>`` (``--port port`` added when given) from the repo root, logging to ``log`` (appended across
    restarts); not running until :meth:`start`. ``start`` again after ``kill`` restarts it on the same port."""

    def __init__(self, args: list[str], log: Path | None = None, port: int | None = None, env: dict | None = None,
                 **kw):
        super().__init__(args, log, port, env, cwd=REPO, **kw)


def start(args: list[str], log_path: Path | None = None, port: int | None = None, env: dict | None = None,
          **kw) -> Proc:
    """:class:`Proc` started (on ``port`` when given: no ``--port`` otherwise)."""
    return Proc(args, log_path, port, env, **kw).start()


@contextmanager
def service(args: list[str], health_path: str = "/healthz", port: int | None = None,
            timeout: float = 180.0, log_path: Path | None = None, env: dict | None = None):
    """Run ``ddk <args> --port P`` in its own process group until healthy; yield (base_url, the Child)."""
    proc = start(args, log_path, port or free_port(), env, append=False)
    try:
        proc.wait_healthy(health_path, timeout)
        yield proc.url, proc
    finally:
        proc.stop()
