"""Pure parts of `ddk compare` and `ddk demo`: policy configs, aggregation over seeds, report tables."""

import json
import math

import pytest

from ddk.errors import UsageError
from ddk.experiments.compare import _se_table, policy_overrides
from ddk.experiments.tables import aggregate, format_markdown, format_report, format_weights_history, report_table


def test_policy_overrides_match_the_paper_baselines():
    natural = {"a": 0.75, "b": 0.25}
    assert policy_overrides("cpt", natural, None) == {
        "mixture.policy": "fixed", "mixture.initial_weights": natural, "kd.gamma": 0}
    assert policy_overrides("kd", natural, None) == {"mixture.policy": "fixed", "mixture.initial_weights": natural}
    # the config's own fixed mixture wins over the natural proportions
    assert policy_overrides("kd", natural, {"a": 0.5, "b": 0.5})["mixture.initial_weights"] == {"a": 0.5, "b": 0.5}
    # uniform: 1/N whatever the data's proportions or the config's mixture
    assert policy_overrides("kd_uniform", natural, {"a": 0.9, "b": 0.1}) == {
        "mixture.policy": "fixed", "mixture.initial_weights": {"a": 0.5, "b": 0.5}}
    assert policy_overrides("ddk", natural, None) == {"mixture.policy": "ddk"}
    assert policy_overrides("ddk_raw", natural, None) == {"mixture.policy": "ddk_raw"}
    with pytest.raises(UsageError, match="--policies"):
        policy_overrides("dkd", natural, None)


def test_arms_with_a_divergence():
    """``POLICY+LOSS`` arms: the policy's run with kd.loss set; cpt has no divergence; unknown ones are exit 2."""
    from ddk.errors import UsageError
    from ddk.experiments.tables import comparison_pairs

    natural = {"a": 0.25, "b": 0.75}
    assert policy_overrides("ddk+jsd", natural, None) == {"mixture.policy": "ddk", "kd.loss": "jsd"}
    assert policy_overrides("kd+reverse_kl", natural, None) == {"mixture.policy": "fixed",
                                                                "mixture.initial_weights": natural,
                                                                "kd.loss": "reverse_kl"}
    for bad in ("ddk+nope", "cpt+jsd", "nope+jsd"):
        with pytest.raises(UsageError, match="--policies"):
            policy_overrides(bad, natural, None)
    # steered arms with a divergence pair with the fixed arms and with the steered arms before them
    assert comparison_pairs(["kd", "ddk", "ddk+jsd"]) == [("ddk", "kd"), ("ddk+jsd", "kd"), ("ddk+jsd", "ddk")]


def test_aggregate_means_spreads_and_worst_domain():
    results = {
        "kd": [{"ratio": {"a": 1.2, "b": 2.0}, "tokens": {"a": 30, "b": 10}},
               {"ratio": {"a": 1.4, "b": 1.8}, "tokens": {"a": 34, "b": 6}}],
        "ddk": [{"ratio": {"a": 1.3, "b": 1.5}, "tokens": {"a": 10, "b": 30}}],
    }
    agg = aggregate(results, ["a", "b"])
    assert agg["kd"]["ratio"]["a"]["mean"] == pytest.approx(1.3)
    assert agg["kd"]["ratio"]["a"]["spread"] == pytest.approx(0.1)
    assert agg["kd"]["mean_ratio"] == pytest.approx((1.6 + 1.6) / 2)
    assert agg["kd"]["worst_domain"] == "b" and agg["kd"]["worst_ratio"] == pytest.approx(1.9)
    assert agg["kd"]["tokens"] == {"a": 32, "b": 8}
    assert agg["ddk"]["ratio"]["b"]["spread"] == 0.0 and agg["ddk"]["seeds"] == 1
    report = format_report(agg, ["a", "b"], {"a": 1.5, "b": 2.5}, "ddk compare x", "note")
    assert "| kd |" in report and "| ddk |" in report and "lowest mean ratio: **ddk** (1.400)" in report
    # the most-lagging domain is b (2.5); ddk lowered it by 1.0, kd by 0.6
    assert "(b, initial ratio 2.500): **ddk**" in report


def test_report_verdicts_count_differences_within_the_seed_spread_as_none():
    def runs(*means):  # one policy, one seed per mean, both domains at that ratio
        return [{"ratio": {"a": m, "b": m}, "tokens": {"a": 1, "b": 1}} for m in means]

    agg = aggregate({"ddk": runs(1.10, 1.12), "ddk_raw": runs(1.115), "kd_uniform": runs(1.20, 1.22)}, ["a", "b"])
    report = format_report(agg, ["a", "b"], {"a": 1.5, "b": 1.5}, "ddk compare x", "note")
    # ddk 1.11 +- 0.01 vs ddk_raw 1.115: inside the spread
    assert "smoothing: ddk 1.1100 vs ddk_raw 1.1150 mean ratio (no measurable difference" in report
    # ddk 1.11 vs kd_uniform 1.21 +- 0.01: outside it
    assert "uniform mixture: ddk 1.1100 vs kd_uniform 1.2100 mean ratio (ddk better" in report
    agg = aggregate({"ddk": runs(1.30), "kd_uniform": runs(1.20)}, ["a", "b"])
    assert "(ddk not better" in format_report(agg, ["a", "b"], {"a": 1.5, "b": 1.5}, "c", "n")


def test_scoring_and_steering_sets_share_no_document():
    import numpy as np

    from ddk.data.domains import PackedDomain
    from ddk.data.evalset import evaluation_set

    rng = np.random.default_rng(0)
    val = rng.integers(0, 1000, (200, 9))
    d = PackedDomain("a", val, val)
    steer, score = evaluation_set(d, 40, part="steer"), evaluation_set(d, 40, part="score")
    assert len(steer) == len(score) == 40
    assert not set(steer.docs.tolist()) & set(score.docs.tolist())


def test_se_table_gives_each_run_its_ratio_and_se():
    results = {"ddk": [{"seed": 0, "ratio": {"a": 1.5, "b": 2.0}, "ratio_log_se": {"a": 0.0123}}]}
    table = _se_table(["a", "b"], results)
    assert "| ddk s0 | 1.500 +- 0.012 | 2.000 (n/a) |" in table


def test_demo_report_rows():
    rows = report_table({"a": 1.0}, {"a": 2.0}, {"a": 1.5})
    r = rows[0]
    assert r["teacher_ppl"] == pytest.approx(math.e)
    assert r["ratio_before"] == pytest.approx(math.e) and r["ratio_after"] == pytest.approx(math.exp(0.5))
    assert "| a | 2.72 | 7.39 | 4.48 | 2.718 | 1.649 |" in format_markdown(rows)
    hist = {"versions": [{"version": 0, "step": 0, "weights": {"a": 0.5, "b": 0.5}},
                         {"version": 1, "step": 0, "weights": {"a": 0.25, "b": 0.75}}]}
    assert "| 1 | 0 | 0.250 | 0.750 |" in format_weights_history(hist)


def _acc_results():
    """Two policies, three seeds, task accuracy on add and sort (hand-made summaries)."""
    kd = [{"add": 0.50, "sort": 0.20}, {"add": 0.60, "sort": 0.30}, {"add": 0.55, "sort": 0.10}]
    ddk = [{"add": 0.70, "sort": 0.40}, {"add": 0.80, "sort": 0.40}, {"add": 0.75, "sort": 0.30}]

    def runs(accs):
        return [{"seed": s, "ratio": {"add": 1.2, "sort": 1.5}, "tokens": {"add": 1, "sort": 1}, "accuracy": a}
                for s, a in enumerate(accs)]
    return {"kd": runs(kd), "ddk": runs(ddk)}


def test_compare_task_accuracy_per_domain_mean_worst_and_paired_intervals():
    """Reference by hand: kd's add 0.55 ± 0.05, sort 0.20 ± 0.10; per-seed means 0.35, 0.45, 0.325 -> 0.375 ±
    0.0625; worst domain sort. ddk - kd per seed on the mean: 0.20, 0.15, 0.20 -> mean 0.18333, sd 0.028868,
    t(0.975, 2) = 4.302653, half-width 0.071711 -> [0.11162, 0.25504]: ddk beats kd (higher accuracy is better).
    Worst domain's accuracy per seed: kd 0.2, 0.3, 0.1; ddk 0.4, 0.4, 0.3 -> 0.2, 0.1, 0.2: mean 0.16667, sd
    0.057735, half-width 0.143422 -> [0.02324, 0.31009]."""
    from ddk.experiments.tables import paired_comparisons

    results = _acc_results()
    agg = aggregate(results, ["add", "sort"])
    kd = agg["kd"]
    assert kd["accuracy"]["add"] == {"mean": pytest.approx(0.55), "spread": pytest.approx(0.05)}
    assert kd["accuracy"]["sort"] == {"mean": pytest.approx(0.20), "spread": pytest.approx(0.10)}
    assert kd["mean_accuracy"] == pytest.approx(0.375) and kd["mean_accuracy_spread"] == pytest.approx(0.0625)
    assert kd["worst_accuracy_domain"] == "sort" and kd["worst_accuracy"] == pytest.approx(0.20)
    assert agg["ddk"]["mean_accuracy"] == pytest.approx((0.55 + 0.60 + 0.525) / 3)
    comps = {c["metric"]: c for c in paired_comparisons(results, ["add", "sort"])}
    mean = comps["mean_accuracy"]
    assert (mean["policy"], mean["baseline"], mean["n"]) == ("ddk", "kd", 3)
    assert mean["mean"] == pytest.approx(0.183333, abs=1e-6) and mean["sd"] == pytest.approx(0.028868, abs=1e-6)
    assert mean["low"] == pytest.approx(0.11162, abs=1e-5) and mean["high"] == pytest.approx(0.25504, abs=1e-5)
    assert mean["claim"] == "ddk beats kd on the mean task accuracy" and mean["higher_is_better"]
    worst = comps["worst_accuracy"]
    assert worst["low"] == pytest.approx(0.02324, abs=1e-5) and worst["high"] == pytest.approx(0.31009, abs=1e-5)
    assert worst["claim"] == "ddk beats kd on the worst domain's task accuracy"
    # the ratios are the same in every run: no claim there
    assert comps["mean_ratio"]["claim"] == "no difference measurable at 3 seeds"
    report = format_report(agg, ["add", "sort"], {"add": 1.5, "sort": 2.0}, "ddk compare x", "note",
                           paired_comparisons(results, ["add", "sort"]))
    assert "## Task accuracy per domain" in report
    assert "| kd | 0.550 ± 0.050 | 0.200 ± 0.100 | 0.375 ± 0.062 | sort (0.200) |" in report
    assert "| ddk | kd | mean_accuracy | +0.1833 | [+0.1116, +0.2550] | 3 | ddk beats kd on the mean task accuracy |" \
        in report


def test_compare_without_accuracy_in_every_run_reports_none():
    from ddk.experiments.tables import paired_comparisons

    results = _acc_results()
    del results["kd"][1]["accuracy"]
    agg = aggregate(results, ["add", "sort"])
    assert not any("accuracy" in a for a in agg.values())
    assert not any(c["metric"].endswith("accuracy") for c in paired_comparisons(results, ["add", "sort"]))
    assert "Task accuracy" not in format_report(agg, ["add", "sort"], {"add": 1.5, "sort": 2.0}, "c", "n")


def test_lower_accuracy_loses_the_claim():
    from ddk.experiments.stats import claim, paired_difference

    diff = paired_difference([0.5, 0.4, 0.45], [0.7, 0.65, 0.72])
    assert diff["excludes_zero"] and diff["high"] < 0
    assert claim(diff, "ddk", "kd", "the mean task accuracy", higher_is_better=True) == \
        "kd beats ddk on the mean task accuracy"
    assert claim(diff, "ddk", "kd", "the mean") == "ddk beats kd on the mean"


def test_summary_accuracy_reads_the_runs_task_accuracy(tmp_path):
    from ddk.experiments.compare import summary_accuracy

    p = tmp_path / "summary.json"
    p.write_text(json.dumps({"steps": 3, "task_accuracy": {"add": {"accuracy": 0.75, "correct": 3, "total": 4},
                                                           "sort": 0.5}}))
    assert summary_accuracy(p) == {"accuracy": {"add": 0.75, "sort": 0.5}}
    p.write_text(json.dumps({"steps": 3}))
    assert summary_accuracy(p) == {}
    p.write_text(json.dumps({"task_accuracy": {"add": 1.5}}))
    assert summary_accuracy(p) == {}  # not an accuracy: a warning, and no accuracy for this run
    assert summary_accuracy(tmp_path / "absent.json") == {}
