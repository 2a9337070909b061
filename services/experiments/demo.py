"""``ddk demo [--quick] [--out DIR]``: the whole system, end to end, on the embedded default kit.

1. build (or reuse) the demo kit: corpus, tokenizer, teacher and student (``ddk fixtures``);
2. start the teacher and the controller as child processes on free loopback ports;
3. run a DDK distillation with 2 Ray workers (``ddk train`` on the kit's ``train.yaml``);
4. stop the services (also on Ctrl-C or failure: no orphan processes, no ports left bound);
5. write ``report.md``: teacher, student-before and student-after perplexity per domain, from the run's own first
   and last evaluations (``metrics.jsonl``; the demo does not score the models again).

Outputs in DIR (default ``./ddk-demo``): ``report.md``, ``weights.png``, ``ratios.png``, ``final/`` (the
distilled student, Hugging Face format, with its model card ``final/README.md``), ``metrics.jsonl``, ``logs/``
(``demo.log`` for this process, one log per service and ``train.log``: every line, the console shows less),
``kit/`` (unless ``--kit`` is given).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ddk.errors import UsageError
from ddk.experiments.tables import format_markdown, format_weights_history, report_table

log = logging.getLogger("ddk.demo")

# The run on each kit: quick ends in minutes on 2 cores; the default runs several intervals.
QUICK_RUN = {"train.steps": 60, "mixture.interval_steps": 20, "checkpoint.every_steps": 20}
DEFAULT_RUN = {"train.steps": 600, "mixture.interval_steps": 100, "checkpoint.every_steps": 100}
# the real kit (ddk fixtures --real): a 135M teacher and a pruned student on 2 CPU cores, so a short run
REAL_RUN = {"train.steps": 40, "mixture.interval_steps": 10, "checkpoint.every_steps": 20}


def evaluated_losses(metrics: Path) -> tuple[dict, dict, dict, dict, dict]:
    """(teacher, student before, student after) loss per domain from the run's own evaluations in ``metrics``
    (metrics.jsonl): the first evaluation (step 0, before any training) and the last (the trained student, the
    weights ``final/`` holds); then the standard error of each one's log-ratio per domain (``log_ratio_se``,
    grouped by document; a domain without one is absent). A step evaluated twice (a run started again after a
    kill) counts once, its last record. Pure reading: the demo does not score the models a second time."""
    evals = {}
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "eval":
            evals[record["step"]] = record
    if not evals:
        raise RuntimeError(f"{metrics}: the run wrote no evaluation")
    first, last = evals[min(evals)], evals[max(evals)]
    se = [{d: v for d, v in (r.get("log_ratio_se") or {}).items() if v is not None} for r in (first, last)]
    return first["teacher_loss"], first["student_loss"], last["student_loss"], se[0], se[1]


def run_demo(out: Path, quick: bool, kit: Path | None = None, steps: int | None = None, real: bool = False) -> Path:
    from ddk.logsetup import add_log_file, remove_log_file

    out.mkdir(parents=True, exist_ok=True)
    # the console stays quiet (ddk.logsetup); this process's every line goes to logs/demo.log as well
    log_file = add_log_file(out / "logs" / "demo.log")
    try:
        return _run_demo(out, quick, kit, steps, real)
    finally:
        remove_log_file(log_file)


def _run_demo(out: Path, quick: bool, kit: Path | None, steps: int | None, real: bool = False) -> Path:
    import httpx

    from ddk.kit.fixtures import build_kit
    from ddk.launcher import Services, free_port
    from ddk.trainer.launch import Progress
    from ddk.trainer.metrics import METRICS

    if real and not kit:
        from ddk.kit.real import build_real_kit

        kit = build_real_kit(out / "kit", seed=0)
    kit = Path(kit) if kit else build_kit(out / "kit", quick=quick, seed=0)
    from ddk.trainer.config import load_config

    train_cfg = load_config(str(kit / "train.yaml"))
    seq_len, sequences = train_cfg.data.seq_len, train_cfg.eval.sequences_per_domain
    run = dict(REAL_RUN if real else QUICK_RUN if quick else DEFAULT_RUN)
    if steps:
        run["train.steps"] = steps
    run_id = "ddk-demo-real" if real else "ddk-demo-quick" if quick else "ddk-demo"

    with Services(out / "logs") as services:
        tsvc = services.start("teacher", ["teacher", "serve", "--model", str(kit / "teacher"), "--backend", "auto"],
                              free_port())
        csvc = services.start("controller", ["controller", "serve", "--db", str(out / "controller.sqlite")],
                              free_port())
        csvc.wait_healthy()
        tsvc.wait_healthy()
        teacher_url, controller_url = tsvc.url, csvc.url

        overrides = {"run_id": run_id, "teacher.urls": json.dumps([teacher_url]), "controller.url": controller_url,
                     "output_dir": str(out.resolve()), "ray.num_workers": 2, **run}
        argv = ["train", str(kit / "train.yaml")]
        for k, v in overrides.items():
            argv += ["--set", f"{k}={v}"]
        print(f"ddk demo: distilling for {run['train.steps']} steps (2 Ray workers); log {out / 'logs' / 'train.log'}",
              flush=True)
        progress = Progress(out / METRICS, run["train.steps"])  # the run's bar, from rank 0's metrics.jsonl
        progress.start()
        try:
            train = services.start("train", argv)
            code = train.wait()
        finally:
            progress.stop()  # before anything else prints: the bar ends on its own line
        train.stop()
        if code != 0:
            tail = (out / "logs" / "train.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"ddk train exited with {code}; log tail:\n{tail}")
        history = httpx.get(f"{controller_url}/v1/runs/{run_id}/history", timeout=10).json()

    teacher, before, after, se_before, se_after = evaluated_losses(out / METRICS)
    rows = report_table(teacher, before, after, se_before, se_after)
    table = format_markdown(rows)
    mean_before = sum(r["ratio_before"] for r in rows) / len(rows)
    mean_after = sum(r["ratio_after"] for r in rows) / len(rows)
    report = (f"# ddk demo ({'real' if real else 'quick' if quick else 'default'})\n\n"
              f"Kit: `{kit}`; run `{run_id}`: {run['train.steps']} steps, DDK every "
              f"{run['mixture.interval_steps']} steps, 2 Ray workers.\n"
              f"Validation perplexity per domain ({sequences} sequences of {seq_len} tokens each; a ratio's +- is "
              f"the standard error of log(PPL_S / PPL_T), grouped by document):\n\n{table}\n"
              f"Mean student/teacher ratio: {mean_before:.3f} before, {mean_after:.3f} after.\n\n"
              f"## Domain weights per version (controller history)\n\n{format_weights_history(history)}\n"
              f"Plots: `weights.png` (weights over steps), `ratios.png` (ratio over steps). "
              f"Final student: `final/`.\n")
    (out / "report.md").write_text(report)
    (out / "report.json").write_text(json.dumps({"rows": rows, "history": history}, indent=1))
    print("\n" + table + "(+-: the standard error of log(PPL_S / PPL_T), grouped by document)")
    print(f"mean ratio {mean_before:.3f} -> {mean_after:.3f}")
    print(f"report: {out / 'report.md'}\nplots: {out / 'weights.png'}, {out / 'ratios.png'}\n"
          f"final model: {out / 'final'}")
    return out / "report.md"


def main(args) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {out} exists and is not a directory")
    kit = getattr(args, "kit", None)
    if kit and not (Path(kit) / "kit.json").exists():
        raise UsageError(f"--kit: {kit} is not a finished kit (no kit.json); build one with `ddk fixtures --out {kit}`")
    real = bool(getattr(args, "real", False))
    if real and args.quick:
        raise UsageError("--real and --quick are two different kits: choose one")
    run_demo(out, quick=args.quick, kit=Path(kit) if kit else None, steps=getattr(args, "steps", None), real=real)
    return 0
