"""`ddk runs` and `ddk weights RUN_ID [--watch]` against a real `ddk controller serve` (each command a process).

Also the formatting of their tables (ddk.controller.show, pure).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time

import pytest
from procs import DDK, REPO, free_port, service

from ddk.controller.client import ControllerClient
from ddk.controller.show import format_runs, format_version_row, format_weights, version_header

DOMAINS = ["code", "legal", "prose"]
TEACHER = {"code": 1.0, "legal": 0.5, "prose": 2.0}


def ddk(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(DDK + list(args), cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def controller(tmp_path_factory):
    db = tmp_path_factory.mktemp("runs-cli") / "controller.sqlite"
    with service(["controller", "serve", "--db", str(db)], timeout=60) as (url, _):
        with ControllerClient(url, max_retries=2, backoff=0.05) as c:
            c.create_run("cli-a", DOMAINS, policy="ddk", interval_steps=10)
            c.create_run("cli-b", ["x", "y"], policy="fixed", interval_steps=5)
            c.post_evaluation("cli-a", 0, {"code": 2.0, "legal": 1.0, "prose": 2.5}, TEACHER)
            yield url, c


# ----------------------------------------------------------------------------- against the server

@pytest.mark.slow
def test_runs_lists_every_run_as_a_table_and_as_json(controller):
    url, _ = controller
    r = ddk("runs", "--controller", url)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["run_id", "policy", "K"] and set(lines[1]) <= {"-", " "}
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert set(rows) == {"cli-a", "cli-b"}
    assert rows["cli-a"][1:4] == ["ddk", "10", "code,legal,prose"] and rows["cli-a"][4] == "1"
    assert rows["cli-b"][1:5] == ["fixed", "5", "x,y", "0"]
    js = ddk("runs", "--controller", url, "--json")
    assert js.returncode == 0 and {run["run_id"] for run in json.loads(js.stdout)["runs"]} == {"cli-a", "cli-b"}


@pytest.mark.slow
def test_weights_prints_a_runs_current_weights(controller):
    url, client = controller
    current = client.get_weights("cli-a")
    r = ddk("weights", "cli-a", "--controller", url)
    assert r.returncode == 0, r.stderr
    head, *table = r.stdout.splitlines()
    assert head.startswith(f"run cli-a: version {current['version']} at step 0")
    weights = {line.split()[0]: float(line.split()[1]) for line in table[2:]}
    assert weights == pytest.approx(current["weights"], abs=1e-4)
    js = ddk("weights", "cli-a", "--controller", url, "--json")
    assert json.loads(js.stdout) == current


@pytest.mark.slow
def test_unknown_run_and_unreachable_controller_are_exit_2_with_one_line(controller):
    url, _ = controller
    for args in (["weights", "no-such-run"], ["weights", "no-such-run", "--watch"]):
        r = ddk(*args, "--controller", url)
        assert r.returncode == 2 and r.stdout == ""
        assert r.stderr.count("\n") == 1 and "RUN_ID" in r.stderr and "no-such-run" in r.stderr, r.stderr
    nowhere = f"http://127.0.0.1:{free_port()}"
    for args in (["runs"], ["weights", "cli-a"], ["weights", "cli-a", "--watch"]):
        r = ddk(*args, "--controller", nowhere)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and "--controller" in r.stderr and nowhere in r.stderr, r.stderr


@pytest.mark.slow
def test_watch_prints_each_new_version_until_interrupted(controller):
    url, client = controller
    client.create_run("cli-watch", DOMAINS, policy="ddk", interval_steps=10)
    # SIGINT at its default in the child, as in a user's shell: an ignored SIGINT is inherited across exec, and an
    # earlier test's library in this worker may have left it ignored (then Python installs no Ctrl-C handler)
    proc = subprocess.Popen(DDK + ["weights", "cli-watch", "--watch", "--controller", url], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()

    def next_line(timeout: float = 30.0) -> str:
        try:
            return lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line from --watch in {timeout}s (exit {proc.poll()})") from None

    try:
        header = next_line()
        assert header.split() == ["version", "step", "updated_at", *DOMAINS]
        first = next_line().split()  # the current version: the initial weights
        assert first[:2] == ["0", "-"] and [float(w) for w in first[3:]] == pytest.approx([1 / 3] * 3, abs=1e-4)
        posted = client.post_evaluation("cli-watch", 0, {"code": 2.0, "legal": 1.0, "prose": 2.5}, TEACHER)
        row = next_line().split()
        assert row[:3] == ["1", "0", posted["updated_at"]]
        assert [float(w) for w in row[3:]] == pytest.approx([posted["weights"][d] for d in DOMAINS], abs=1e-4)
        posted = client.post_evaluation("cli-watch", 10, {"code": 1.5, "legal": 0.9, "prose": 2.4})
        assert next_line().split()[:2] == ["2", "10"]
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert proc.returncode == 0, proc.stderr.read()
    time.sleep(0.1)
    assert lines.empty()


# ----------------------------------------------------------------------------- formatting (pure)

def test_tables_format_runs_weights_and_versions():
    runs = [{"run_id": "r1", "policy": "ddk", "interval_steps": 100, "domains": ["a", "b"],
             "created_at": "2026-01-01T00:00:00.000Z",
             "weights": {"version": 3, "step": 200, "weights": {"a": 0.4, "b": 0.6},
                         "updated_at": "2026-01-01T01:00:00.000Z"},
             "status": {"state": "training", "step": 250, "total_steps": 1000,
                        "updated_at": "2026-01-01T01:05:00.000Z"}},
            {"run_id": "r2", "policy": "fixed", "interval_steps": 5, "domains": ["x"],
             "created_at": "2026-01-02T00:00:00.000Z",
             "weights": {"version": 0, "step": None, "weights": {"x": 1.0}, "updated_at": "2026-01-02T00:00:00.000Z"}}]
    lines = format_runs(runs).splitlines()
    assert lines[2].split() == ["r1", "ddk", "100", "a,b", "3", "250/1000", "training", "2026-01-01T01:05:00.000Z"]
    assert lines[3].split() == ["r2", "fixed", "5", "x", "0", "-", "-", "2026-01-02T00:00:00.000Z"]
    assert format_runs([]) == "no runs"
    w = format_weights("r1", runs[0]["weights"]).splitlines()
    assert w[0] == "run r1: version 3 at step 200, updated 2026-01-01T01:00:00.000Z"
    assert w[1].split() == ["domain", "weight"] and w[3:] == ["a       0.4000", "b       0.6000"]
    assert "(initial weights)" in format_weights("r2", runs[1]["weights"])
    header = version_header(["a", "b"])
    row = format_version_row(runs[0]["weights"], ["a", "b"])
    assert header.split() == ["version", "step", "updated_at", "a", "b"]
    assert row.split() == ["3", "200", "2026-01-01T01:00:00.000Z", "0.4000", "0.6000"]
    assert len(row) == len(header)  # the columns line up
