"""`ddk compare`'s statistics (ddk.experiments.stats) and the report parts built on them (tables, plots):
paired differences over seeds, the claims they allow, the ratio-vs-tokens curve and its area."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ddk.experiments.compare import ratio_curve
from ddk.experiments.stats import claim, mean_curve, paired_difference, t_abs_cdf, t_quantile, trapezoid_area
from ddk.experiments.tables import aggregate, comparison_pairs, format_report, paired_comparisons

try:
    from scipy import stats as scipy_stats
except ImportError:  # no scipy in the venv: the published quantiles (t table, 10 digits)
    scipy_stats = None

T975 = {1: 12.70620474, 2: 4.30265273, 3: 3.18244631, 4: 2.77644511, 5: 2.57058184, 9: 2.26215716,
        29: 2.04522964, 100: 1.98397152}


def t975(df):
    return float(scipy_stats.t.ppf(0.975, df)) if scipy_stats is not None else T975[df]


def reference_interval(d):
    """The 95% t-interval of the mean of d, computed with numpy (and scipy when it is there)."""
    d = np.asarray(d, dtype=float)
    half = t975(len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return d.mean() - half, d.mean() + half


@pytest.mark.parametrize("df", sorted(T975))
def test_t_quantile_matches_the_reference(df):
    assert t_quantile(0.975, df) == pytest.approx(t975(df), rel=1e-8)
    assert t_abs_cdf(t_quantile(0.975, df), df) == pytest.approx(0.95, abs=1e-12)


def test_t_cdf_small_cases_by_hand():
    assert t_abs_cdf(1.0, 1) == pytest.approx(0.5)  # Cauchy: P(|T| <= 1) = 2 atan(1) / (pi / 2) / 2
    assert t_abs_cdf(math.sqrt(2), 2) == pytest.approx(1 / math.sqrt(2))  # df 2: t / sqrt(t^2 + 2)
    assert t_abs_cdf(0.0, 7) == 0.0


def test_policies_that_differ_by_construction_get_a_claim():
    # ddk is 0.05 lower than kd on every seed, up to noise of 0.002: the interval is far below 0
    kd = [1.30, 1.25, 1.40, 1.33, 1.28]
    ddk = [x - 0.05 + e for x, e in zip(kd, [0.001, -0.002, 0.0, 0.002, -0.001])]
    diff = paired_difference(ddk, kd)
    low, high = reference_interval(np.subtract(ddk, kd))
    assert diff["n"] == 5 and diff["mean"] == pytest.approx(np.mean(np.subtract(ddk, kd)), abs=1e-15)
    assert diff["low"] == pytest.approx(low, rel=1e-8) and diff["high"] == pytest.approx(high, rel=1e-8)
    assert diff["high"] < 0 and diff["excludes_zero"]
    assert claim(diff, "ddk", "kd", "the mean") == "ddk beats kd on the mean"
    assert claim(paired_difference(kd, ddk), "kd", "ddk", "the mean") == "ddk beats kd on the mean"


def test_policies_that_do_not_differ_get_no_claim():
    # differences of both signs around 0: the interval covers 0
    kd = [1.30, 1.25, 1.40]
    ddk = [1.31, 1.24, 1.405]
    diff = paired_difference(ddk, kd)
    low, high = reference_interval(np.subtract(ddk, kd))
    assert diff["low"] == pytest.approx(low, rel=1e-8) and diff["high"] == pytest.approx(high, rel=1e-8)
    assert diff["low"] < 0 < diff["high"] and not diff["excludes_zero"]
    assert claim(diff, "ddk", "kd", "the mean") == "no difference measurable at 3 seeds"


def test_one_seed_has_no_interval_and_no_claim():
    diff = paired_difference([1.0], [2.0])
    assert diff["low"] is None and diff["high"] is None and not diff["excludes_zero"]
    assert claim(diff, "ddk", "kd", "the mean") == "no difference measurable at 1 seed"
    with pytest.raises(ValueError):
        paired_difference([1.0, 2.0], [1.0])


def test_trapezoid_area_and_mean_curve():
    assert trapezoid_area([[0, 2.0], [10, 1.0], [20, 1.0]]) == pytest.approx(15 + 10)
    assert trapezoid_area([[10, 1.0], [0, 2.0]]) == pytest.approx(15)  # sorted by x
    assert trapezoid_area([[0, 1.0]]) == 0.0
    trapezoid = np.trapezoid if hasattr(np, "trapezoid") else np.trapz
    assert trapezoid_area([[0, 2.0], [10, 1.0], [20, 1.0]]) == pytest.approx(trapezoid([2.0, 1.0, 1.0], [0, 10, 20]))
    assert mean_curve([[[0, 2.0], [10, 1.0]], [[0, 3.0], [10, 2.0], [20, 1.0]]]) == [[0, 2.5], [10, 1.5]]
    assert mean_curve([]) == []


def test_ratio_curve_from_metrics_records():
    records = [{"event": "eval", "step": 0, "ratio": {"a": 2.0, "b": 4.0}},
               {"event": "step", "step": 1, "rows": {"a": 3, "b": 1}},
               {"event": "step", "step": 2, "rows": {"a": 2, "b": 2}},
               {"event": "eval", "step": 2, "ratio": {"a": 1.5, "b": 2.5}},
               {"event": "weights", "step": 2},
               {"event": "step", "step": 3, "rows": {"a": 4, "b": 0}},
               {"event": "eval", "step": 3, "ratio": None}]  # a CPT line without ratios is skipped
    assert ratio_curve(records, seq_len=10) == [[0.0, 3.0], [80.0, 2.0]]


# -- the report ------------------------------------------------------------------------------------------------
def _runs(means, worst_extra=0.5, curve_shift=0.0):
    """One run per seed: domain a at the mean - x, b at the mean + x (x = worst_extra / 2), and a curve."""
    return [{"seed": s, "ratio": {"a": m - worst_extra / 2, "b": m + worst_extra / 2}, "tokens": {"a": 1, "b": 1},
             "curve": [[0.0, 2.0], [1e6, m + curve_shift], [2e6, m]]} for s, m in enumerate(means)]


def test_comparison_pairs_each_steered_arm_against_the_baselines():
    assert comparison_pairs(["cpt", "kd", "ddk_raw", "ddk"]) == [
        ("ddk_raw", "cpt"), ("ddk_raw", "kd"), ("ddk", "cpt"), ("ddk", "kd"), ("ddk", "ddk_raw")]
    assert comparison_pairs(["kd", "ddk_progress", "doremi"]) == [
        ("ddk_progress", "kd"), ("doremi", "kd"), ("doremi", "ddk_progress")]
    assert comparison_pairs(["cpt", "kd"]) == []


def test_report_words_a_claim_only_when_the_interval_excludes_zero():
    results = {"kd": _runs([1.30, 1.25, 1.40]),
               "ddk_raw": _runs([1.31, 1.24, 1.405]),                 # no measurable difference
               "ddk": _runs([1.25, 1.20, 1.352], curve_shift=-0.2)}   # 0.05 better on every seed, and sooner
    comps = paired_comparisons(results, ["a", "b"])
    by = {(c["policy"], c["baseline"], c["metric"]): c for c in comps}
    assert by[("ddk", "kd", "mean_ratio")]["claim"] == "ddk beats kd on the mean"
    assert by[("ddk", "kd", "worst_ratio")]["claim"] == "ddk beats kd on the worst domain"
    assert by[("ddk", "kd", "area")]["claim"] == "ddk beats kd on the area under the curve"
    assert by[("ddk_raw", "kd", "mean_ratio")]["claim"] == "no difference measurable at 3 seeds"
    d = np.subtract([1.25, 1.20, 1.352], [1.30, 1.25, 1.40])
    low, high = reference_interval(d)
    assert by[("ddk", "kd", "mean_ratio")]["low"] == pytest.approx(low, rel=1e-8)
    assert by[("ddk", "kd", "mean_ratio")]["high"] == pytest.approx(high, rel=1e-8)
    # the area's difference in ratio x M tokens (the unit of the report's curve table): ddk's curve is d - 0.2
    # lower at 1M tokens and d lower at 2M, so the trapezoids differ by (d - 0.2)/2 and (2d - 0.2)/2
    assert by[("ddk", "kd", "area")]["mean"] == pytest.approx(np.mean(-0.2 + 1.5 * d), rel=1e-8)

    agg = aggregate(results, ["a", "b"])
    # area of kd's first seed: (2 + 1.3)/2 + (1.3 + 1.3)/2 = 2.95 per M tokens
    assert agg["kd"]["area"] == pytest.approx(np.mean([(2 + m) / 2 * 1e6 + m * 1e6 for m in (1.30, 1.25, 1.40)]))
    assert agg["ddk"]["curve"][1] == pytest.approx([1e6, np.mean([1.25, 1.20, 1.352]) - 0.2])
    report = format_report(agg, ["a", "b"], {"a": 1.5, "b": 2.5}, "ddk compare x", "note", comps)
    assert "## Paired differences over seeds (95% t-interval)" in report
    assert f"| ddk | kd | mean_ratio | {d.mean():+.4f} | [{low:+.4f}, {high:+.4f}] | 3 | ddk beats kd on the mean |" \
        in report
    assert "| ddk_raw | kd | mean_ratio |" in report and "no difference measurable at 3 seeds |" in report
    assert "too few for a published table" not in report
    assert "## Ratio against student tokens" in report and "| kd | 3 | 1.3167 |" in report
    # the older verdict lines are still there
    assert "smoothing: ddk" in report


def test_report_with_one_seed_says_so():
    results = {"kd": _runs([1.3]), "ddk": _runs([1.0])}
    comps = paired_comparisons(results, ["a", "b"])
    assert {c["claim"] for c in comps} == {"no difference measurable at 1 seed"}
    report = format_report(aggregate(results, ["a", "b"]), ["a", "b"], {"a": 1.5, "b": 2.5}, "c", "n", comps)
    assert "Only 1 seed: too few for a published table" in report and "| n/a |" in report


def test_runs_without_seed_or_curve_pair_by_position():
    results = {"kd": [{"ratio": {"a": 1.3}, "tokens": {"a": 1}}, {"ratio": {"a": 1.4}, "tokens": {"a": 1}}],
               "ddk": [{"ratio": {"a": 1.2}, "tokens": {"a": 1}}, {"ratio": {"a": 1.35}, "tokens": {"a": 1}}]}
    comps = paired_comparisons(results, ["a"])
    assert [c["metric"] for c in comps] == ["mean_ratio", "worst_ratio"]  # no curves: no area
    assert comps[0]["mean"] == pytest.approx(-0.075)
    agg = aggregate(results, ["a"])
    assert "curve" not in agg["kd"]
    assert "Ratio against student tokens" not in format_report(agg, ["a"], {"a": 1.5}, "c", "n", comps)


def test_curve_plot(tmp_path):
    from ddk.experiments.plots import plot_curves

    agg = aggregate({"kd": _runs([1.3, 1.2]), "ddk": _runs([1.1, 1.0])}, ["a", "b"])
    assert plot_curves(agg, tmp_path / "c.png") and (tmp_path / "c.png").stat().st_size > 1000
    assert not plot_curves(aggregate({"kd": [{"ratio": {"a": 1.0}, "tokens": {"a": 1}}]}, ["a"]), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
