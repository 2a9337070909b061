"""Helpers shared by the benchmark scripts (imported as ``common``: scripts run as ``python bench/NAME.py``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ddk.launcher import free_port, kill_group, wait_healthy

REPO = Path(__file__).resolve().parent.parent


def start_server(cmd: list[str], log_path: Path, health: str = "/healthz", timeout: float = 600,
                 env: dict | None = None) -> tuple[str, subprocess.Popen]:
    """Run ``cmd --port P`` (P a free port) in its own process group, output to ``log_path``, until
    ``health`` answers 200; (base URL, process). Stopped again (``kill_group``) if it does not come up."""
    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd + ["--port", str(port)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url + health, proc, timeout, log_path=Path(log_path))
    except BaseException:
        kill_group(proc)
        raise
    return url, proc


def tree_rss(pid: int, exclude: frozenset = frozenset()) -> int:
    """RSS in bytes of a process and its descendants, leaving out the subtrees rooted at ``exclude``;
    0 once the process is gone."""
    import psutil

    def walk(p):
        if p.pid in exclude:
            return 0
        try:
            total = p.memory_info().rss
            kids = p.children()
        except psutil.NoSuchProcess:
            return 0
        return total + sum(walk(q) for q in kids)

    try:
        return walk(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return 0
