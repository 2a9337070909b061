"""Helpers shared by the benchmark scripts (imported as ``common``: scripts run as ``python bench/NAME.py``)."""

from __future__ import annotations

from pathlib import Path

from ddk.launcher import Child, free_port, start

REPO = Path(__file__).resolve().parent.parent


def start_server(cmd: list[str], log_path: Path, health: str = "/healthz", timeout: float = 600,
                 env: dict | None = None) -> tuple[str, Child]:
    """Run the command ``cmd`` (a whole one: ``python -m ddk.cli ...``, vLLM's server, ``taskset ...``) with
    ``--port P`` (P a free port) as a ddk.launcher Child, output to ``log_path``, until ``health`` answers 200;
    (base URL, the Child: Popen-like, ``stop()`` or ``kill_group`` ends it). Stopped again if it does not come up."""
    proc = start(cmd, log_path, free_port(), env, program=(), cwd=REPO, append=False)
    try:
        proc.wait_healthy(health, timeout)
    except BaseException:
        proc.stop()
        raise
    return proc.url, proc


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
