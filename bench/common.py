"""Helpers shared by the benchmark scripts (imported as ``common``: scripts run as ``python bench/NAME.py``)."""

from __future__ import annotations


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
