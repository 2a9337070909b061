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


def plot_curves(agg: dict, path: Path) -> bool:
    """The mean ratio over domains against student tokens, one line per policy with a ``curve`` (mean over
    seeds); returns False (and writes nothing) when no policy has one."""
    with_curves = [p for p in agg if agg[p].get("curve")]
    if not with_curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for p in with_curves:
        xs, ys = zip(*agg[p]["curve"])
        ax.plot([x / 1e6 for x in xs], ys, marker="o", ms=3, label=f"{p} (area {agg[p]['area'] / 1e6:.3g})")
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xlabel("student tokens trained (M)")
    ax.set_ylabel("mean PPL student / PPL teacher")
    ax.set_title("Ratio against student tokens (lower and sooner is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
