"""The plots of the experiments (``ddk compare``); the plots of one run are in ddk.trainer.metrics.

matplotlib with the Agg backend (files only, no display), imported only when plotting.
"""

from __future__ import annotations

import statistics
from pathlib import Path


def plot_compare(agg: dict, domains: list[str], initial: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = list(agg)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * (len(domains) + 1), 4))
    width = 0.8 / (len(policies) + 1)
    xs = range(len(domains) + 1)
    labels = domains + ["mean"]
    init_vals = [initial[d] for d in domains] + [statistics.fmean(initial.values())]
    ax.bar([x - 0.4 + width / 2 for x in xs], init_vals, width, label="initial", color="#cccccc")
    for i, p in enumerate(policies):
        vals = [agg[p]["ratio"][d]["mean"] for d in domains] + [agg[p]["mean_ratio"]]
        errs = [agg[p]["ratio"][d]["spread"] for d in domains] + [agg[p]["mean_ratio_spread"]]
        ax.bar([x - 0.4 + width * (i + 1.5) for x in xs], vals, width, yerr=errs, label=p, capsize=2)
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("PPL student / PPL teacher")
    ax.set_ylim(bottom=min(0.9, min(init_vals)))
    ax.set_title("Student/teacher perplexity ratio per domain (lower is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
