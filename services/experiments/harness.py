"""lm-evaluation-harness on a student folder: ``ddk eval --lm-eval TASKS --model DIR [--lm-eval-include DIR]
[--limit N] [--run RUN_DIR] [--json]``.

The benchmarks users already run, through lm-eval's Python API (``lm_eval.simple_evaluate`` with its ``hf`` model:
the folder loaded by transformers, ``trust_remote_code`` off, float32, on the GPU when there is one). lm-eval is an
optional extra (``pip install 'ddk[eval]'``: ``lm-eval[hf]``); without it ``--lm-eval`` is exit 2 saying so.
``TASKS`` is a comma-separated list of lm-eval task (or group) names; ``--lm-eval-include DIR`` adds the task YAML
files of a folder (lm-eval's ``TaskManager(include_path=...)``; lm-eval's own task index is read only when a
task is not in that folder: it takes tens of seconds), e.g. a task over a local JSONL file (``dataset_path: json``
with ``dataset_kwargs.data_files``): then nothing is downloaded. A task whose
``dataset_path`` names a Hugging Face Hub dataset is downloaded by lm-eval (``datasets``), as lm-eval always does.

The scores (:func:`harness_scores`: ``{task: {metric: value, "<metric>_stderr": se}}``, lm-eval's ``metric,filter``
keys with the ``none`` filter shortened to ``metric``) are printed, and with ``--run RUN_DIR`` (a ``ddk train`` output
folder) written into ``RUN_DIR/summary.json`` under ``lm_eval`` and into the exported model card
``RUN_DIR/final/README.md`` as the front matter's ``model-index`` (:func:`model_index`, the Hugging Face
model-card form), replacing what an earlier ``--lm-eval`` wrote for the same tasks.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import yaml

from ddk.errors import UsageError

log = logging.getLogger("ddk.eval")

INSTALL = "pip install 'ddk[eval]' (lm-evaluation-harness with its hf extra)"


def parse_task_names(text: str) -> list[str]:
    names = [t.strip() for t in (text or "").split(",") if t.strip()]
    if not names:
        raise UsageError("--lm-eval: give one or more task names, comma-separated")
    return names


def harness_scores(results: dict) -> dict[str, dict[str, float]]:
    """lm-eval's ``results["results"]`` as ``{task: {metric: value}}`` (pure): ``exact_match,none`` becomes
    ``exact_match``, ``exact_match_stderr,none`` ``exact_match_stderr``, another filter stays ``metric,filter``;
    non-numeric entries (``alias``, ``name``) and NaN/"N/A" values are left out."""
    out: dict[str, dict[str, float]] = {}
    for task, row in results.items():
        scores = {}
        for key, value in row.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                continue
            metric, _, filt = key.partition(",")
            scores[metric if filt == "none" else key] = float(value)
        out[task] = scores
    return out


def model_index(model_name: str, scores: dict[str, dict[str, float]]) -> list[dict]:
    """The Hugging Face model card's ``model-index`` for ``scores`` (pure): one result per task, its metrics
    without the standard errors."""
    results = []
    for task, metrics in scores.items():
        results.append({"task": {"type": "text-generation", "name": task},
                        "dataset": {"name": task, "type": task},
                        "metrics": [{"type": m, "name": m, "value": v} for m, v in metrics.items()
                                    if not m.split(",")[0].endswith("_stderr")],
                        "source": {"name": "lm-evaluation-harness (ddk eval --lm-eval)",
                                   "url": "https://github.com/EleutherAI/lm-evaluation-harness"}})
    return [{"name": model_name, "results": results}]


def with_model_index(card: str, index: list[dict]) -> str:
    """``card`` (Markdown with optional YAML front matter) with ``index``'s results in its ``model-index``: results
    of the same task names replaced, others kept (pure)."""
    from ddk.trainer.card import front_matter

    meta = front_matter(card)
    body = card
    if meta:
        body = card[4:].partition("\n---")[2].lstrip("\n")
    old = meta.get("model-index") or []
    new_tasks = {r["task"]["name"] for r in index[0]["results"]}
    kept = [r for entry in old if isinstance(entry, dict) for r in entry.get("results", [])
            if not (isinstance(r, dict) and r.get("task", {}).get("name") in new_tasks)]
    meta["model-index"] = [{"name": index[0]["name"], "results": kept + index[0]["results"]}]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n" + body


def record(run_dir: Path, scores: dict[str, dict[str, float]]) -> list[str]:
    """Write ``scores`` into ``run_dir/summary.json`` (``lm_eval``) and ``run_dir/final/README.md``
    (``model-index``); the paths written."""
    written = []
    summary_path = run_dir / "summary.json"
    summary: dict[str, Any] = {}
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except ValueError as e:
            raise UsageError(f"--run: {summary_path} is not JSON ({e})") from None
    summary["lm_eval"] = {**(summary.get("lm_eval") or {}), **scores}
    summary_path.write_text(json.dumps(summary, indent=1))
    written.append(str(summary_path))
    card_path = run_dir / "final" / "README.md"
    if card_path.parent.is_dir():
        card = card_path.read_text(encoding="utf-8") if card_path.is_file() else ""
        card_path.write_text(with_model_index(card, model_index(run_dir.name, scores)), encoding="utf-8")
        written.append(str(card_path))
    return written


def run_harness(model_dir: Path, tasks: list[str], include: str | None, limit: int | None,
                batch_size: int) -> dict:
    """``lm_eval.simple_evaluate`` on the model folder: lm-eval's whole result (``results``, ``configs``, ...)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UsageError(f"--lm-eval: lm-evaluation-harness is not installed; {INSTALL}") from None
    import torch

    manager = TaskManager(include_path=include, include_defaults=False) if include else None
    if manager is None or not all(t in manager.all_tasks for t in tasks):  # lm-eval's own tasks too (slower index)
        manager = TaskManager(include_path=include) if include else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" (nor in --lm-eval-include {include})" if include else " (add --lm-eval-include DIR for your own)"
        raise UsageError(f"--lm-eval: unknown task {unknown[0]!r}{where}")
    return lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32", "trust_remote_code": False},
        tasks=tasks, task_manager=manager, limit=limit, batch_size=batch_size, log_samples=False,
        device="cuda" if torch.cuda.is_available() else "cpu")


def main(args) -> int:
    """``ddk eval --lm-eval TASKS --model DIR [--lm-eval-include DIR] [--limit N] [--run DIR] [--json]``."""
    model_dir = Path(args.model).expanduser()
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"--model: no Hugging Face model directory at {model_dir}")
    include = getattr(args, "lm_eval_include", None)
    if include and not Path(include).expanduser().is_dir():
        raise UsageError(f"--lm-eval-include: no such folder: {include}")
    run_dir = Path(args.run).expanduser() if getattr(args, "run", None) else None
    if run_dir is not None and not run_dir.is_dir():
        raise UsageError(f"--run: no such run folder: {run_dir}")
    tasks = parse_task_names(args.lm_eval)
    t0 = time.monotonic()
    log.info("lm-evaluation-harness: %s on %s", ", ".join(tasks), model_dir)
    out = run_harness(model_dir, tasks, str(Path(include).expanduser().resolve()) if include else None,
                      getattr(args, "limit", None), int(getattr(args, "batch_size", None) or 16))
    scores = harness_scores(out.get("results") or {})
    written = record(run_dir, scores) if run_dir is not None else []
    seconds = round(time.monotonic() - t0, 2)
    if args.json:
        print(json.dumps({"model": str(model_dir.resolve()), "tasks": tasks, "limit": getattr(args, "limit", None),
                          "lm_eval": scores, "written": written, "seconds": seconds}, indent=2))
    else:
        for task, metrics in scores.items():
            shown = ", ".join(f"{m} {v:.4f}" for m, v in metrics.items())
            print(f"{task}: {shown}")
        for w in written:
            print(f"written: {w}")
        print(f"lm-evaluation-harness {', '.join(tasks)}; {seconds:.1f} s")
    return 0
