"""Faults during a DDK run, in-process (the Trainer under LocalContext, inproc.py) against real teacher (hf)
and controller processes on 127.0.0.1 that the test kills and restarts.

Two runs of the quick kit, at the same time, with faults injected from here:

* ``replica``: two teacher replicas; one is SIGKILLed for good after step 2. The run finishes on the other
  with no failed step.
* ``outage``: one teacher and the controller. After the evaluation at step 8 is recorded, the controller is
  SIGKILLed; the evaluation at step 16 cannot be posted, so the run keeps the weights of step 8. Then the
  teacher is SIGKILLed too, the controller is restarted on the same SQLite file and port, and the teacher
  is restarted on its port 10 s after it died. The run must finish with every step done once, the late
  evaluation of step 16 recorded, and no gap or duplicate in the controller's history.

In-process there is no Ray to retry a failed step: a run that finishes proves that no step failed and none
was done twice. A Ray worker killed mid-run (Ray Train restores the last checkpoint and the run ends like an
uninterrupted one) is tested in tests/e2e/test_train_ray.py. Disk full / unwritable output at checkpoint
time: the last tests.
"""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

from inproc import Background, LogCapture, preload, steps_of
from procs import DDK, REPO, Proc, free_port


# ----------------------------------------------------------------------------------------------
# processes

def teacher(kit: Path, log: Path) -> Proc:
    return Proc(["teacher", "serve", "--model", str(kit / "teacher"), "--backend", "hf"], log, free_port())


def controller(db: Path, log: Path, port: int | None = None) -> Proc:
    return Proc(["controller", "serve", "--db", str(db)], log, port or free_port())


def requests_served(url: str) -> float:
    """The teacher's top-k requests answered 200, from its Prometheus text."""
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith('ddk_teacher_requests_total{status="200"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def run(kit: Path, out: Path, run_id: str, teachers: list[str], controller_url: str, steps: int,
        interval: int, checkpoint: int) -> Background:
    return Background(kit, out, run_id, ",".join(teachers), controller_url, f"train.steps={steps}",
                      "train.batch_size=4", f"mixture.interval_steps={interval}",
                      f"checkpoint.every_steps={checkpoint}", "eval.sequences_per_domain=4")


@contextmanager
def closing(*procs):
    try:
        yield procs
    finally:
        for p in procs:
            p.close()


# ----------------------------------------------------------------------------------------------
# the two runs

@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def log_capture():
    """The ddk loggers of both runs (they run in this process; the URLs in the messages tell them apart)."""
    import logging

    handler, logger = LogCapture(), logging.getLogger("ddk")
    old = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old)


def run_replica(kit: Path, logs: Path) -> dict:
    """Two replicas; B killed for good after step 2."""
    a, b = teacher(kit, logs / "teacher-a.log"), teacher(kit, logs / "teacher-b.log")
    c = controller(logs / "replica.sqlite", logs / "controller-replica.log")
    with closing(a, b, c):
        for p in (a, b, c):
            p.start()
        for p in (a, b, c):
            p.wait_healthy()
        train = run(kit, logs / "replica", "faults-replica", [a.url, b.url], c.url, steps=10, interval=5,
                    checkpoint=5).start()
        train.wait_for("step 2", lambda r: r["event"] == "step" and r["step"] >= 2)
        served_b = requests_served(b.url)
        served_a = requests_served(a.url)
        b.kill()
        killed_after = max(steps_of(train.lines()))
        summary = train.wait()
        served_a_end = requests_served(a.url)
        history = httpx.get(f"{c.url}/v1/runs/faults-replica/history", timeout=10).json()["versions"]
    return {"summary": summary, "train": train, "lines": train.lines(), "served_b": served_b, "served_a": served_a,
            "served_a_end": served_a_end, "killed_after": killed_after, "b": b.url, "history": history}


def run_outage(kit: Path, logs: Path) -> dict:
    """One teacher and the controller, both killed mid-run and restarted (see the module doc)."""
    t = teacher(kit, logs / "teacher.log")
    c = controller(logs / "outage.sqlite", logs / "controller.log")
    events = {}
    with closing(t, c):
        t.start(), c.start()
        t.wait_healthy(), c.wait_healthy()
        train = run(kit, logs / "outage", "faults-outage", [t.url], c.url, steps=24, interval=8,
                    checkpoint=8).start()
        train.wait_for("the evaluation of step 8 at the controller",
                       lambda r: r["event"] == "eval" and r["step"] == 8 and r["version"] is not None)
        c.kill()
        events["controller_killed_after"] = max(steps_of(train.lines()), default=0)
        # The teacher dies before the feed asks for the window after step 16 (it prefetches at most 4 batches
        # ahead, inside the window of the weights in force), so the run has to wait for it; in-process steps are
        # fast enough that a later kill could find that window fetched too.
        train.wait_for("step 15", lambda r: r["event"] == "step" and r["step"] >= 15)
        t.kill()
        killed = time.monotonic()
        events["teacher_killed_after"] = max(steps_of(train.lines()))
        # Usually the run reaches the evaluation of step 16 on batches it fetched before the kill; under load the
        # feed's fetch thread can lag the steps, and the run then waits for the teacher before that evaluation.
        # Either way the teacher is back 10 s after it died, and the controller only once the evaluation of step 16
        # was written while it was down. (K = 8 leaves room for the trainer's retries of that evaluation, at steps
        # 16, 17, 19, 23, before the final one at step 24 would replace it.)
        def evaluated_16(r):
            return r["event"] == "eval" and r["step"] == 16

        def teacher_back() -> None:  # 10 s after it died
            time.sleep(max(0.0, killed + 10 - time.monotonic()))
            t.start().wait_healthy()
            events["teacher_down_s"] = time.monotonic() - killed

        if not train.seen_before(evaluated_16, killed + 10):  # the run waits for the teacher first
            teacher_back()
            train.wait_for("the evaluation of step 16 (controller down)", evaluated_16)
        c.start().wait_healthy()  # the same SQLite file and port
        if "teacher_down_s" not in events:
            teacher_back()
        summary = train.wait()
        history = httpx.get(f"{c.url}/v1/runs/faults-outage/history", timeout=10).json()["versions"]
    return {"summary": summary, "train": train, "lines": train.lines(), "history": history, "teacher": t.url, **events}


@pytest.fixture(scope="module")
def runs(kit, logs, log_capture) -> dict:
    """Both runs at the same time: their start-ups overlap, and the replica run uses the CPU while the
    outage run waits for its teacher. An exception in a run is raised by the tests that read it."""
    results: dict = {}
    preload()

    def go(name, scenario):
        try:
            results[name] = scenario(kit, logs)
        except BaseException as e:  # noqa: BLE001 -- handed to the tests
            results[name] = e

    threads = [threading.Thread(target=go, args=item, name=item[0])
               for item in (("outage", run_outage), ("replica", run_replica))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return results


def _result(runs: dict, name: str) -> dict:
    r = runs[name]
    if isinstance(r, BaseException):
        raise r
    return r


@pytest.fixture
def replica(runs, log_capture) -> dict:
    return {**_result(runs, "replica"), "log": log_capture.text()}


@pytest.fixture
def outage(runs, log_capture) -> dict:
    return {**_result(runs, "outage"), "log": log_capture.text()}


# ----------------------------------------------------------------------------------------------
# the checks

@pytest.mark.slow
def test_replica_killed_for_good_the_run_finishes_on_the_other(replica):
    assert replica["summary"]["step"] == 10
    lines = replica["lines"]
    assert steps_of(lines) == list(range(1, 11))  # every step once, none failed (no Ray retries allowed)
    assert [r["step"] for r in lines if r["event"] == "eval"] == [0, 5, 10]
    assert [v["version"] for v in replica["history"]] == [0, 1, 2, 3]
    assert replica["killed_after"] < 10  # the replica died mid-run
    assert replica["served_b"] > 0  # both replicas served before
    assert replica["served_a_end"] > replica["served_a"]  # the survivor took over
    assert f"teacher topk on {replica['b']} failed" in replica["log"]  # the failover is logged


@pytest.mark.slow
def test_teacher_killed_and_restarted_10s_later_the_run_finishes(outage):
    assert outage["summary"]["step"] == 24
    lines = outage["lines"]
    assert steps_of(lines) == list(range(1, 25))
    assert [r["step"] for r in lines if r["event"] == "eval"] == [0, 8, 16, 24]
    assert outage["teacher_down_s"] >= 10
    assert outage["teacher_killed_after"] < 24  # it died mid-run
    # the run waited for the teacher rather than skipping: some step waited most of the outage
    assert max(r["teacher_wait_s"] for r in lines if r["event"] == "step") > 5
    log = outage["log"]
    assert f"teacher topk on {outage['teacher']} failed" in log  # the outage is logged
    assert "resumed from" not in log


@pytest.mark.slow
def test_controller_killed_and_restarted_on_the_same_db(outage):
    assert outage["summary"]["step"] == 24
    lines, history = outage["lines"], outage["history"]
    # no gap and no duplicate: one version per evaluation, in order, the late one included
    assert [(v["version"], v["step"]) for v in history] == [(0, None), (1, 0), (2, 8), (3, 16), (4, 24)]
    by_eval = {r["step"]: r for r in lines if r["event"] == "eval"}
    assert by_eval[16]["version"] is None  # posted while the controller was down
    assert history[3]["student_loss"] == pytest.approx(by_eval[16]["student_loss"])  # recorded later, unchanged
    late = [r for r in lines if r["event"] == "weights"]
    assert len(late) == 1 and late[0]["eval_step"] == 16 and late[0]["version"] == 3
    # meanwhile the trainer drew its batches with the last weights it had (version 2, step 8's)
    v2 = by_eval[8]["weights"]
    for r in lines:
        if r["event"] == "step" and 16 < r["step"] <= late[0]["step"]:
            assert r["version"] == 2 and r["weights"] == pytest.approx(v2, abs=1e-12)
        if r["event"] == "step" and r["step"] > late[0]["step"]:  # drawn after the late answer
            assert r["version"] == 3
    assert "controller unreachable" in outage["log"]


# ----------------------------------------------------------------------------------------------
# disk full / unwritable output at checkpoint time (no Ray: the checkpoint code the worker calls)

class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x)


class _Feed:  # what the worker's checkpoint asks of its teacher feed (its per-rank entry): the sampler state
    def __init__(self, step: int):
        self.step = step

    def state_dict(self) -> dict:
        return {"cursor": self.step}


@pytest.mark.parametrize("where", ["writing the checkpoint", "copying it to the output directory"])
def test_disk_full_at_checkpoint_time_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where):
    """The worker's own checkpoint path (``Distributed.save_and_report``: write to a temporary folder, then hand it to
    the run's storage), with the disk filling up at the model file of the second checkpoint."""
    import shutil

    from ddk.trainer import checkpoint as ckpt
    from ddk.trainer.loop import LocalContext, TrainState
    from ddk.trainer.mixture_sync import MixtureSync
    from ddk.trainer.parallel import Distributed

    def checkpoint(step):
        d = Distributed("ddp", ctx)
        d.attach(model, opt)
        d.register("trainer", TrainState(step=step))
        d.register("mixture", MixtureSync({"a": 0.5, "b": 0.5}, step))
        d.register("sampler", _Feed(step), per_rank=True)
        d.save_and_report(step, {"step": step, "loss": 1.0, "version": step})

    torch.manual_seed(0)
    model = _Model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    ctx = LocalContext(tmp_path / "out", keep=2)
    checkpoint(4)
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    model(torch.randn(2, 4)).sum().backward()
    opt.step()  # the model moves on; its next checkpoint meets a full disk
    module, name = (ckpt, "save_file") if where == "writing the checkpoint" else (shutil, "copyfile")
    real = getattr(module, name)

    def full_disk(*args, **kwargs):
        dst = str(args[1])
        if Path(dst).name == ckpt.MODEL_TENSORS:
            Path(dst).write_bytes(b"\0" * 7)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), dst)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, full_disk)
    with pytest.raises(OSError) as e:
        checkpoint(8)
    monkeypatch.undo()
    assert "No space left on device" in str(e.value)  # a clear error (shutil.Error when copying a folder)

    # what a resumed run would load is the step-4 checkpoint, whole
    with ctx.restored() as d:
        assert d is not None
        shared, own = ckpt.load_checkpoint(d, rank=0)
        assert shared["step"] == 4 and own["entries"]["sampler"] == {"cursor": 4}
        fresh = _Model()
        ckpt.load_model(d, fresh)
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, saved[k])


@pytest.mark.parametrize("blocker", ["a file", "a missing parent under a file"])
def test_unwritable_output_directory_is_a_one_line_error(kit, tmp_path, blocker):
    """An output_dir that cannot be made: exit 1 and one line naming it, before any Ray start."""
    block = tmp_path / "not-a-dir"
    block.write_text("x")
    out = block if blocker == "a file" else block / "run"
    proc = subprocess.run(DDK + ["train", str(kit / "train.yaml"), "--set", f"output_dir={out}",
                                 "--set", "teacher.urls=[http://127.0.0.1:1]"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode in (1, 2), proc.stderr
    err = proc.stderr.strip().splitlines()
    assert err and err[-1].startswith("ddk: ") and str(block) in err[-1], proc.stderr
    assert "Traceback" not in proc.stderr
