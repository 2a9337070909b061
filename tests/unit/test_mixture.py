"""DDK mixture math and spec validation: hand-computed cases and property-based invariants (no I/O).

The paper's rules are the policies' own (``ddk.controller.policies``): :func:`next_weights` below runs a registered
policy's update on one evaluation, as the store does, so these cases check the rule where it lives. The gap
estimate (``mixture.estimate_gaps``, docs/architecture.md "The gap estimate") is hand-computed at the end.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ddk import vocab
from ddk.controller import mixture, policies
from ddk.controller.mixture import estimate_gaps, uniform
from ddk.controller.spec import Invalid, check_evaluation, check_losses, check_run_spec
from ddk.vocab import ratio

D2 = ["a", "b"]


def next_weights(policy, domains, student_loss, teacher_loss, previous, initial=None, alpha=0.5,
                 log_ratio_se=None, gap_estimate="raw"):
    """The weights the registered ``policy`` gives on one evaluation (no state, its default parameters)."""
    p = policies.get(policy)
    ev = policies.Evaluation(0, tuple(domains), student_loss, teacher_loss, None, previous,
                             initial if initial is not None else uniform(domains), alpha, log_ratio_se, gap_estimate)
    weights, _ = p.update(None, ev, p.params())
    return weights


# -- hand-computed cases ---------------------------------------------------------------------------------
def test_first_evaluation_is_softmax_of_ppl_ratio():
    # student 2 and 1 nats, teacher 1 and 1 nats: q = (e^1, e^0) = (e, 1); softmax(q)
    w = next_weights("ddk", D2, {"a": 2.0, "b": 1.0}, {"a": 1.0, "b": 1.0}, previous=None)
    e = math.e
    assert w["a"] == pytest.approx(math.exp(e) / (math.exp(e) + math.exp(1)), rel=1e-12)
    assert w["b"] == pytest.approx(math.exp(1) / (math.exp(e) + math.exp(1)), rel=1e-12)
    assert w["a"] == pytest.approx(0.8479073926, abs=1e-9)  # by hand: e^e = 15.1543, e = 2.71828


def test_later_evaluation_smooths_towards_uniform():
    # q equal on both domains: psi/sum(psi) = r_prev, so r = 0.5 * r_prev + 0.5 / 2
    w = next_weights("ddk", D2, {"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 1.0}, previous={"a": 0.25, "b": 0.75})
    assert w == pytest.approx({"a": 0.375, "b": 0.625}, abs=1e-12)

    # r_prev uniform, q = (2, 1) (student a is ln 2 nats worse): psi ∝ (e^2, e) -> (e/(e+1), 1/(e+1))
    w = next_weights("ddk", D2, {"a": 1.0 + math.log(2), "b": 3.0}, {"a": 1.0, "b": 3.0},
                     previous={"a": 0.5, "b": 0.5}, alpha=0.5)
    e = math.e
    assert w["a"] == pytest.approx(0.5 * e / (e + 1) + 0.25, rel=1e-12)
    assert w["b"] == pytest.approx(0.5 * 1 / (e + 1) + 0.25, rel=1e-12)


def test_alpha_changes_the_floor():
    # alpha 0.8 and 3 domains: floor (1-0.8)/3; equal q keeps r_prev's shape
    prev = {"a": 0.6, "b": 0.3, "c": 0.1}
    losses = {"a": 2.0, "b": 2.0, "c": 2.0}
    w = next_weights("ddk", ["a", "b", "c"], losses, losses, previous=prev, alpha=0.8)
    assert w == pytest.approx({"a": 0.8 * 0.6 + 0.2 / 3, "b": 0.8 * 0.3 + 0.2 / 3, "c": 0.8 * 0.1 + 0.2 / 3})


def test_ddk_raw_ignores_previous_weights():
    w = next_weights("ddk_raw", D2, {"a": 2.0, "b": 1.0}, {"a": 1.0, "b": 1.0}, previous={"a": 0.01, "b": 0.99})
    e = math.e
    assert w["a"] == pytest.approx(math.exp(e) / (math.exp(e) + math.e), rel=1e-12)


def test_fixed_keeps_initial_weights():
    init = {"a": 0.7, "b": 0.3}
    assert next_weights("fixed", D2, {"a": 9.0, "b": 0.0}, {"a": 0.0, "b": 0.0}, None, initial=init) == init
    assert next_weights("fixed", D2, {"a": 9.0, "b": 0.0}, None, {"a": 0.1, "b": 0.9}) == {"a": 0.5, "b": 0.5}


def test_ratio_is_ppl_student_over_teacher():
    r = ratio({"a": 3.0, "b": 1.0}, {"a": 1.0, "b": 1.5})
    assert r["a"] == pytest.approx(math.exp(3.0) / math.exp(1.0))
    assert r["b"] == pytest.approx(math.exp(1.0) / math.exp(1.5))
    assert math.isfinite(ratio({"a": 1e4}, {"a": 0.0})["a"])  # clipped, still JSON-serialisable


def test_huge_gaps_do_not_overflow():
    # q = exp(1e4) overflows a double; the lagging domain simply takes everything softmax can give
    w = next_weights("ddk_raw", D2, {"a": 1e4, "b": 0.0}, {"a": 0.0, "b": 0.0}, None)
    assert w == {"a": 1.0, "b": 0.0}
    w = next_weights("ddk", D2, {"a": 1e4, "b": 1e4}, {"a": 0.0, "b": 0.0}, previous={"a": 0.2, "b": 0.8})
    assert w == pytest.approx({"a": 0.35, "b": 0.65})  # equal (astronomical) q: r_prev shape kept
    w = next_weights("ddk", D2, {"a": 0.0, "b": 1e4}, {"a": 1e4, "b": 0.0}, previous={"a": 0.999, "b": 0.001})
    assert w == pytest.approx({"a": 0.25, "b": 0.75})


def test_losses_must_cover_the_domains(tmp_path):
    # checked once, where an evaluation enters (spec.check_evaluation, which the store calls); the math trusts it
    with pytest.raises(ValueError, match="student_loss"):
        check_evaluation(D2, 0, {"a": 1.0}, {"a": 1.0, "b": 1.0})
    from ddk.controller.store import Store

    store = Store(tmp_path / "c.sqlite")
    store.create_run(check_run_spec("r", D2, "ddk"))
    with pytest.raises(ValueError, match="teacher_loss"):
        store.add_evaluation("r", 0, {"a": 1.0, "b": 1.0}, None)


# -- properties ------------------------------------------------------------------------------------------
loss = st.floats(min_value=0.0, max_value=1e4, allow_nan=False, allow_infinity=False)


@st.composite
def evaluations(draw):
    n = draw(st.integers(1, 8))
    domains = [f"d{i}" for i in range(n)]
    student = {d: draw(loss) for d in domains}
    teacher = {d: draw(loss) for d in domains}
    raw = [draw(st.floats(0.0, 1.0)) for _ in domains]
    assume(sum(raw) > 1e-6)
    prev = {d: x / sum(raw) for d, x in zip(domains, raw)}
    alpha = draw(st.floats(0.0, 1.0))
    return domains, student, teacher, prev, alpha


def _is_distribution(w, domains):
    return (list(w) == domains and all(math.isfinite(x) and x >= 0 for x in w.values())
            and sum(w.values()) == pytest.approx(1.0, abs=1e-9))


@settings(max_examples=300, deadline=None)
@given(evaluations())
def test_weights_are_always_a_distribution(case):
    domains, student, teacher, prev, alpha = case
    for policy in ("ddk", "ddk_raw"):
        for previous in (None, prev):
            w = next_weights(policy, domains, student, teacher, previous, alpha=alpha)
            assert _is_distribution(w, domains)
    w = next_weights("ddk", domains, student, teacher, prev, alpha=alpha)
    floor = (1 - alpha) / len(domains)
    assert all(x >= floor for x in w.values())


@settings(max_examples=200, deadline=None)
@given(evaluations(), st.floats(0.0, 1e4))
def test_equal_gaps_give_uniform_softmax_and_keep_the_previous_shape(case, shift):
    domains, student, _, prev, alpha = case
    teacher = {d: shift for d in domains}
    student = {d: shift + 0.3 for d in domains}  # every domain lags by the same 0.3 nats
    n = len(domains)
    assert next_weights("ddk", domains, student, teacher, None) == pytest.approx({d: 1 / n for d in domains})
    w = next_weights("ddk", domains, student, teacher, prev, alpha=alpha)
    assert w == pytest.approx({d: alpha * prev[d] + (1 - alpha) / n for d in domains}, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(evaluations())
def test_matches_the_naive_formula_when_it_does_not_overflow(case):
    domains, student, teacher, prev, alpha = case
    # keep gaps within [-2, 2) so that exp(exp(gap)) fits a double, then compute the paper's formulas literally
    teacher = {d: 50.0 + teacher[d] % 50.0 for d in domains}
    student = {d: teacher[d] + student[d] % 4.0 - 2.0 for d in domains}
    q = {d: math.exp(student[d]) / math.exp(teacher[d]) for d in domains}  # PPL_S / PPL_T, literally
    z = sum(math.exp(q[d]) for d in domains)
    softmax = {d: math.exp(q[d]) / z for d in domains}
    assert next_weights("ddk", domains, student, teacher, None) == pytest.approx(softmax, rel=1e-9, abs=1e-300)
    psi = {d: prev[d] * math.exp(q[d]) for d in domains}
    s = sum(psi.values())
    smooth = {d: alpha * psi[d] / s + (1 - alpha) / len(domains) for d in domains}
    assert next_weights("ddk", domains, student, teacher, prev, alpha=alpha) == pytest.approx(smooth, rel=1e-9,
                                                                                              abs=1e-15)


@settings(max_examples=100, deadline=None)
@given(evaluations())
def test_a_domain_that_lags_more_never_gets_less(case):
    domains, student, teacher, _, _ = case
    w = next_weights("ddk_raw", domains, student, teacher, None)
    gaps = {d: student[d] - teacher[d] for d in domains}
    for a in domains:
        for b in domains:
            if gaps[a] > gaps[b]:
                assert w[a] >= w[b]


# -- spec validation -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    (dict(run_id="", domains=["a"]), "run_id"),
    (dict(run_id="a/b", domains=["a"]), "run_id"),
    (dict(run_id="r", domains=[]), "domains"),
    (dict(run_id="r", domains=["a", "a"]), "domains"),
    (dict(run_id="r", domains=["a", ""]), "domains"),
    (dict(run_id="r", domains=["a"], policy="kd"), "policy"),
    (dict(run_id="r", domains=["a"], alpha=-0.1), "alpha"),
    (dict(run_id="r", domains=["a"], alpha=float("nan")), "alpha"),
    (dict(run_id="r", domains=["a"], interval_steps=0), "interval_steps"),
    (dict(run_id="r", domains=["a", "b"], initial_weights={"a": 1.0}), "initial_weights"),
    (dict(run_id="r", domains=["a", "b"], initial_weights={"a": 0.5, "b": 0.6}), "initial_weights"),
    (dict(run_id="r", domains=["a", "b"], initial_weights={"a": 1.5, "b": -0.5}), "initial_weights.b"),
])
def test_bad_run_specs_name_the_field(kwargs, field):
    with pytest.raises(Invalid) as e:
        check_run_spec(**kwargs)
    assert str(e.value).startswith(field + ":") or str(e.value).startswith(field + ".")


@pytest.mark.parametrize("run_id", ["r", "a" * 128, "Run-1.b_2", "a" * 129, "a:b", "_a", ".", "a\n", "a b", "é"])
def test_the_run_id_rule_is_the_vocab_one(run_id):
    """check_run_spec accepts exactly the run ids of ddk.vocab's rule (1-128 chars, no ':')."""
    if vocab.is_run_id(run_id):
        assert check_run_spec(run_id, ["a"]).run_id == run_id
    else:
        with pytest.raises(Invalid) as e:
            check_run_spec(run_id, ["a"])
        assert str(e.value) == "run_id: " + vocab.RUN_ID_RULE
    assert vocab.is_run_id(run_id) == (run_id in ("r", "a" * 128, "Run-1.b_2"))


def test_every_registered_policy_is_a_run_spec_policy_with_its_math():
    assert not hasattr(mixture, "next_weights")  # no dispatch on names: each policy module holds its rule
    assert policies.names() == ("ddk", "ddk_raw", "fixed", "doremi", "ddk_progress")
    for policy in policies.names():  # every registered name is one the run spec accepts and the math computes
        check_run_spec("r", ["a"], policy)
        assert next_weights(policy, ["a"], {"a": 1.0}, {"a": 1.0}, None) == {"a": 1.0}
    with pytest.raises(Invalid, match="^policy: must be one of"):
        check_run_spec("r", ["a"], "kd")


def test_good_run_spec_is_normalised():
    spec = check_run_spec("r", ["a", "b"], "fixed", 0.5, 10, {"a": 0.25 + 1e-11, "b": 0.75})
    assert sum(spec.initial_weights.values()) == pytest.approx(1.0, abs=1e-15)
    assert spec.same_as(check_run_spec("r", ["a", "b"], "fixed", 0.5, 10, {"a": 0.25, "b": 0.75}))
    assert not spec.same_as(check_run_spec("r", ["a", "b"], "fixed", 0.5, 11, {"a": 0.25, "b": 0.75}))
    assert check_run_spec("r", ["a", "b"]).same_as(check_run_spec("r", ["a", "b"], initial_weights={"a": .5, "b": .5}))


@pytest.mark.parametrize("losses, field", [
    ({"a": 1.0}, "student_loss"), ({"a": 1.0, "b": 1.0, "c": 1.0}, "student_loss"),
    ({"a": -1.0, "b": 1.0}, "student_loss.a"), ({"a": float("inf"), "b": 1.0}, "student_loss.a"),
    ({"a": float("nan"), "b": 1.0}, "student_loss.a"),
])
def test_bad_losses(losses, field):
    with pytest.raises(Invalid, match="^" + field.replace(".", r"\.")):
        check_losses("student_loss", losses, ["a", "b"])
    with pytest.raises(Invalid, match="^" + field.replace(".", r"\.")):  # the evaluation's one check
        check_evaluation(["a", "b"], 0, losses, {"a": 1.0, "b": 1.0})


# -- the gap estimate (docs/architecture.md, "The gap estimate") ----------------------------------------------
X3 = [1.0, 0.4, 0.1]  # measured log-ratios of domains a, b, c


def test_shrinkage_hand_computed():
    # m = 0.5; s^2 = (0.25 + 0.01 + 0.16) / 2 = 0.21; mean(se^2) = (0.04 + 0.04 + 0.16) / 3 = 0.08; tau^2 = 0.13
    est = estimate_gaps(X3, [0.2, 0.2, 0.4], "shrunk")
    assert est.mean == pytest.approx(0.5, abs=1e-15) and est.tau2 == pytest.approx(0.13, abs=1e-12)
    assert not est.noise
    # B = 0.13/0.17 = 0.764706 for a and b, 0.13/0.29 = 0.448276 for c (the noisiest moves most)
    assert est.gaps == pytest.approx([0.882353, 0.423529, 0.320690], abs=1e-6)
    # raw: the same tau^2 and verdict, the gaps as measured
    raw = estimate_gaps(X3, [0.2, 0.2, 0.4], "raw")
    assert raw.gaps == X3 and raw.tau2 == est.tau2 and raw.noise is False


def test_a_domain_without_a_standard_error_keeps_its_gap():
    # c has a single document (no se): taken as 0 -> mean(se^2) = 0.08 / 3, tau^2 = 0.21 - 0.026667 = 0.183333
    est = estimate_gaps(X3, [0.2, 0.2, None], "shrunk")
    assert est.tau2 == pytest.approx(0.183333, abs=1e-6)
    assert est.gaps == pytest.approx([0.910448, 0.417910, 0.1], abs=1e-6)
    assert est.gaps[2] == 0.1


def test_gaps_within_their_standard_errors_are_noise():
    # m = 0.2, s^2 = 0.02 < mean(se^2) = 0.04: tau^2 = 0, every domain is the mean, the mixture steers by noise
    est = estimate_gaps([0.3, 0.1], [0.2, 0.2], "shrunk")
    assert est.tau2 == 0.0 and est.noise
    assert est.gaps == pytest.approx([0.2, 0.2], abs=1e-15)
    assert estimate_gaps([0.3, 0.1], [0.2, 0.2], "raw").noise  # the verdict does not depend on the estimate used
    w = next_weights("ddk", D2, {"a": 1.3, "b": 1.1}, {"a": 1.0, "b": 1.0}, None, log_ratio_se={"a": 0.2, "b": 0.2},
                     gap_estimate="shrunk")
    assert w == pytest.approx({"a": 0.5, "b": 0.5}, abs=1e-12)
    # no standard errors: no verdict; one domain: nothing to compare
    assert not estimate_gaps([0.3, 0.1]).noise and estimate_gaps([0.3, 0.1]).tau2 is None
    assert not estimate_gaps([0.3], [0.5], "shrunk").noise and estimate_gaps([0.3], [0.5], "shrunk").gaps == [0.3]


def test_shrunk_weights_are_the_rule_on_the_shrunk_gaps():
    # ddk_raw with the shrunk gaps of the hand-computed case: softmax(exp(x')) with x' = (0.882353, 0.423529, 0.320690)
    s, t = {"a": 2.0, "b": 1.4, "c": 1.1}, {"a": 1.0, "b": 1.0, "c": 1.0}  # gaps 1.0, 0.4, 0.1 (to 1e-15)
    se = {"a": 0.2, "b": 0.2, "c": 0.4}
    w = next_weights("ddk_raw", ["a", "b", "c"], s, t, None, log_ratio_se=se, gap_estimate="shrunk")
    e = [math.exp(math.exp(x)) for x in (0.8823529, 0.4235294, 0.3206897)]
    assert [w["a"], w["b"], w["c"]] == pytest.approx([v / sum(e) for v in e], rel=1e-6)
    # raw (the default) ignores the standard errors: today's rule
    assert next_weights("ddk_raw", ["a", "b", "c"], s, t, None, log_ratio_se=se) == \
        next_weights("ddk_raw", ["a", "b", "c"], s, t, None)


@settings(max_examples=100, deadline=None)
@given(evaluations(), st.sampled_from([None, 0.0]))
def test_equal_to_todays_rule_when_every_standard_error_is_0(case, zero):
    domains, student, teacher, prev, alpha = case
    gaps = [student[d] - teacher[d] for d in domains]
    se = {d: zero for d in domains} if zero is not None else {}
    assert estimate_gaps(gaps, [se.get(d) for d in domains], "shrunk").gaps == gaps  # bit for bit
    for name in ("ddk", "ddk_raw", "doremi", "ddk_progress"):
        for previous in (None, prev):
            today = next_weights(name, domains, student, teacher, previous, alpha=alpha)
            assert next_weights(name, domains, student, teacher, previous, alpha=alpha, log_ratio_se=se,
                                gap_estimate="shrunk") == today


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(-20.0, 20.0), st.one_of(st.none(), st.floats(0.0, 5.0))), min_size=2, max_size=8))
def test_shrinkage_moves_each_gap_towards_the_mean_and_no_further(pairs):
    gaps, se = [g for g, _ in pairs], [s for _, s in pairs]
    est = estimate_gaps(gaps, se, "shrunk")
    m = math.fsum(gaps) / len(gaps)
    assert est.tau2 is not None and est.tau2 >= 0.0
    for x, s, y in zip(gaps, se, est.gaps):
        lo, hi = min(x, m), max(x, m)
        assert lo - 1e-9 <= y <= hi + 1e-9  # between the measurement and the mean
        if not s:
            assert y == x  # no standard error: kept as measured
    assert est.noise == (est.tau2 == 0.0 and any(s for s in se))


def test_gap_estimate_of_gaps_near_the_float_limit_does_not_overflow():
    """Finite losses near 1e308 (the fuzzer's case: student 0, teacher 5.99e307 on three domains, a 500 before):
    the mean is taken without overflow, and a spread beyond the float range is inf (not noise, nothing shrunk)."""
    from ddk.controller.mixture import estimate_gaps

    g = -5.992310449541053e+307
    est = estimate_gaps([g, g, g], None, "raw")
    assert est.gaps == [g, g, g] and est.mean == g and est.tau2 is None and est.noise is False
    est = estimate_gaps([g, g, g], [0.1, 0.1, 0.1], "shrunk")
    assert est.gaps == [g, g, g] and est.tau2 == 0.0 and est.noise is True  # identical gaps: within their errors
    est = estimate_gaps([1.7e308, -1.7e308, 0.0], [0.1, 0.1, 0.1], "shrunk")
    assert est.gaps == [1.7e308, -1.7e308, 0.0] and est.mean == 0.0 and est.tau2 == float("inf")
    assert est.noise is False
