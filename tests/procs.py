"""Start real service processes (uvicorn servers via the `ddk` CLI) on 127.0.0.1 for tests."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from ddk.launcher import free_port, kill_group, wait_healthy  # noqa: F401  (re-exported for tests)

REPO = Path(__file__).resolve().parent.parent
DDK = [sys.executable, "-m", "ddk.cli"]


@contextmanager
def service(args: list[str], health_path: str = "/healthz", port: int | None = None,
            timeout: float = 180.0, log_path: Path | None = None, env: dict | None = None):
    """Run ``ddk <args> --port P`` in its own process group; yield (base_url, Popen)."""
    port = port or free_port()
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(DDK + args + ["--port", str(port)], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url + health_path, proc, timeout)
        yield url, proc
    finally:
        kill_group(proc)
        if log_path:
            log.close()
