"""The chaos harness's on-policy schedule (tests/chaos/, ``--on-policy``): its pure parts.

- the schedule: without ``on_policy`` the same faults as before (the seed-2 short schedule that
  tests/e2e/test_chaos.py's docstring spells out); with it, teachers die mid-grading and workers mid-rollout, at
  steps where the next step starts right after the record;
- the rollout-id check on hand-written metrics records: a clean run, a resumed step recorded twice, a lost call,
  a missing row, another seed;
- the supervisor's reading of how long generating takes, and how it sees a request held at a frozen replica
  (a real socket that accepts and never reads).
"""

from __future__ import annotations

from chaos.checks import check_rollout_ids, parse_rollout_id
from chaos.cluster import unread_requests
from chaos.schedule import KINDS, make_schedule, phase_steps
from chaos.supervisor import generation_s


def _plan(faults):
    return [(f.kind, f.phase, f.step) for f in faults]


def test_off_policy_schedule_is_unchanged():
    # tests/e2e/test_chaos.py: "the controller mid-checkpoint at step 2, a teacher mid-evaluation at step 3, a
    # worker mid-evaluation at step 6 ... and the driver mid-request at step 7"
    assert _plan(make_schedule(2, 9, 4, 3, 2)) == [("controller", "mid-checkpoint", 2),
                                                    ("teacher", "mid-evaluation", 3),
                                                    ("worker", "mid-evaluation", 6), ("driver", "mid-request", 7)]
    assert _plan(make_schedule(2, 9, 4, 3, 2, on_policy=False)) == _plan(make_schedule(2, 9, 4, 3, 2))


def test_on_policy_schedule_kills_teachers_mid_grading_and_workers_mid_rollout():
    # 9 steps, K = 3, a checkpoint every 2: the steps 1..8 that are neither a boundary (3, 6) nor a checkpoint
    plain = [1, 5, 7]
    assert phase_steps(9, 3, 2)["mid-grading"] == phase_steps(9, 3, 2)["mid-rollout"] == plain
    for seed in range(20):
        faults = make_schedule(seed, 9, 4, 3, 2, on_policy=True)
        assert sorted(f.kind for f in faults) == sorted(KINDS)  # every kind once
        assert make_schedule(seed, 9, 4, 3, 2, on_policy=True) == faults  # a seed in, the same faults out
        for f in faults:
            if f.kind == "teacher":
                assert (f.phase, f.step in plain) == ("mid-grading", True)
            elif f.kind == "worker":
                assert (f.phase, f.step in plain) == ("mid-rollout", True)
            else:
                assert f.phase in ("mid-request", "mid-checkpoint", "mid-evaluation")
        assert len({f.step for f in faults}) == 4  # distinct steps (enough are free for 4)
    # the long schedule: 20 faults on 60 steps, the teachers' and workers' in their on-policy phases
    long = make_schedule(1, 60, 20, 6, 4, on_policy=True)
    assert {f.phase for f in long if f.kind == "teacher"} == {"mid-grading"}
    assert {f.phase for f in long if f.kind == "worker"} == {"mid-rollout"}


def _step(step, qa_rows, ids):
    return {"event": "step", "step": step, "rows": {"code": 1, "qa": qa_rows}, "onpolicy": {"rollout_ids": ids}}


def test_rollout_id_check():
    assert parse_rollout_id("2-1-10-3") == (2, 1, 10, 3) and parse_rollout_id("2-1-x-3") is None
    # two ranks; rank 1 has no conversation row at step 2 (its counter does not move)
    clean = [_step(1, 3, ["2-0-0-0", "2-0-0-1", "2-1-0-0"]), _step(2, 1, ["2-0-1-0"]),
             {"event": "eval", "step": 2}, _step(3, 2, ["2-0-2-0", "2-1-1-0"])]
    assert check_rollout_ids(clean, 2, ["qa"]) == ([], 6)
    assert check_rollout_ids(clean, 2)[0][0] == "step 1: 3 rollout ids for 4 conversation rows"  # code's row too
    # a resumed step kept twice in the metrics: its rollouts trained on twice, rank 0's call 1 repeated
    twice = clean[:2] + [_step(2, 1, ["2-0-1-0"])] + clean[2:]
    problems, _ = check_rollout_ids(twice, 2, ["qa"])
    assert any("2-0-1-0 trained on twice" in p for p in problems)
    assert any("rank 0: rollout calls [0, 1, 1, 2]" in p for p in problems)
    # a lost call: rank 0 resumed with a counter one ahead (call 2 never recorded)
    lost = clean[:1] + [_step(2, 1, ["2-0-2-0"]), _step(3, 2, ["2-0-3-0", "2-1-1-0"])]
    problems, _ = check_rollout_ids(lost, 2, ["qa"])
    assert problems == ["rank 0: rollout calls [0, 2, 3] in step order (a gap: lost, a repeat: redone)"]
    # a conversation row without its rollout; a row index skipped; another seed; no record at all
    def problems_of(records):
        return check_rollout_ids(records, 2, ["qa"])[0]

    assert problems_of([_step(1, 3, ["2-0-0-0", "2-1-0-0"])]) == ["step 1: 2 rollout ids for 3 conversation rows"]
    assert problems_of([_step(1, 2, ["2-0-0-0", "2-0-0-2"])]) == ["step 1: rank 0 call 0 has rows [0, 2]"]
    assert problems_of([_step(1, 1, ["3-0-0-0"])]) == ["step 1: rollout id '3-0-0-0' is not 2-rank-call-row"]
    assert problems_of([{"event": "step", "step": 1, "rows": {}}]) == ["step 1: no onpolicy.rollout_ids"]


def test_generation_time_of_a_step():
    records = [{"event": "step", "step": 1, "onpolicy": {"generation_s": 0.5, "grading_s": 0.1}},
               {"event": "step", "step": 2, "onpolicy": {"generation_s": 0.25}},
               {"event": "step", "step": 2, "onpolicy": {"generation_s": 0.75}},  # a resumed attempt's
               {"event": "step", "step": 3, "onpolicy": {"rows": 0}}]  # rank 0 made no rollout at step 3
    assert [generation_s(records, s) for s in (0, 1, 2, 3, 4)] == [0.0, 0.5, 0.75, 0.75, 0.75]


def test_unread_requests_sees_a_request_nobody_reads():
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)  # never accept()ed: as a SIGSTOPped server
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    try:
        assert unread_requests(port) == 0  # connected, nothing sent
        client.sendall(b"POST /v1/topk HTTP/1.1\r\n\r\n")
        for _ in range(100):  # loopback delivers at once; a few ms at most
            if unread_requests(port):
                break
        assert unread_requests(port) == 1
    finally:
        client.close()
        server.close()
