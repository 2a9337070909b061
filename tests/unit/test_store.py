"""The SQLite store on a real file: versions, teacher-loss reuse, persistence, concurrent writers."""

from __future__ import annotations

import json
import math
import sqlite3
import threading

import pytest

from ddk.controller.spec import Invalid, check_run_spec
from ddk.controller.store import Conflict, NotFound, Store
from ddk.vocab import WeightsVersion

DOMAINS = ["code", "prose"]
TEACHER = {"code": 1.0, "prose": 2.0}


def test_run_lifecycle(tmp_path):
    store = Store(tmp_path / "c.sqlite")
    run, created = store.create_run(check_run_spec("r1", DOMAINS, "ddk", 0.5, 10))
    assert created and run["weights"] == {"version": 0, "step": None, "weights": {"code": 0.5, "prose": 0.5},
                                          "updated_at": run["created_at"]}
    assert store.create_run(check_run_spec("r1", DOMAINS, "ddk", 0.5, 10))[1] is False
    with pytest.raises(Conflict):
        store.create_run(check_run_spec("r1", DOMAINS, "ddk_raw", 0.5, 10))

    # first evaluation: softmax(q), q = (e^1, e^0)
    w1 = store.add_evaluation("r1", 0, {"code": 2.0, "prose": 2.0}, TEACHER)
    e = math.e
    assert w1["version"] == 1 and w1["step"] == 0
    assert w1["weights"]["code"] == pytest.approx(math.exp(e) / (math.exp(e) + e))
    # second evaluation without teacher losses: reuses them; equal ratios keep r_prev's shape, smoothed
    w2 = store.add_evaluation("r1", 10, {"code": 1.5, "prose": 2.5})
    assert w2["version"] == 2
    assert w2["weights"]["code"] == pytest.approx(0.5 * w1["weights"]["code"] + 0.25)

    hist = store.history("r1")
    assert [v["version"] for v in hist] == [0, 1, 2]
    assert hist[0]["ratio"] is None and hist[0]["student_loss"] is None
    assert hist[2]["teacher_loss"] == TEACHER
    assert hist[2]["ratio"]["code"] == pytest.approx(math.exp(0.5))
    assert store.weights("r1")["version"] == 2

    with pytest.raises(Conflict, match="^step"):
        store.add_evaluation("r1", 10, {"code": 1.0, "prose": 1.0})
    with pytest.raises(NotFound):
        store.add_evaluation("nope", 20, {"code": 1.0, "prose": 1.0})
    with pytest.raises(Invalid, match="^student_loss"):
        store.add_evaluation("r1", 20, {"code": 1.0})
    assert store.counts() == {"runs": 1, "evaluations": 2}


def test_first_evaluation_needs_teacher_losses_except_for_fixed(tmp_path):
    store = Store(tmp_path / "c.sqlite")
    store.create_run(check_run_spec("ddk", DOMAINS))
    with pytest.raises(Invalid, match="^teacher_loss"):
        store.add_evaluation("ddk", 0, {"code": 1.0, "prose": 1.0})
    assert store.weights("ddk")["version"] == 0  # nothing recorded
    store.create_run(check_run_spec("cpt", DOMAINS, "fixed", initial_weights={"code": 0.9, "prose": 0.1}))
    w = store.add_evaluation("cpt", 0, {"code": 1.0, "prose": 1.0})
    assert w["weights"] == {"code": 0.9, "prose": 0.1} and store.history("cpt")[1]["ratio"] is None


def test_state_survives_reopening(tmp_path):
    path = tmp_path / "c.sqlite"
    store = Store(path)
    store.create_run(check_run_spec("r", DOMAINS, "ddk", 0.3, 5))
    store.add_evaluation("r", 0, {"code": 3.0, "prose": 2.0}, TEACHER)
    before = store.history("r")
    again = Store(path)
    assert again.history("r") == before
    assert again.get_run("r")["alpha"] == 0.3
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_concurrent_writers_on_one_file_lose_nothing(tmp_path):
    """8 threads, each with its own Store (own connection, like separate processes), 5 evaluations each."""
    path = tmp_path / "c.sqlite"
    Store(path).create_run(check_run_spec("r", DOMAINS, "ddk", 0.5, 1))
    Store(path).add_evaluation("r", 0, {"code": 1.0, "prose": 1.0}, TEACHER)
    errors = []

    def worker(i):
        store = Store(path)
        for j in range(5):
            try:
                store.add_evaluation("r", 1 + i * 5 + j, {"code": 1.0 + i, "prose": 2.0})
            except Conflict:
                pass  # a bigger step from another thread got in first: refused, never double-applied
            except Exception as e:  # noqa: BLE001 - any other error fails the test
                errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    hist = Store(path).history("r")
    versions = [v["version"] for v in hist]
    steps = [v["step"] for v in hist[1:]]
    assert versions == list(range(len(hist)))  # no gaps, no duplicates
    assert steps == sorted(set(steps))  # strictly increasing steps
    assert len(hist) >= 2 + 5  # at least one thread's whole sequence lands


def test_every_weights_object_is_the_one_type(tmp_path):
    """What the store hands out as weights (run, evaluation, current, since, /metrics) is a vocab.WeightsVersion,
    and the API's response model declares exactly its fields."""
    from ddk.controller.app import WeightsOut

    keys = set(WeightsVersion.__annotations__)
    assert keys == {"version", "step", "weights", "updated_at"} and set(WeightsOut.model_fields) == keys
    store = Store(tmp_path / "c.sqlite")
    run, _ = store.create_run(check_run_spec("r", DOMAINS))
    w1 = store.add_evaluation("r", 0, {"code": 2.0, "prose": 1.0}, TEACHER)
    objects = [run["weights"], w1, store.weights("r"), *store.weights_since("r", -1), store.current_all()[0][1]]
    for w in objects:
        assert set(w) == keys and WeightsOut.model_validate(w).model_dump() == w
    assert store.weights("r") == w1 == store.weights_since("r", 0)[0] == store.current_all()[0][1]
    assert json.loads(json.dumps(w1)) == w1  # plain JSON types
