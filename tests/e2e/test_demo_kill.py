"""`ddk demo` killed half-way (slow): SIGTERM once training runs; no process of the demo may be left.

Its own module (not in test_demo.py) so that `pytest -n 2 --dist loadfile` can run it beside the
finished-demo test.
"""

from __future__ import annotations

import signal
import time
import uuid

import pytest

from test_demo import marked_pids, start_demo, wait_gone

pytestmark = pytest.mark.slow


def test_demo_killed_half_way_leaves_nothing(kit, tmp_path):
    marker = uuid.uuid4().hex
    out = tmp_path / "demo"
    proc = start_demo(out, kit, marker, steps=400)
    try:
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").exists():  # training has started: services, Ray, workers all up
            assert proc.poll() is None, proc.log_text()[-3000:]
            assert time.monotonic() < deadline, "training never started"
            time.sleep(1)
        assert len(marked_pids(marker)) >= 4  # demo, teacher, controller, train driver (+ Ray)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()  # the demo's process group (SIGKILL)
    assert proc.returncode != 0
    assert wait_gone(marker, 60) == [], "processes left running after the demo was killed"
