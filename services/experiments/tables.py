"""The report tables of ``ddk demo`` and ``ddk compare``: losses and ratios in, rows and Markdown out. Pure.

The ratio of a domain is :func:`ddk.vocab.ratio` (PPL_S / PPL_T); the plots are in ddk.experiments.plots
(compare) and ddk.trainer.metrics (one run).
"""

from __future__ import annotations

import math
import statistics

from ddk.vocab import ratio


# ----------------------------------------------------------------------------- ddk demo

def report_table(teacher: dict, before: dict, after: dict) -> list[dict]:
    """One row per domain: perplexities and student/teacher ratios before and after. Pure."""
    q_before, q_after = ratio(before, teacher), ratio(after, teacher)
    return [{"domain": d, "teacher_ppl": math.exp(teacher[d]),
             "student_ppl_before": math.exp(before[d]), "student_ppl_after": math.exp(after[d]),
             "ratio_before": q_before[d], "ratio_after": q_after[d]} for d in sorted(teacher)]


def format_markdown(rows: list[dict]) -> str:
    head = ("| domain | teacher PPL | student PPL before | student PPL after | ratio before | ratio after |\n"
            "|---|---:|---:|---:|---:|---:|\n")
    body = "".join(f"| {r['domain']} | {r['teacher_ppl']:.2f} | {r['student_ppl_before']:.2f} | "
                   f"{r['student_ppl_after']:.2f} | {r['ratio_before']:.3f} | {r['ratio_after']:.3f} |\n"
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

    ``results[policy]`` is a list (one per seed) of ``{"ratio": {domain: r}, "tokens": {domain: n}}``.
    """
    out = {}
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
    return out


def format_report(agg: dict, domains: list[str], initial: dict[str, float], command: str, note: str) -> str:
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
    return "\n".join(lines) + "\n"


def _versus(agg: dict, a: str, b: str, better: str, worse: str) -> str:
    """``a`` against ``b`` on the mean ratio; differences within the seed spread (or 0.0005) count as none."""
    x, y = agg[a]["mean_ratio"], agg[b]["mean_ratio"]
    noise = max(agg[a]["mean_ratio_spread"], agg[b]["mean_ratio_spread"], 5e-4)
    verdict = "no measurable difference" if abs(x - y) <= noise else better if x < y else worse
    return (f"{a} {x:.4f} vs {b} {y:.4f} mean ratio ({verdict}; "
            "differences within the seed spread or 0.0005 count as none)")
