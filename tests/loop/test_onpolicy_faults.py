"""On-policy runs under faults (issue 28): a teacher replica SIGKILLed while the run grades rollouts, and a resume.

An in-process on-policy run (the Trainer under LocalContext, inproc.py; ``kd.on_policy: 1``, 4 new tokens, 6
steps, the quick kit with a small conversation domain: chaos/chat.py) against two teacher processes of the quick
kit's teacher. The kill is placed inside grading, with the grading request in flight at the replica it kills:
the test wraps ``ddk.trainer.onpolicy.grade`` (every grading call goes through it); at a grading call from the
second on, replica B is frozen (SIGSTOP: its kernel still accepts the connection and the request, nothing
answers), the real grade starts in a thread, and if it has not come back while B is frozen (the request is B's:
A answers a request of a few short rows in milliseconds) B is SIGKILLed, which cuts the request; the client fails
over to A. If A answered, B is thawed and the next grading call (round-robin: B's turn) tries again. The run also
stops after step 3 (an injected fault; checkpoints every 2 steps) and is resumed, so step 3 is done twice.

Checked: the run finishes on A; the rollout ids in metrics.jsonl are exactly the sequence derived here from the
rollout seed, the engine's call counter and the rows (each id once, none missing, the resumed step's ids those
of its first attempt).
"""

from __future__ import annotations

import signal
import threading

import pytest

from chaos.chat import write_chat_setup
from inproc import lines, train
from procs import Proc, free_port

pytestmark = pytest.mark.slow

IN_FLIGHT_S = 2.0  # B frozen this long with the grading request unanswered: the request is B's
ROLLOUT_SEED = 5   # not the run's seed (0): the ids must carry the rollout seed


@pytest.fixture(scope="module")
def teachers(kit, tmp_path_factory):
    logs = tmp_path_factory.mktemp("onpolicy-faults")
    procs = [Proc(["teacher", "serve", "--model", str(kit / "teacher"), "--backend", "hf"], logs / f"teacher-{n}.log",
                  free_port()) for n in ("a", "b")]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.wait_healthy()
        yield procs
    finally:
        for p in procs:
            p.stop()


class KillWhileGrading:
    """Wraps ``grade``: SIGKILLs ``victim`` with a grading request in flight at it (the module docstring)."""

    def __init__(self, real, victim: Proc):
        self.real, self.victim = real, victim
        self.calls = 0
        self.killed_at_call: int | None = None
        self.tries = 0

    def __call__(self, teacher, rollouts, top_k):
        self.calls += 1
        if self.killed_at_call is not None or self.calls < 2:
            return self.real(teacher, rollouts, top_k)
        self.tries += 1
        self.victim.signal_group(signal.SIGSTOP)
        box: dict = {}

        def work():
            try:
                box["out"] = self.real(teacher, rollouts, top_k)
            except BaseException as e:  # noqa: BLE001 - re-raised in the trainer's thread
                box["error"] = e

        th = threading.Thread(target=work, daemon=True)
        th.start()
        th.join(IN_FLIGHT_S)
        if th.is_alive():
            self.victim.kill()  # the request at B is cut: the client fails over to A
            self.killed_at_call = self.calls
            th.join(120)
        else:
            self.victim.signal_group(signal.SIGCONT)  # A answered: B's turn comes at the next call
        if "error" in box:
            raise box["error"]
        return box["out"]


def expected_ids(step_records: list[dict], seed: int) -> list[list[str]]:
    """Per step, by hand: every conversation row of the step is a rollout (``kd.on_policy: 1``), named
    seed-rank-call-row; the engine's call counter counts the steps that had rollouts before this one."""
    out, call = [], 0
    for r in step_records:
        n = r["rows"].get("qa", 0)
        out.append([f"{seed}-0-{call}-{i}" for i in range(n)])
        call += 1 if n else 0
    return out


def test_teacher_killed_while_grading_and_a_resume_lose_no_rollout(kit, teachers, tmp_path, monkeypatch, ddk_log):
    from ddk.trainer import onpolicy
    from ddk.trainer.loop import InjectedFault

    a, b = teachers
    kill = KillWhileGrading(onpolicy.grade, b)
    monkeypatch.setattr(onpolicy, "grade", kill)
    chat = write_chat_setup(kit, tmp_path / "chat")
    sets = [f"{k}={v}" for k, v in chat.items()] + [
        "kd.on_policy=1", "rollout.max_new_tokens=4", f"rollout.seed={ROLLOUT_SEED}", "train.steps=6",
        "train.batch_size=4", "mixture.policy=fixed", "mixture.interval_steps=6", "checkpoint.every_steps=2",
        "eval.sequences_per_domain=2"]
    out = tmp_path / "run"
    with pytest.raises(InjectedFault):
        train(kit, out, "onpolicy-faults", f"{a.url},{b.url}", None, *sets, fault_at_steps=[3])
    first = {r["step"]: r for r in lines(out) if r["event"] == "step"}
    assert sorted(first) == [1, 2, 3]
    train(kit, out, "onpolicy-faults", f"{a.url},{b.url}", None, *sets)  # resumes from step 2, redoes step 3

    assert kill.killed_at_call is not None, f"B was never caught with a grading request ({kill.tries} tries)"
    assert b.poll() is not None and a.poll() is None  # the run finished on A alone
    assert f"teacher topk on {b.url} failed" in ddk_log.text()
    records = lines(out)
    steps = [r for r in records if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert sum(r["event"] == "end" for r in records) == 1
    want = expected_ids(steps, ROLLOUT_SEED)
    got = [r["onpolicy"]["rollout_ids"] for r in steps]
    assert got == want
    flat = [i for ids in got for i in ids]
    assert len(flat) == len(set(flat)) >= 6  # each once, and the run had rollouts to lose
    assert [r["onpolicy"]["rows"] for r in steps] == [len(ids) for ids in want]
    assert steps[2]["onpolicy"]["rollout_ids"] == first[3]["onpolicy"]["rollout_ids"]  # the redone step's
