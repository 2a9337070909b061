"""The report tables of ``ddk demo`` and ``ddk compare``: losses and ratios in, rows and Markdown out. Pure.

The ratio of a domain is :func:`ddk.vocab.ratio` (PPL_S / PPL_T); the plots are in ddk.experiments.plots
(compare) and ddk.trainer.metrics (one run).
"""

from __future__ import annotations

import math
import statistics

from ddk.experiments.stats import claim, mean_curve, paired_difference, trapezoid_area
from ddk.experiments.arms import base_policy, is_variant, steered
from ddk.vocab import ratio


# ----------------------------------------------------------------------------- ddk demo

def report_table(teacher: dict, before: dict, after: dict, se_before: dict | None = None,
                 se_after: dict | None = None) -> list[dict]:
    """One row per domain: perplexities and student/teacher ratios before and after, with the standard error of
    each log-ratio where one is given (``se_*``: domain -> SE of log(PPL_S / PPL_T); None where missing). Pure."""
    q_before, q_after = ratio(before, teacher), ratio(after, teacher)
    return [{"domain": d, "teacher_ppl": math.exp(teacher[d]),
             "student_ppl_before": math.exp(before[d]), "student_ppl_after": math.exp(after[d]),
             "ratio_before": q_before[d], "ratio_after": q_after[d],
             "log_se_before": (se_before or {}).get(d), "log_se_after": (se_after or {}).get(d)}
            for d in sorted(teacher)]


def _ratio_cell(q: float, log_se: float | None) -> str:
    """``q``, and ``+- SE`` of its log when known (compare's tables write it the same way)."""
    return f"{q:.3f}" if log_se is None else f"{q:.3f} +- {log_se:.3f}"


def format_markdown(rows: list[dict]) -> str:
    head = ("| domain | teacher PPL | student PPL before | student PPL after | ratio before | ratio after |\n"
            "|---|---:|---:|---:|---:|---:|\n")
    body = "".join(f"| {r['domain']} | {r['teacher_ppl']:.2f} | {r['student_ppl_before']:.2f} | "
                   f"{r['student_ppl_after']:.2f} | {_ratio_cell(r['ratio_before'], r.get('log_se_before'))} | "
                   f"{_ratio_cell(r['ratio_after'], r.get('log_se_after'))} |\n"
                   for r in rows)
    return head + body


def format_weights_history(history: dict) -> str:
    versions = history.get("versions", [])
    if not versions:
        return ""
    domains = sorted(versions[0]["weights"])
    out = "| version | step | " + " | ".join(domains) + " |\n|---|---:|" + "---:|" * len(domains) + "\n"
    for v in versions:
        step = "" if v["version"] == 0 else v["step"]
        out += f"| {v['version']} | {step} | " + " | ".join(f"{v['weights'][d]:.3f}" for d in domains) + " |\n"
    return out


# ----------------------------------------------------------------------------- ddk compare

def aggregate(results: dict[str, list[dict]], domains: list[str]) -> dict:
    """Per policy: mean and spread over seeds of each domain's ratio, the mean and worst domain, tokens. Pure.

    ``results[policy]`` is a list (one per seed) of ``{"ratio": {domain: r}, "tokens": {domain: n}}``, each
    optionally with its ``"seed"`` and its ``"curve"``: [[student tokens, mean ratio], ...] at each evaluation.
    With curves, a policy also gets ``curve`` (the mean over seeds) and ``area`` (the mean over seeds of each
    curve's trapezoid area, ratio × tokens: lower is better, the policy got there sooner). When every run has an
    ``"accuracy"`` (``{domain: task accuracy}``, :func:`run_accuracy`), a policy also gets ``accuracy`` per domain
    (mean and half-range), ``mean_accuracy`` and the worst domain (``worst_accuracy_domain``, ``worst_accuracy``).
    """
    out = {}
    acc_domains = accuracy_domains(results)
    for policy, runs in results.items():
        per_domain = {}
        for d in domains:
            vals = [r["ratio"][d] for r in runs]
            per_domain[d] = {"mean": statistics.fmean(vals),
                             "spread": (max(vals) - min(vals)) / 2 if len(vals) > 1 else 0.0}
        means = [statistics.fmean(r["ratio"][d] for d in domains) for r in runs]
        worst_domain = max(domains, key=lambda d: per_domain[d]["mean"])
        out[policy] = {"ratio": per_domain,
                       "mean_ratio": statistics.fmean(means),
                       "mean_ratio_spread": (max(means) - min(means)) / 2 if len(means) > 1 else 0.0,
                       "worst_domain": worst_domain, "worst_ratio": per_domain[worst_domain]["mean"],
                       "tokens": {d: statistics.fmean(r["tokens"][d] for r in runs) for d in domains},
                       "seeds": len(runs)}
        curves = [r["curve"] for r in runs if r.get("curve")]
        if curves:
            out[policy]["curve"] = mean_curve(curves)
            out[policy]["area"] = statistics.fmean(trapezoid_area(c) for c in curves)
        if acc_domains:
            out[policy].update(_aggregate_accuracy(runs, acc_domains))
    return out


def run_accuracy(summary: dict) -> dict[str, float] | None:
    """A run's task accuracy per domain from its ``summary.json`` (field ``task_accuracy``: ``{domain: {"accuracy",
    "correct", "total"}}`` as ``ddk eval --tasks --json`` gives them, or ``{domain: accuracy}``); None without it."""
    raw = summary.get("task_accuracy") if isinstance(summary, dict) else None
    if not isinstance(raw, dict) or not raw:
        return None
    out = {}
    for d, v in raw.items():
        acc = v.get("accuracy") if isinstance(v, dict) else v
        if not isinstance(acc, (int, float)) or isinstance(acc, bool) or not 0 <= acc <= 1:
            raise ValueError(f"task_accuracy.{d}: an accuracy in [0, 1], not {acc!r}")
        out[d] = float(acc)
    return out


def accuracy_domains(results: dict[str, list[dict]]) -> list[str]:
    """The domains every run reports a task accuracy for (its ``accuracy``), sorted; [] when a run has none (then
    no policy is compared on accuracy: all the runs or none)."""
    runs = [r for rs in results.values() for r in rs]
    if not runs or not all(r.get("accuracy") for r in runs):
        return []
    return sorted(set.intersection(*(set(r["accuracy"]) for r in runs)))


def _aggregate_accuracy(runs: list[dict], domains: list[str]) -> dict:
    """One policy's task accuracy over seeds: per domain mean and half-range, the mean over domains, the worst
    domain (lowest mean accuracy)."""
    per = {}
    for d in domains:
        vals = [r["accuracy"][d] for r in runs]
        per[d] = {"mean": statistics.fmean(vals), "spread": (max(vals) - min(vals)) / 2 if len(vals) > 1 else 0.0}
    means = [statistics.fmean(r["accuracy"][d] for d in domains) for r in runs]
    worst = min(domains, key=lambda d: per[d]["mean"])
    return {"accuracy": per, "mean_accuracy": statistics.fmean(means),
            "mean_accuracy_spread": (max(means) - min(means)) / 2 if len(means) > 1 else 0.0,
            "worst_accuracy_domain": worst, "worst_accuracy": per[worst]["mean"]}


# the paired metrics of one run: (key, words for a claim, higher is better); area in ratio × M tokens
METRICS = (("mean_ratio", "the mean", False), ("worst_ratio", "the worst domain", False),
           ("area", "the area under the curve", False),
           ("mean_accuracy", "the mean task accuracy", True),
           ("worst_accuracy", "the worst domain's task accuracy", True))


def run_metrics(run: dict, domains: list[str], acc_domains: list[str] | None = None) -> dict[str, float]:
    """One run's numbers that ``compare`` pairs over seeds: mean and worst domain's held-out ratio, the area
    under its ratio-vs-tokens curve (when it has one), in ratio × M tokens as the report's curve table gives it,
    and with ``acc_domains`` the mean and the worst (lowest) task accuracy over them."""
    out = {"mean_ratio": statistics.fmean(run["ratio"][d] for d in domains),
           "worst_ratio": max(run["ratio"][d] for d in domains)}
    if run.get("curve"):
        out["area"] = trapezoid_area(run["curve"]) / 1e6
    if acc_domains and run.get("accuracy"):
        out["mean_accuracy"] = statistics.fmean(run["accuracy"][d] for d in acc_domains)
        out["worst_accuracy"] = min(run["accuracy"][d] for d in acc_domains)
    return out


def comparison_pairs(policies: list[str]) -> list[tuple[str, str]]:
    """(policy, baseline) pairs: each controller-steered arm (ddk.experiments.arms.steered, whatever its divergence
    or modifier) against every fixed-mixture arm, and against every steered arm listed before it; then each
    variant arm (``seqkd``, an ``@onpolicy`` arm: ddk.experiments.arms.is_variant) against ``kd`` and ``ddk`` where
    that pair is not there yet either way round."""
    pairs, steering = [], steered()
    for i, p in enumerate(policies):
        if base_policy(p) not in steering:
            continue
        for j, b in enumerate(policies):
            if b != p and (base_policy(b) not in steering or j < i):
                pairs.append((p, b))
    for p in policies:
        for b in ("kd", "ddk"):
            if is_variant(p) and b in policies and b != p and (p, b) not in pairs and (b, p) not in pairs:
                pairs.append((p, b))
    return pairs


def paired_comparisons(results: dict[str, list[dict]], domains: list[str], level: float = 0.95) -> list[dict]:
    """Per (policy, baseline) pair and metric: the mean paired difference over the seeds both ran (policy minus
    baseline, so negative is better for the policy on ratios, positive on accuracy), its t-interval, and the claim
    it allows. Pure."""
    out = []
    acc = accuracy_domains(results)
    for a, b in comparison_pairs(list(results)):
        by_seed_a = {r.get("seed", i): run_metrics(r, domains, acc) for i, r in enumerate(results[a])}
        by_seed_b = {r.get("seed", i): run_metrics(r, domains, acc) for i, r in enumerate(results[b])}
        seeds = [s for s in by_seed_a if s in by_seed_b]
        if not seeds:
            continue
        for key, words, higher in METRICS:
            if not all(key in by_seed_a[s] and key in by_seed_b[s] for s in seeds):
                continue
            diff = paired_difference([by_seed_a[s][key] for s in seeds], [by_seed_b[s][key] for s in seeds], level)
            out.append({"policy": a, "baseline": b, "metric": key, **diff, "level": level,
                        "higher_is_better": higher, "claim": claim(diff, a, b, words, higher)})
    return out


def format_report(agg: dict, domains: list[str], initial: dict[str, float], command: str, note: str,
                  comparisons: list[dict] | None = None) -> str:
    """The Markdown report; ``comparisons`` (:func:`paired_comparisons`) adds the paired-difference section, and
    policies with a ``curve`` in ``agg`` the ratio-against-tokens one."""
    policies = list(agg)
    lines = ["# ddk compare", "", f"Command: `{command}`", "", note, "",
             "## Student/teacher perplexity ratio per domain (held-out blocks; mean ± half-range over seeds)", "",
             "| policy | " + " | ".join(domains) + " | mean | worst domain |",
             "|---|" + "---:|" * len(domains) + "---:|---|",
             "| initial student | " + " | ".join(f"{initial[d]:.3f}" for d in domains)
             + f" | {statistics.fmean(initial.values()):.3f} | {max(domains, key=lambda d: initial[d])} |"]
    for p in policies:
        a = agg[p]
        cells = [f"{a['ratio'][d]['mean']:.3f} ± {a['ratio'][d]['spread']:.3f}" for d in domains]
        lines.append(f"| {p} | " + " | ".join(cells)
                     + f" | {a['mean_ratio']:.3f} ± {a['mean_ratio_spread']:.3f} | {a['worst_domain']} |")
    lines += ["", "## Student tokens per domain (mean over seeds)", "",
              "| policy | " + " | ".join(domains) + " |", "|---|" + "---:|" * len(domains)]
    for p in policies:
        total = sum(agg[p]["tokens"].values()) or 1
        lines.append(f"| {p} | " + " | ".join(f"{agg[p]['tokens'][d]:.0f} ({agg[p]['tokens'][d] / total:.0%})"
                                               for d in domains) + " |")
    lagging = max(domains, key=lambda d: initial[d])
    best = min(policies, key=lambda p: agg[p]["mean_ratio"])
    lines += ["", "## The paper's claims, as measured here", "",
              f"- lowest mean ratio: **{best}** ({agg[best]['mean_ratio']:.3f})"]
    gains = {p: initial[lagging] - agg[p]["ratio"][lagging]["mean"] for p in policies}
    top = max(gains, key=gains.get)
    lines.append(f"- largest gain on the domain where the student lagged most ({lagging}, initial ratio "
                 f"{initial[lagging]:.3f}): **{top}** (ratio down by {gains[top]:.3f})")
    if "ddk" in agg and "ddk_raw" in agg:
        lines.append("- smoothing: " + _versus(agg, "ddk", "ddk_raw", "smoothing better", "smoothing not better"))
    if "ddk" in agg and "kd_uniform" in agg:
        lines.append("- measured gaps vs a uniform mixture: "
                     + _versus(agg, "ddk", "kd_uniform", "ddk better", "ddk not better"))
    if any("accuracy" in agg[p] for p in policies):
        lines += format_accuracy(agg)
    if comparisons:
        lines += _format_comparisons(comparisons)
    if any("curve" in agg[p] for p in policies):
        lines += _format_curves(agg)
    return "\n".join(lines) + "\n"


def _format_comparisons(comparisons: list[dict]) -> list[str]:
    n = max(c["n"] for c in comparisons)
    level = comparisons[0].get("level", 0.95)
    lines = ["", f"## Paired differences over seeds ({level:.0%} t-interval)", "",
             "Policy minus baseline, per seed (same seed, same initial student, same held-out blocks), then the mean "
             "over seeds; lower ratios are better, so a negative difference favours the policy (task accuracy: "
             "higher is better, a positive difference favours it). A claim is made only when the interval excludes "
             "0."]
    if n < 3:
        lines += ["", f"Only {n} seed{'s' if n != 1 else ''}: too few for a published table (use `--seeds 3` "
                      "or more)."]
    lines += ["", "| policy | baseline | metric | mean difference | interval | seeds | claim |",
              "|---|---|---|---:|---|---:|---|"]
    for c in comparisons:
        interval = "n/a" if c["low"] is None else f"[{c['low']:+.4f}, {c['high']:+.4f}]"
        lines.append(f"| {c['policy']} | {c['baseline']} | {c['metric']} | {c['mean']:+.4f} | {interval} | "
                     f"{c['n']} | {c['claim']} |")
    return lines


def format_accuracy(agg: dict) -> list[str]:
    """Markdown lines: task accuracy per domain of the policies that have it (mean ± half-range over seeds), the
    mean over domains and the worst domain (the lowest). Pure."""
    have = [p for p in agg if "accuracy" in agg[p]]
    domains = list(agg[have[0]]["accuracy"])
    lines = ["", "## Task accuracy per domain (greedy answers, the domain's checker; mean ± half-range over seeds)",
             "", "| policy | " + " | ".join(domains) + " | mean | worst domain |",
             "|---|" + "---:|" * len(domains) + "---:|---|"]
    for p in have:
        a = agg[p]
        cells = [f"{a['accuracy'][d]['mean']:.3f} ± {a['accuracy'][d]['spread']:.3f}" for d in domains]
        lines.append(f"| {p} | " + " | ".join(cells) + f" | {a['mean_accuracy']:.3f} ± "
                     f"{a['mean_accuracy_spread']:.3f} | {a['worst_accuracy_domain']} ({a['worst_accuracy']:.3f}) |")
    return lines


def format_wall(results: dict[str, list[dict]]) -> list[str]:
    """Markdown lines: each arm's wall time per run (``wall_s``: its ``ddk train`` and, where compare timed it, the
    task evaluation), mean and range over seeds, and the 1-minute load average when its run ended. Pure; [] when
    no run was timed."""
    rows = []
    for p, runs in results.items():
        walls = [r["wall_s"] for r in runs if r.get("wall_s") is not None]
        if not walls:
            continue
        loads = [r["load_avg"] for r in runs if r.get("load_avg") is not None]
        load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "n/a"
        rows.append(f"| {p} | {len(walls)} | {statistics.fmean(walls):.0f} | {min(walls):.0f}-{max(walls):.0f} | "
                    f"{load} |")
    if not rows:
        return []
    return ["", "## Wall time per run (seconds; `ddk train` under Ray, with start-up and export)", "",
            "| policy | runs timed | mean | range | load average at the end |", "|---|---:|---:|---|---|"] + rows


def _format_curves(agg: dict) -> list[str]:
    lines = ["", "## Ratio against student tokens", "",
             "The mean ratio over domains at each evaluation (the blocks that steer the mixture), against the student "
             "tokens trained so far (plot: `compare-curve.png`). Area: under that curve by the trapezoid rule, mean "
             "over seeds; lower is better, the policy got there sooner. Per token: the area over the tokens spanned, "
             "the run's average ratio.", "",
             "| policy | evaluations | final mean ratio | area (ratio × M tokens) | per token |",
             "|---|---:|---:|---:|---:|"]
    for p, a in agg.items():
        curve = a.get("curve")
        if not curve:
            continue
        span = curve[-1][0] - curve[0][0]
        per_token = f"{a['area'] / span:.4f}" if span > 0 else "n/a"
        lines.append(f"| {p} | {len(curve)} | {curve[-1][1]:.4f} | {a['area'] / 1e6:.4f} | {per_token} |")
    return lines


def _versus(agg: dict, a: str, b: str, better: str, worse: str) -> str:
    """``a`` against ``b`` on the mean ratio; differences within the seed spread (or 0.0005) count as none."""
    x, y = agg[a]["mean_ratio"], agg[b]["mean_ratio"]
    noise = max(agg[a]["mean_ratio_spread"], agg[b]["mean_ratio_spread"], 5e-4)
    verdict = "no measurable difference" if abs(x - y) <= noise else better if x < y else worse
    return (f"{a} {x:.4f} vs {b} {y:.4f} mean ratio ({verdict}; "
            "differences within the seed spread or 0.0005 count as none)")
