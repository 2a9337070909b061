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


# -- progress --------------------------------------------------------------------------------------------------
def test_progress_latest_curve_and_status(tmp_path):
    store = Store(tmp_path / "c.sqlite")
    run, _ = store.create_run(check_run_spec("r", DOMAINS, "ddk", 0.5, 10))
    assert store.progress("r") == {"latest": None, "points": []} and store.latest_progress("r") is None
    status = store.status("r")
    assert status == {"state": "created", "step": None, "total_steps": None, "loss": None, "tokens_per_s": None,
                      "version": 0, "updated_at": run["created_at"]}
    p = store.add_progress("r", 5, 100, loss=3.0, ce=2.5, kl=0.5, tokens_per_s=900)
    assert p == {"step": 5, "total_steps": 100, "loss": 3.0, "ce": 2.5, "kl": 0.5, "tokens_per_s": 900.0,
                 "updated_at": p["updated_at"]}
    assert store.add_progress("r", 7, 100)["loss"] is None  # no loss: the latest report, not a point
    store.add_progress("r", 9, 100, loss=2.0)
    got = store.progress("r")
    assert got["latest"]["step"] == 9 and got["latest"]["tokens_per_s"] is None
    assert got["points"] == [{"step": 5, "loss": 3.0, "ce": 2.5, "kl": 0.5},
                             {"step": 9, "loss": 2.0, "ce": None, "kl": None}]
    store.add_progress("r", 9, 100, loss=1.9)  # the same step again replaces its point
    assert [p["loss"] for p in store.progress("r")["points"]] == [3.0, 1.9]
    # a resumed run reports an earlier step: the points after it go, as metrics.jsonl's lines do
    store.add_progress("r", 6, 100, loss=2.8)
    assert [p["step"] for p in store.progress("r")["points"]] == [5, 6]
    w = store.add_evaluation("r", 0, {"code": 1.0, "prose": 1.0}, TEACHER)
    status = store.status("r")
    assert (status["state"], status["step"], status["total_steps"], status["loss"], status["version"]) == \
        ("training", 6, 100, 2.8, 1)
    assert status["updated_at"] == max(w["updated_at"], store.latest_progress("r")["updated_at"])
    store.add_progress("r", 100, 100, loss=1.0)
    assert store.status("r")["state"] == "finished"
    assert [r["status"]["step"] for r in store.list_runs(status=True)] == [100]
    assert "status" not in store.list_runs()[0] and "status" not in store.get_run("r")  # the run object as before


def test_progress_checks_its_input(tmp_path):
    store = Store(tmp_path / "c.sqlite")
    store.create_run(check_run_spec("r", DOMAINS))
    with pytest.raises(NotFound):
        store.add_progress("nope", 1, 10)
    with pytest.raises(NotFound):
        store.progress("nope")
    for args, kw, field in [((11, 10), {}, "step"), ((-1, 10), {}, "step"), ((1, 0), {}, "total_steps"),
                            ((True, 10), {}, "step"), ((1, 10), {"loss": math.nan}, "loss"),
                            ((1, 10), {"kl": math.inf}, "kl"), ((1, 10), {"tokens_per_s": -1.0}, "tokens_per_s"),
                            ((1, 2**54), {}, "total_steps")]:
        with pytest.raises(Invalid, match=f"^{field}"):
            store.add_progress("r", *args, **kw)
    assert store.latest_progress("r") is None


def test_the_loss_curve_stays_bounded_and_even(tmp_path, monkeypatch):
    """Past LOSS_POINTS every second point goes and the stride doubles: the curve still spans the run."""
    import ddk.controller.store as store_module

    monkeypatch.setattr(store_module, "LOSS_POINTS", 8)
    store = Store(tmp_path / "c.sqlite")
    store.create_run(check_run_spec("r", DOMAINS))
    for step in range(1, 101):
        store.add_progress("r", step, 100, loss=10.0 - step / 10)
        assert len(store.progress("r")["points"]) <= 8
    steps = [p["step"] for p in store.progress("r")["points"]]
    assert steps[0] == 1 and steps[-1] == 100 and steps == sorted(steps)  # first, last, in order
    gaps = [b - a for a, b in zip(steps, steps[1:-1])]
    assert max(gaps) <= 2 * min(gaps), steps  # about even spacing, not only the newest points


def test_progress_survives_reopening_and_marks_see_changes(tmp_path):
    path = tmp_path / "c.sqlite"
    store = Store(path)
    store.create_run(check_run_spec("a", DOMAINS))
    assert store.marks() == {"a": (0, 0)}
    store.add_progress("a", 3, 10, loss=1.0)
    store.create_run(check_run_spec("b", DOMAINS))
    store.add_evaluation("b", 0, {"code": 1.0, "prose": 1.0}, TEACHER)
    assert store.marks() == {"a": (0, 1), "b": (1, 0)}
    before = store.progress("a")
    again = Store(path)  # another process on the file, or a restart
    assert again.progress("a") == before and again.marks() == store.marks()


def test_the_event_stream_sends_the_curve_when_reports_came_faster_than_it_read(tmp_path):
    """The all-runs stream (``ddk.controller.app.changes``) reads the store when woken: one report since its last
    read is one progress message with that report's numbers; two (a trainer reporting faster than the stream
    reads, seen on a loaded machine: the page's loss chart then lacked the first) also carry the stored curve,
    both points."""
    import json

    from ddk.controller.app import changes

    def progress_messages(text: list[str]) -> list[dict]:
        return [json.loads(m.split("data: ", 1)[1]) for m in text if m.startswith("event: progress")]

    store = Store(tmp_path / "c.sqlite")
    store.create_run(check_run_spec("a", DOMAINS))
    _, marks = changes(store, {})
    store.add_progress("a", 3, 40, loss=5.0, ce=4.0, kl=1.0)
    out, marks = changes(store, marks)
    (one,) = progress_messages(out)
    assert one["step"] == 3 and one["loss"] == 5.0 and "points" not in one
    store.add_progress("a", 6, 40, loss=4.0, ce=3.0, kl=1.0)
    store.add_progress("a", 9, 40, loss=3.5, ce=2.5, kl=1.0)
    out, marks = changes(store, marks)
    (two,) = progress_messages(out)
    assert two["step"] == 9 and two["loss"] == 3.5
    assert two["points"] == [{"step": 3, "loss": 5.0, "ce": 4.0, "kl": 1.0},
                             {"step": 6, "loss": 4.0, "ce": 3.0, "kl": 1.0},
                             {"step": 9, "loss": 3.5, "ce": 2.5, "kl": 1.0}]
    assert changes(store, marks)[0] == []  # nothing new: no message


def test_a_file_from_before_progress_gets_its_tables(tmp_path):
    """An existing controller file without the progress tables: opening it adds them, the runs stay."""
    path = tmp_path / "c.sqlite"
    Store(path).create_run(check_run_spec("old", DOMAINS))
    con = sqlite3.connect(path)
    con.executescript("DROP TABLE progress; DROP TABLE loss_points;")
    con.close()
    store = Store(path)
    assert store.get_run("old")["run_id"] == "old" and store.progress("old") == {"latest": None, "points": []}
    store.add_progress("old", 1, 2, loss=0.5)
    assert store.status("old")["step"] == 1


# -- standard errors, the gap estimate and the noise warning (issue 24) ---------------------------------------------
NOISE = "the mixture is steering by noise; raise eval tokens"


def test_log_ratio_se_is_stored_and_the_noise_warning_answers(tmp_path):
    store = Store(tmp_path / "c.sqlite")
    store.create_run(check_run_spec("raw", DOMAINS))
    store.create_run(check_run_spec("shrunk", DOMAINS, gap_estimate="shrunk"))
    store.create_run(check_run_spec("fixed", DOMAINS, "fixed"))
    # gaps (0.3, 0.1): m = 0.2, s^2 = 0.02 < mean(se^2) = 0.04 -> tau^2 = 0: within their standard errors
    student, se = {"code": 1.3, "prose": 2.1}, {"code": 0.2, "prose": 0.2}
    w_raw = store.add_evaluation("raw", 0, student, TEACHER, log_ratio_se=se)
    assert w_raw["warning"] == NOISE
    # raw: today's weights, softmax(q) with q = (e^0.3, e^0.1)
    assert w_raw["weights"]["code"] == pytest.approx(1 / (1 + math.exp(math.exp(0.1) - math.exp(0.3))), rel=1e-12)
    # shrunk: both gaps are the mean 0.2, so the first evaluation's softmax is uniform
    w_shrunk = store.add_evaluation("shrunk", 0, student, TEACHER, log_ratio_se=se)
    assert w_shrunk["warning"] == NOISE and w_shrunk["weights"] == pytest.approx({"code": 0.5, "prose": 0.5})
    # fixed does not steer by the gaps: no warning
    assert "warning" not in store.add_evaluation("fixed", 0, student, TEACHER, log_ratio_se=se)
    hist = store.history("raw")
    assert hist[1]["log_ratio_se"] == se and hist[1]["warning"] == NOISE
    assert hist[1]["ratio"]["code"] == pytest.approx(math.exp(0.3))
    # code's se 0.01, prose without one (taken as 0): mean(se^2) = 0.00005, tau^2 = 0.01995 > 0 -> no warning
    w = store.add_evaluation("raw", 10, student, log_ratio_se={"code": 0.01})
    assert "warning" not in w and set(w) == {"version", "step", "weights", "updated_at"}
    assert store.history("raw")[2]["log_ratio_se"] == {"code": 0.01} and "warning" not in store.history("raw")[2]
    # without standard errors: the answer and the history as before
    w = store.add_evaluation("raw", 20, student)
    assert set(w) == {"version", "step", "weights", "updated_at"}
    assert not {"log_ratio_se", "warning"} & set(store.history("raw")[3])


def test_gap_estimate_is_part_of_the_run(tmp_path):
    store = Store(tmp_path / "c.sqlite")
    run, _ = store.create_run(check_run_spec("s", DOMAINS, gap_estimate="shrunk"))
    assert run["gap_estimate"] == "shrunk" and store.get_spec("s").gap_estimate == "shrunk"
    assert "gap_estimate" not in store.create_run(check_run_spec("r", DOMAINS))[0]  # raw: the run object as before
    with pytest.raises(Conflict, match="gap_estimate 'shrunk'"):
        store.create_run(check_run_spec("s", DOMAINS))
    with pytest.raises(Invalid, match="^gap_estimate: must be one of"):
        check_run_spec("x", DOMAINS, gap_estimate="lcb")


def test_bad_log_ratio_se_names_the_field(tmp_path):
    store = Store(tmp_path / "c.sqlite")
    store.create_run(check_run_spec("r", DOMAINS))
    for se, field in (({"code": -0.1}, "log_ratio_se.code"), ({"code": math.nan}, "log_ratio_se.code"),
                      ({"code": math.inf}, "log_ratio_se.code"), ({"code": "0.1"}, "log_ratio_se.code"),
                      ({"code": True}, "log_ratio_se.code"), ({"math": 0.1}, "log_ratio_se.math"),
                      ([0.1], "log_ratio_se")):
        with pytest.raises(Invalid, match="^" + field.replace(".", r"\.") + ":"):
            store.add_evaluation("r", 0, {"code": 1.0, "prose": 1.0}, TEACHER, log_ratio_se=se)
    assert store.weights("r")["version"] == 0
    store.add_evaluation("r", 0, {"code": 1.0, "prose": 1.0}, TEACHER, log_ratio_se={})  # empty: none
    assert "log_ratio_se" not in store.history("r")[1]


def test_a_file_from_before_the_standard_errors_keeps_working(tmp_path):
    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path)
    con.executescript("""
CREATE TABLE runs (run_id TEXT PRIMARY KEY, domains TEXT NOT NULL, policy TEXT NOT NULL, alpha REAL NOT NULL,
    interval_steps INTEGER NOT NULL, initial_weights TEXT, created_at TEXT NOT NULL, policy_params TEXT);
CREATE TABLE versions (run_id TEXT NOT NULL REFERENCES runs(run_id), version INTEGER NOT NULL, step INTEGER,
    student_loss TEXT, teacher_loss TEXT, ratio TEXT, weights TEXT NOT NULL, created_at TEXT NOT NULL,
    state TEXT, tokens TEXT, diagnostics TEXT, PRIMARY KEY (run_id, version));
INSERT INTO runs VALUES ('old', '["code", "prose"]', 'ddk', 0.5, 10, NULL, '2026-01-01T00:00:00.000Z', NULL);
INSERT INTO versions VALUES ('old', 0, NULL, NULL, NULL, NULL, '{"code": 0.5, "prose": 0.5}', 't0', NULL, NULL, NULL);
""")
    con.commit()
    con.close()
    store = Store(path)
    runs_cols = {r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(runs)")}
    version_cols = {r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(versions)")}
    assert "gap_estimate" in runs_cols and {"log_ratio_se", "warning"} <= version_cols
    assert store.get_spec("old").gap_estimate == "raw" and "gap_estimate" not in store.get_run("old")
    w = store.add_evaluation("old", 0, {"code": 1.3, "prose": 2.1}, TEACHER, log_ratio_se={"code": 0.2, "prose": 0.2})
    assert w["warning"] == NOISE and Store(path).history("old")[1]["log_ratio_se"] == {"code": 0.2, "prose": 0.2}
