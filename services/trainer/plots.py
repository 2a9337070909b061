"""Plots of a run from its metrics.jsonl records: the domain mixture and the student/teacher PPL ratios.

matplotlib with the Agg backend (files only, no display), imported lazily so that importing this module
costs nothing in a worker.
"""

from __future__ import annotations

from pathlib import Path


def weight_series(records: list[dict]) -> tuple[list[int], dict[str, list[float]]]:
    """(steps, {domain: weight}) from the step lines: the mixture each step's batch was drawn with."""
    steps, series = [], {}
    for r in records:
        if r.get("event") != "step" or not r.get("weights"):
            continue
        steps.append(int(r["step"]))
        for d, w in r["weights"].items():
            series.setdefault(d, []).append(float(w))
    return steps, series


def ratio_series(records: list[dict]) -> tuple[list[int], dict[str, list[float]]]:
    """(eval steps, {domain: PPL_S / PPL_T}) from the eval lines."""
    steps, series = [], {}
    for r in records:
        if r.get("event") != "eval" or not r.get("ratio"):
            continue
        steps.append(int(r["step"]))
        for d, q in r["ratio"].items():
            series.setdefault(d, []).append(float(q))
    return steps, series


def _plot(steps, series, path: Path, title: str, ylabel: str, drawstyle: str, hline: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for d in sorted(series):
        ax.plot(steps, series[d], label=d, drawstyle=drawstyle, marker="o" if len(steps) <= 30 else None,
                markersize=3)
    if hline is not None:
        ax.axhline(hline, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_weights(records: list[dict], path: str | Path) -> Path:
    steps, series = weight_series(records)
    return _plot(steps, series, Path(path), "Domain sampling weights", "weight", "steps-post")


def plot_ratios(records: list[dict], path: str | Path) -> Path:
    steps, series = ratio_series(records)
    return _plot(steps, series, Path(path), "Student / teacher validation perplexity", "PPL ratio", "default",
                 hline=1.0)
