"""metrics.jsonl: written by rank 0 during a run, read by the driver (progress bar, plots, summary).

One JSON object per line, each with an ``event``:

* ``"step"``  after every optimiser step: ``step`` (steps done), ``loss``, ``ce``, ``kl``, ``lr``,
  ``tokens`` (all ranks), ``tokens_per_s``, ``step_s``, ``teacher_wait_s`` (mean over ranks),
  ``version`` and ``weights`` (the mixture this step's batch was drawn with), ``rows`` ({domain: rows
  drawn this step, all ranks}).
* ``"eval"``  at step 0 and every ``interval_steps`` (and the last step): ``step``, ``student_loss``,
  ``teacher_loss``, ``ratio`` (PPL_S / PPL_T per domain, :func:`ddk.vocab.ratio`), and the ``version`` /
  ``weights`` the controller answered (null when it was unreachable; the run then keeps its weights and retries).
* ``"weights"`` when a late retry finally got new weights: ``step``, ``eval_step``, ``version``, ``weights``.
* ``"end"``  once, when the run finished: ``step``, ``version``, ``weights``, ``wall_s``, ``tokens``,
  ``tokens_per_s``, ``teacher_wait_s`` (totals of this attempt).

On resume from a checkpoint at step s, :func:`truncate_metrics` drops what the interrupted attempt
wrote after that checkpoint, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

METRICS = "metrics.jsonl"


class MetricsWriter:
    """Append-only JSON lines, flushed per line (the driver tails the file for its progress bar)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, sort_keys=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_metrics(path: str | Path) -> list[dict]:
    """All complete lines of a metrics file ([] when absent); a torn last line is ignored."""
    p = Path(path)
    if not p.exists():
        return []
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def kept_after_resume(records: Iterable[dict], resume_step: int | None) -> list[dict]:
    """The records an uninterrupted run would have written before resuming at ``resume_step``.

    A checkpoint at step s is taken after step s's update and *before* the evaluation at s, so
    step lines up to s stay and eval/weights/end lines from s on go (they are redone).
    ``resume_step`` None (no checkpoint: starting from scratch) keeps nothing.
    """
    if resume_step is None:
        return []
    kept = []
    for r in records:
        ev, step = r.get("event"), int(r.get("step", 0))
        if ev == "step" and step > resume_step:
            break
        if ev != "step" and step >= resume_step:
            break
        kept.append(r)
    return kept


def truncate_metrics(path: str | Path, resume_step: int | None) -> int:
    """Rewrite the file with :func:`kept_after_resume`; returns the number of lines kept."""
    p = Path(path)
    kept = kept_after_resume(read_metrics(p), resume_step)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, p)
    return len(kept)


def summarize(records: list[dict]) -> dict:
    """The numbers a finished run is judged by: first and last evaluation, final mixture, throughput."""
    evals = [r for r in records if r.get("event") == "eval"]
    steps = [r for r in records if r.get("event") == "step"]
    ends = [r for r in records if r.get("event") == "end"]
    out: dict[str, Any] = {"steps": steps[-1]["step"] if steps else 0}
    if evals:
        first, last = evals[0], evals[-1]
        out["domains"] = {
            d: {"teacher_loss": last["teacher_loss"][d],
                "student_loss_start": first["student_loss"][d],
                "student_loss_end": last["student_loss"][d],
                "ratio_start": first["ratio"][d],
                "ratio_end": last["ratio"][d]}
            for d in last["student_loss"]}
    versioned = [r for r in records if r.get("version") is not None and r.get("weights")]
    if versioned:
        out["version"] = versioned[-1]["version"]
        out["weights"] = versioned[-1]["weights"]
    if steps:
        out["loss_end"] = steps[-1]["loss"]
        out["tokens"] = sum(r["tokens"] for r in steps)
        out["teacher_wait_s"] = sum(r["teacher_wait_s"] for r in steps)
        out["step_s"] = sum(r["step_s"] for r in steps)
        out["tokens_per_s"] = out["tokens"] / out["step_s"] if out["step_s"] > 0 else 0.0
    if ends:
        out["wall_s"] = ends[-1]["wall_s"]
    return out


def format_summary(summary: dict) -> str:
    """A per-domain table (teacher loss, student loss start -> end, PPL ratio start -> end, final weight)."""
    lines = []
    doms = summary.get("domains") or {}
    if doms:
        weights = summary.get("weights") or {}
        head = ["domain", "teacher", "student start", "student end", "ratio start", "ratio end", "weight"]
        rows = [[d, f"{v['teacher_loss']:.4f}", f"{v['student_loss_start']:.4f}", f"{v['student_loss_end']:.4f}",
                 f"{v['ratio_start']:.3f}", f"{v['ratio_end']:.3f}",
                 f"{weights[d]:.3f}" if d in weights else "-"] for d, v in doms.items()]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]

        def fmt(cells):
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

        lines += [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
        lines.append("(losses in nats per token on each domain's validation blocks; ratio = PPL_student / PPL_teacher)")
    if "tokens_per_s" in summary:
        lines.append(f"steps {summary['steps']}, {summary['tokens']} tokens, {summary['tokens_per_s']:.0f} tokens/s "
                     f"(step time), waited {summary['teacher_wait_s']:.1f} s on the teacher; "
                     f"weights version {summary.get('version')}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# the run's two plots (matplotlib, Agg backend, imported only when plotting)


def _series(records: list[dict], event: str, field: str) -> tuple[list[int], dict[str, list[float]]]:
    """(steps, {domain: value}) from the ``event`` lines that carry a per-domain ``field``."""
    steps, series = [], {}
    for r in records:
        if r.get("event") != event or not r.get(field):
            continue
        steps.append(int(r["step"]))
        for d, v in r[field].items():
            series.setdefault(d, []).append(float(v))
    return steps, series


def weight_series(records: list[dict]) -> tuple[list[int], dict[str, list[float]]]:
    """(steps, {domain: weight}) from the step lines: the mixture each step's batch was drawn with."""
    return _series(records, "step", "weights")


def ratio_series(records: list[dict]) -> tuple[list[int], dict[str, list[float]]]:
    """(eval steps, {domain: PPL_S / PPL_T}) from the eval lines."""
    return _series(records, "eval", "ratio")


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
