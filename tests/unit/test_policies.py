"""The policy plug-ins (ddk.controller.policies): registry, parameters, hand-computed cases of doremi and
ddk_progress, invariants of every policy, and the policy state through the SQLite store (no server)."""

from __future__ import annotations

import json
import math
import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ddk.controller import policies
from ddk.controller.policies import Evaluation
from ddk.controller.policies.ddk_progress import learnability, progress_weights
from ddk.controller.policies.doremi import doremi_weights
from ddk.controller.spec import Invalid, check_run_spec
from ddk.controller.store import Store

D2 = ("a", "b")
E = math.e


def ev(student, teacher, previous=None, tokens=None, domains=D2, initial=None, alpha=0.5, step=0):
    return Evaluation(step, tuple(domains), student, teacher, tokens, previous,
                      initial or {d: 1 / len(domains) for d in domains}, alpha)


def weights_of(name, student, teacher, previous=None, alpha=0.5):
    """One stateless update of a registered policy (its default parameters)."""
    p = policies.get(name)
    return p.update(None, ev(student, teacher, previous=previous, alpha=alpha), p.params())[0]


def run_policy(name, evaluations, params=None):
    """Chain a policy's update over evaluations (dicts of ev()'s arguments), as the store does: each one's
    previous weights and state are the last answer's. Returns [(weights, state), ...]."""
    p = policies.get(name)
    prm = policies.params_of(name, policies.check_params(name, params))
    state, previous, out = None, None, []
    for e in evaluations:
        weights, state = p.update(state, ev(previous=previous, **e), prm)
        state = json.loads(json.dumps(state))  # what the store keeps
        previous = weights
        out.append((weights, state))
    return out


# -- the registry ---------------------------------------------------------------------------------------------
def test_registry_has_every_policy_in_order():
    assert policies.names() == ("ddk", "ddk_raw", "fixed", "doremi", "ddk_progress")
    assert policies.steered() == ("ddk", "ddk_raw", "doremi", "ddk_progress")
    assert set(policies.steered()) == {n for n in policies.names() if policies.get(n).needs_teacher}
    with pytest.raises(ValueError, match="^policy: must be one of"):
        policies.get("kd")


def test_describe_lists_params_with_defaults():
    listed = {p["name"]: p for p in policies.describe()}
    assert list(listed) == list(policies.names())
    assert listed["doremi"]["params"]["eta"]["default"] == 1.0
    assert listed["doremi"]["params"]["smoothing"]["default"] == 1e-3
    assert listed["ddk_progress"]["params"]["min_learnability"]["default"] == 0.0
    assert listed["ddk"]["params"] == {} and listed["ddk"]["run_fields"] == ["alpha", "gap_estimate"]
    assert listed["fixed"]["run_fields"] == [] and listed["doremi"]["run_fields"] == ["gap_estimate"]
    assert listed["fixed"]["needs_teacher"] is False
    json.dumps(listed)  # plain JSON


@pytest.mark.parametrize("policy, params, field", [
    ("doremi", {"eta": 0}, "policy_params.eta"),
    ("doremi", {"eta": -1.0}, "policy_params.eta"),
    ("doremi", {"eta": "fast"}, "policy_params.eta"),
    ("doremi", {"smoothing": 1.5}, "policy_params.smoothing"),
    ("doremi", {"rho": 1}, "policy_params.rho"),
    ("ddk_progress", {"min_learnability": -0.1}, "policy_params.min_learnability"),
    ("ddk", {"alpha": 0.3}, "policy_params.alpha"),  # ddk's alpha is the run's top-level field
    ("doremi", [1, 2], "policy_params"),
])
def test_bad_policy_params_name_the_field(policy, params, field):
    with pytest.raises(Invalid) as e:
        check_run_spec("r", ["a", "b"], policy, policy_params=params)
    assert str(e.value).startswith(field + ":"), str(e.value)


def test_policy_params_are_resolved_and_part_of_the_spec():
    spec = check_run_spec("r", ["a", "b"], "doremi", policy_params={"eta": 2})
    assert spec.policy_params == {"eta": 2.0, "smoothing": 1e-3}
    assert spec.same_as(check_run_spec("r", ["a", "b"], "doremi", policy_params={"eta": 2.0, "smoothing": 1e-3}))
    assert not spec.same_as(check_run_spec("r", ["a", "b"], "doremi"))
    plain = check_run_spec("r", ["a", "b"], "doremi")
    assert plain.same_as(check_run_spec("r", ["a", "b"], "doremi", policy_params={}))
    assert check_run_spec("r", ["a", "b"], "ddk").policy_params is None


# -- the paper's policies: each module holds its rule ----------------------------------------------------------
def test_the_paper_policies_are_the_paper_formulas():
    # gaps (1, -0.5): q = (e, e^-0.5), computed literally (small enough not to overflow)
    s, t = {"a": 2.0, "b": 1.0}, {"a": 1.0, "b": 1.5}
    q = {"a": E, "b": math.exp(-0.5)}
    z = sum(math.exp(v) for v in q.values())
    softmax = {d: math.exp(q[d]) / z for d in D2}
    prev = {"a": 0.2, "b": 0.8}
    psi = {d: prev[d] * math.exp(q[d]) for d in D2}
    smooth = {d: 0.3 * psi[d] / sum(psi.values()) + 0.7 / 2 for d in D2}
    want = {("ddk", None): softmax, ("ddk", "prev"): smooth, ("ddk_raw", None): softmax, ("ddk_raw", "prev"): softmax,
            ("fixed", None): {"a": 0.5, "b": 0.5}, ("fixed", "prev"): {"a": 0.5, "b": 0.5}}
    for name in ("ddk", "ddk_raw", "fixed"):
        for key, previous in ((None, None), ("prev", prev)):
            w, state = policies.get(name).update(None, ev(s, t, previous=previous, alpha=0.3), policies.NoParams())
            assert w == pytest.approx(want[name, key], rel=1e-12)
            assert state is None


# -- doremi ---------------------------------------------------------------------------------------------------
def test_doremi_hand_computed():
    # excess = (max(2-1, 0), max(1-1.5, 0)) = (1, 0); prior uniform: a ∝ (e, 1); c = 0.1 -> + 0.05 each
    (w1, s1), (w2, s2) = run_policy("doremi", [
        {"student": {"a": 2.0, "b": 1.0}, "teacher": {"a": 1.0, "b": 1.5}},
        {"student": {"a": 1.0, "b": 1.5}, "teacher": {"a": 1.0, "b": 1.0}, "step": 10},
    ], {"smoothing": 0.1})
    assert w1["a"] == pytest.approx(0.9 * E / (E + 1) + 0.05, rel=1e-12)
    assert w1["a"] == pytest.approx(0.7079527208, abs=1e-9)  # by hand: e/(e+1) = 0.7310585786
    # second: excess (0, 0.5): prior w1, a ∝ (w1a, w1b * e^0.5)
    z = w1["a"] + w1["b"] * math.exp(0.5)
    assert w2["b"] == pytest.approx(0.9 * w1["b"] * math.exp(0.5) / z + 0.05, rel=1e-12)
    assert s1 == {"evaluations": 1, "average": w1}
    assert s2["evaluations"] == 2 and s2["average"]["a"] == pytest.approx((w1["a"] + w2["a"]) / 2)


def test_doremi_eta_scales_the_step_and_starts_from_the_initial_weights():
    w = doremi_weights([0.25, 0.75], [2.0, 0.0], eta=0.5, c=0.0)  # a ∝ (0.25 e^1, 0.75)
    assert w[0] == pytest.approx(0.25 * E / (0.25 * E + 0.75), rel=1e-12)
    p = policies.get("doremi")
    got, _ = p.update(None, ev({"a": 3.0, "b": 1.0}, {"a": 1.0, "b": 1.0}, initial={"a": 0.25, "b": 0.75}),
                      p.params(eta=0.5, smoothing=0.0))
    assert [got["a"], got["b"]] == pytest.approx(w, rel=1e-12)


def test_doremi_huge_excess_does_not_overflow():
    assert doremi_weights([0.5, 0.5], [1e308, 0.0], eta=1e6, c=1e-3) == pytest.approx([1 - 1e-3 + 5e-4, 5e-4])
    assert doremi_weights([0.5, 0.5], [1e4, 1e4], eta=1.0, c=0.0) == pytest.approx([0.5, 0.5])


# -- ddk_progress ---------------------------------------------------------------------------------------------
def test_ddk_progress_hand_computed_stalled_domain_loses_its_boost():
    # evaluation 1: gaps (2, 1), softmax(q) as ddk; state keeps the gaps and the tokens
    # evaluation 2: a's gap stays 2 after 100 more tokens (rate 0); b's closes 1 -> 0.5 in 50 tokens (rate 0.01)
    #   m = (0/0.01, 1) = (0, 1); b = (0 * (e^2 - 1), 1 * (e^0.5 - 1)); previous uniform (given)
    p = policies.get("ddk_progress")
    w1, s1 = p.update(None, ev({"a": 3.0, "b": 2.0}, {"a": 1.0, "b": 1.0}, tokens={"a": 100, "b": 100}), p.params())
    assert w1 == weights_of("ddk", {"a": 3.0, "b": 2.0}, {"a": 1.0, "b": 1.0})
    assert s1 == {"gap": {"a": 2.0, "b": 1.0}, "tokens": {"a": 100.0, "b": 100.0}}
    w2, s2 = p.update(s1, ev({"a": 3.0, "b": 1.5}, {"a": 1.0, "b": 1.0}, previous={"a": 0.5, "b": 0.5},
                             tokens={"a": 200, "b": 150}, step=10), p.params())
    boost_b = math.exp(math.exp(0.5) - 1)  # e^0.6487 = 1.9130
    assert w2["a"] == pytest.approx(0.5 * 1 / (1 + boost_b) + 0.25, rel=1e-12)
    assert w2["a"] == pytest.approx(0.4216, abs=1e-4)  # by hand: 0.5 / 2.9130 + 0.25
    assert s2["learnability"] == {"a": 0.0, "b": 1.0}
    # the paper's rule would have fed the stalled domain a nearly everything it can (0.5 * 0.998 + 0.25)
    ddk = weights_of("ddk", {"a": 3.0, "b": 1.5}, {"a": 1.0, "b": 1.0}, {"a": 0.5, "b": 0.5})
    assert ddk["a"] > 0.74 and w2["a"] < 0.43


def test_ddk_progress_partial_learnability_and_min_learnability():
    # rates (0.005, 0.01): m = (0.5, 1)
    assert learnability([1.5, 0.5], [2.0, 1.0], [200, 150], [100, 100]) == [0.5, 1.0]
    # m_min lifts the stalled one; no tokens in the interval: no evidence, m = 1
    assert learnability([2.0, 0.5], [2.0, 1.0], [200, 150], [100, 100], m_min=0.2) == [0.2, 1.0]
    assert learnability([2.0, 0.5], [2.0, 1.0], [100, 150], [100, 100]) == [1.0, 1.0]
    # nothing closed anywhere (rates <= 0), or tokens missing: no discount
    assert learnability([2.0, 1.5], [2.0, 1.0], [200, 150], [100, 100]) == [1.0, 1.0]
    assert learnability([2.0, 0.5], [2.0, 1.0], None, [100, 100]) == [1.0, 1.0]
    assert learnability([2.0, 0.5], None, [200, 150], None) == [1.0, 1.0]
    # m = (0.5, 1), gaps (ln 2, 0): b = (0.5 * (2 - 1), 1 * (1 - 1)) = (0.5, 0)
    w = progress_weights([0.5, 0.5], [math.log(2), 0.0], [0.5, 1.0], alpha=1.0)
    assert w[0] == pytest.approx(math.exp(0.5) / (math.exp(0.5) + 1), rel=1e-12)
    # a student ahead of the teacher keeps the paper's penalty (q - 1 < 0 is never discounted)
    w = progress_weights([0.5, 0.5], [math.log(0.5), 0.0], [0.0, 0.0], alpha=1.0)
    assert w[0] == pytest.approx(math.exp(-0.5) / (math.exp(-0.5) + 1), rel=1e-12)


def test_ddk_progress_without_tokens_is_ddk():
    evals = [{"student": {"a": 3.0, "b": 2.0}, "teacher": {"a": 1.0, "b": 1.0}},
             {"student": {"a": 2.9, "b": 1.2}, "teacher": {"a": 1.0, "b": 1.0}, "step": 10},
             {"student": {"a": 2.8, "b": 1.1}, "teacher": {"a": 1.0, "b": 1.0}, "step": 20}]
    got = [w for w, _ in run_policy("ddk_progress", evals)]
    want = [w for w, _ in run_policy("ddk", evals)]
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-12)
    # min_learnability 1 turns the discount off even with tokens
    with_tokens = [{**e, "tokens": {"a": 100.0 * i, "b": 10.0 * i}} for i, e in enumerate(evals)]
    got = [w for w, _ in run_policy("ddk_progress", with_tokens, {"min_learnability": 1.0})]
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-12)


def test_ddk_progress_huge_gaps_do_not_overflow():
    w = progress_weights([0.5, 0.5], [1e4, 1e3], [0.5, 0.0], alpha=0.5)
    assert w == pytest.approx([0.75, 0.25])
    w = progress_weights([0.5, 0.5], [1e4, 1e3], [0.0, 0.0], alpha=0.5)
    assert w == pytest.approx([0.5, 0.5])


# -- invariants of every policy -------------------------------------------------------------------------------
loss = st.floats(0.0, 30.0, allow_nan=False)


@st.composite
def runs(draw):
    """Domains, a sequence of evaluations, and one domain "z" whose gap is 0 at every evaluation while every
    other gap is >= 0."""
    n = draw(st.integers(2, 5))
    domains = ["z"] + [f"d{i}" for i in range(1, n)]
    evals, tokens = [], {d: 0.0 for d in domains}
    for k in range(draw(st.integers(1, 4))):
        teacher = {d: draw(loss) for d in domains}
        student = {d: teacher[d] + (0.0 if d == "z" else draw(st.floats(0.0, 12.0))) for d in domains}
        tokens = {d: tokens[d] + draw(st.sampled_from([0.0, 1.0, 64.0, 1e6])) for d in domains}
        evals.append({"student": student, "teacher": teacher, "domains": domains, "step": 10 * k,
                      "tokens": dict(tokens) if draw(st.booleans()) else None})
    return domains, evals


def floor(name, params, alpha, n, first):
    if name == "doremi":
        return params["smoothing"] / n
    if name in ("ddk", "ddk_progress") and not first:
        return (1 - alpha) / n
    return 0.0


@settings(max_examples=60, deadline=None)
@given(data=runs(), alpha=st.floats(0.0, 1.0), eta=st.floats(0.01, 100.0), c=st.floats(0.0, 1.0))
def test_every_policy_gives_a_distribution_with_its_floor(data, alpha, eta, c):
    domains, evals = data
    n = len(domains)
    for name in policies.names():
        params = {"doremi": {"eta": eta, "smoothing": c}}.get(name, {})
        resolved = policies.check_params(name, params)
        out = run_policy(name, [{**e, "alpha": alpha} for e in evals], params)
        for k, (w, state) in enumerate(out):
            assert list(w) == domains
            assert all(math.isfinite(x) and x >= 0 for x in w.values()), (name, w)
            assert sum(w.values()) == pytest.approx(1.0, abs=1e-9)
            lo = floor(name, resolved, alpha, n, k == 0)
            assert all(x >= lo - 1e-12 for x in w.values()), (name, w, lo)
            # the domain whose gap is 0 everywhere gains the least: its weight is the smallest
            assert w["z"] <= min(w.values()) + 1e-9, (name, k, w)
            json.dumps(state, allow_nan=False)  # plain JSON


def test_a_domain_without_gap_gets_the_floor_when_another_lags_far_behind():
    s, t = {"z": 1.0, "x": 40.0}, {"z": 1.0, "x": 1.0}
    (w, _), = run_policy("doremi", [{"student": s, "teacher": t, "domains": ("z", "x")}])
    assert w["z"] == pytest.approx(1e-3 / 2, rel=1e-6)
    for name in ("ddk", "ddk_progress"):
        _, (w, _) = run_policy(name, [{"student": s, "teacher": t, "domains": ("z", "x"), "tokens": {"z": 0, "x": 0}},
                                      {"student": s, "teacher": t, "domains": ("z", "x"), "step": 1,
                                       "tokens": {"z": 10, "x": 10}}])
        assert w["z"] == pytest.approx(0.25, rel=1e-9)


# -- the state through the store ------------------------------------------------------------------------------
def test_policy_state_survives_reopening_the_store(tmp_path):
    path = tmp_path / "c.sqlite"
    teacher = {"a": 1.0, "b": 1.0}
    evals = [({"a": 3.0, "b": 2.0}, {"a": 100, "b": 100}), ({"a": 3.0, "b": 1.5}, {"a": 200, "b": 150}),
             ({"a": 2.9, "b": 1.2}, {"a": 300, "b": 180})]
    want = run_policy("ddk_progress", [{"student": s, "teacher": teacher, "tokens": t, "step": 10 * i}
                                       for i, (s, t) in enumerate(evals)])
    store = Store(path)
    store.create_run(check_run_spec("p", ["a", "b"], "ddk_progress", 0.5, 10))
    for i, (s, t) in enumerate(evals[:2]):
        store.add_evaluation("p", 10 * i, s, teacher if i == 0 else None, tokens=t)
    assert store.policy_state("p") == want[1][1]
    again = Store(path)  # a restart: a new connection on the file
    w3 = again.add_evaluation("p", 20, *evals[2][:1], tokens=evals[2][1])
    assert w3["weights"] == pytest.approx(want[2][0], rel=1e-12)
    hist = again.history("p")
    assert hist[3]["policy_state"] == want[2][1] and hist[3]["tokens"] == {"a": 300.0, "b": 180.0}
    assert "policy_state" not in hist[0] and "tokens" not in hist[0]
    run = again.get_run("p")
    assert run["policy_params"] == {"min_learnability": 0.0}
    # doremi too: its params from the spec, its state the running average
    again.create_run(check_run_spec("d", ["a", "b"], "doremi", policy_params={"eta": 2.0}))
    again.add_evaluation("d", 0, {"a": 2.0, "b": 1.0}, teacher)
    w = Store(path).add_evaluation("d", 10, {"a": 1.0, "b": 1.0})
    want_d = run_policy("doremi", [{"student": {"a": 2.0, "b": 1.0}, "teacher": teacher},
                                   {"student": {"a": 1.0, "b": 1.0}, "teacher": teacher}], {"eta": 2.0})
    assert w["weights"] == pytest.approx(want_d[1][0], rel=1e-12)
    assert Store(path).policy_state("d") == want_d[1][1]


OLD_SCHEMA = """
CREATE TABLE runs (run_id TEXT PRIMARY KEY, domains TEXT NOT NULL, policy TEXT NOT NULL, alpha REAL NOT NULL,
    interval_steps INTEGER NOT NULL, initial_weights TEXT, created_at TEXT NOT NULL);
CREATE TABLE versions (run_id TEXT NOT NULL REFERENCES runs(run_id), version INTEGER NOT NULL, step INTEGER,
    student_loss TEXT, teacher_loss TEXT, ratio TEXT, weights TEXT NOT NULL, created_at TEXT NOT NULL,
    PRIMARY KEY (run_id, version));
"""


def test_a_file_from_before_the_policy_state_keeps_working(tmp_path):
    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path)
    con.executescript(OLD_SCHEMA)
    w1 = {"a": 0.7, "b": 0.3}
    con.execute("INSERT INTO runs VALUES ('old', '[\"a\", \"b\"]', 'ddk', 0.5, 10, NULL, '2026-01-01T00:00:00.000Z')")
    con.execute("INSERT INTO versions VALUES ('old', 0, NULL, NULL, NULL, NULL, '{\"a\": 0.5, \"b\": 0.5}', 't0')")
    con.execute("INSERT INTO versions VALUES ('old', 1, 0, '{\"a\": 2.0, \"b\": 2.0}', '{\"a\": 1.0, \"b\": 1.0}', "
                "'{\"a\": 2.7, \"b\": 2.7}', ?, 't1')", (json.dumps(w1),))
    con.commit()
    con.close()
    store = Store(path)
    cols = {r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(versions)")}
    assert {"state", "tokens"} <= cols
    assert store.get_run("old")["policy"] == "ddk" and "policy_params" not in store.get_run("old")
    w2 = store.add_evaluation("old", 10, {"a": 2.0, "b": 2.0})  # continues from version 1's weights
    assert w2["version"] == 2 and w2["weights"] == pytest.approx({"a": 0.5 * 0.7 + 0.25, "b": 0.5 * 0.3 + 0.25})
    Store(path)  # opening it again: nothing to migrate


def test_tokens_are_checked():
    from ddk.controller.spec import check_tokens

    assert check_tokens(None, ["a"]) is None
    assert check_tokens({"a": 3}, ["a"]) == {"a": 3.0}
    for bad, field in (({"a": -1}, "tokens.a"), ({"a": float("nan")}, "tokens.a"), ({"b": 1}, "tokens"),
                       ({}, "tokens")):
        with pytest.raises(Invalid, match="^" + field.replace(".", r"\.")):
            check_tokens(bad, ["a"])


# -- the trainer's side: the token counter and the evaluation it posts ---------------------------------------
def test_train_state_keeps_the_token_counter():
    from ddk.trainer.state import TrainState

    state = TrainState(step=3, tokens={"a": 384.0})  # weights and version: the mixture sync's (issue 23)
    d = state.state_dict()
    assert d["tokens"] == {"a": 384.0}
    back = TrainState()
    back.load_state_dict(json.loads(json.dumps(d)))
    assert back == state
    assert "tokens" not in TrainState(step=1).state_dict()  # the old shape until it counts
    old = TrainState()
    old.load_state_dict({"step": 2, "weights": {"a": 1}, "version": 1})  # a checkpoint from before the counter
    assert old.tokens == {}


def test_the_trainer_posts_tokens_with_its_evaluation():
    from ddk.trainer.mixture_sync import MixtureSync

    class Client:
        def __init__(self):
            self.calls = []

        def post_evaluation(self, run_id, step, student_loss, teacher_loss=None, **kw):
            self.calls.append(kw)
            return {"version": 1, "step": step, "weights": {"a": 1.0}}

    c = MixtureSync({"a": 1.0}, 0, client=Client())
    c.submit(0, {"a": 1.0}, {"a": 1.0}, {"a": 128.0})
    assert c.unposted[-1]["tokens"] == {"a": 128.0}
    c.try_post(0)
    c.submit(4, {"a": 1.0}, None)  # without tokens: the old call, so an older client or fake still works
    c.try_post(4)
    assert c.client.calls == [{"tokens": {"a": 128.0}}, {}]
