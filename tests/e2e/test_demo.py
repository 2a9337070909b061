"""`ddk demo` end to end (slow): real teacher, controller, Ray workers; killed half-way, then run again on the
same output folder, which finishes; and nothing left behind either time.

Every process the demo starts inherits a marker in its environment; after the demo (finished or
killed half-way) no live process may carry it, so no service, engine or Ray process was orphaned.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import uuid
from pathlib import Path

import pytest

import procs
from ddk.launcher import port_is_bound as port_bound  # a listener holds it; TIME_WAIT does not
from procs import Proc

pytestmark = pytest.mark.slow


def marked_pids(marker: str) -> list[int]:
    needle = f"DDK_TEST_MARKER={marker}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if needle in fh.read():
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def wait_gone(marker: str, timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = marked_pids(marker)
        if not left:
            return []
        time.sleep(0.5)
    return marked_pids(marker)


def ports_in_log(text: str) -> list[int]:
    return [int(p) for p in re.findall(r"port (\d+)\)", text)]


def start_demo(out: Path, kit: Path, marker: str, steps: int) -> Proc:
    """`ddk demo` with the marker in its environment; its output (stdout and stderr) in ``out.parent/demo.log``."""
    return procs.start(["demo", "--quick", "--kit", str(kit), "--out", str(out), "--steps", str(steps)],
                       out.parent / "demo.log", env={"DDK_TEST_MARKER": marker}, append=False)


def test_demo_killed_half_way_leaves_nothing_and_a_rerun_finishes(kit, tmp_path):
    """SIGTERM once training runs: no process of the demo may be left. Then the same command again, on the same
    ``--out``: it finishes, writes its report, plots and final student, steps 1..8 once each in metrics.jsonl,
    and leaves nothing behind either (one demo start-up less than a killed demo and a separate finished one)."""
    marker = uuid.uuid4().hex
    out = tmp_path / "demo"
    proc = start_demo(out, kit, marker, steps=8)
    try:
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").exists():  # training has started: services, Ray, workers all up
            assert proc.poll() is None, proc.log_text()[-3000:]
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.05)
        assert len(marked_pids(marker)) >= 4  # demo, teacher, controller, train driver (+ Ray)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()  # the demo's process group (SIGKILL)
    assert proc.returncode != 0
    assert wait_gone(marker, 60) == [], "processes left running after the demo was killed"

    marker = uuid.uuid4().hex
    proc = start_demo(out, kit, marker, steps=8)
    try:
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:  # timed out: stop it (a finished demo's leftovers are what the test looks for)
            proc.stop()
    text = proc.log_text()
    assert proc.returncode == 0, text[-4000:]
    for name in ("report.md", "weights.png", "ratios.png", "metrics.jsonl", "final/config.json",
                 "final/model.safetensors"):
        assert (out / name).exists(), name
    report = (out / "report.md").read_text()
    for domain in (kit / "data").iterdir():
        assert f"| {domain.name} |" in report
    assert "ratio before" in report and "Domain weights per version" in report
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("event") == "step"] == list(range(1, 9))
    assert wait_gone(marker) == [], "processes left running after the demo"
    ports = ports_in_log(text)
    assert len(ports) >= 2 and not any(port_bound(p) for p in ports)
