"""The model card of an exported student: ``final/README.md`` in the Hugging Face model-card format. Pure.

:func:`model_card` turns a run's config (the plain dict of :func:`ddk.trainer.config.config_to_dict`) and its
``metrics.jsonl`` records into Markdown: YAML front matter (``base_model``, ``datasets`` = the domain names,
``library_name``, ``tags``, ``license`` when known), then the teacher, the config, the mixture history (the
weights of every evaluation) and the per-domain ratios before (the first evaluation) and after (the last).
:func:`license_of` reads the ``license`` of the starting model's own card. No I/O: ``Trainer.export`` reads
the inputs and writes the file.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import yaml

TAGS = ("distillation", "ddk")


def front_matter(text: str | None) -> dict:
    """The YAML front matter of a card as a dict ({} when there is none or it is not a mapping)."""
    if not text or not text.startswith("---\n"):
        return {}
    head, sep, _ = text[4:].partition("\n---")
    if not sep:
        return {}
    try:
        meta = yaml.safe_load(head)
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def license_of(card_text: str | None) -> str | None:
    """The ``license`` of a model card's front matter (None when there is no card, front matter or key)."""
    value = front_matter(card_text).get("license")
    return str(value) if value else None


def _get(d: dict, dotted: str, default: Any = None) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def _num(v: Any, fmt: str = ".4g") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, fmt) if isinstance(v, float) else str(v)


def _table(header: list[str], rows: Iterable[list[str]], right: int = 1) -> str:
    """A Markdown table; columns from ``right`` on are right-aligned (numbers)."""
    align = ["---" if i < right else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def mixture_history(records: list[dict]) -> list[dict]:
    """The weights the run trained with, in step order: one entry per evaluation (``eval`` lines) and per late
    answer to one (``weights`` lines): ``{"step", "version", "weights"}`` (version and weights None while the
    controller was unreachable)."""
    out = []
    for r in records:
        if r.get("event") == "eval":
            out.append({"step": r.get("step"), "version": r.get("version"), "weights": r.get("weights")})
        elif r.get("event") == "weights":
            out.append({"step": r.get("step"), "version": r.get("version"), "weights": r.get("weights"),
                        "eval_step": r.get("eval_step")})
    return out


def model_card(config: dict, records: list[dict], domains: list[str] | None = None, *,
               tokenizer_fingerprint: str | None = None, license: str | None = None,
               world_size: int | None = None) -> str:
    """The Markdown model card of the student a run exported. Pure.

    ``config``: the run's config as a plain dict (``config_to_dict``); ``records``: its ``metrics.jsonl``
    records (the ``eval`` and ``weights`` lines are used); ``domains``: the domain names (default: those of
    the evaluations); ``license``: the starting model's, when known (omitted from the card otherwise);
    ``world_size``: the workers that trained (default ``ray.num_workers``).
    """
    evals = [r for r in records if r.get("event") == "eval"]
    if domains is None:
        domains = sorted({d for r in evals for d in (r.get("student_loss") or {})})
    domains = list(domains)
    history = mixture_history(records)
    return "".join([
        _front_matter(config, domains, license),
        _summary(config, domains),
        _teacher_section(config, evals, domains, tokenizer_fingerprint),
        _config_section(config, world_size),
        _history_section(history, domains),
        _ratio_section(evals, history, domains),
        "## Use\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        "model = AutoModelForCausalLM.from_pretrained(\"path/to/final\")\n"
        "tokenizer = AutoTokenizer.from_pretrained(\"path/to/final\")\n```\n",
    ])


def _front_matter(config: dict, domains: list[str], license: str | None) -> str:
    meta: dict[str, Any] = {}
    base = _get(config, "student.model")
    if base:
        meta["base_model"] = str(base)
    meta["datasets"] = domains
    meta["library_name"] = "transformers"
    meta["tags"] = list(TAGS)
    if license:
        meta["license"] = str(license)
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _summary(config: dict, domains: list[str]) -> str:
    run_id = config.get("run_id") or "ddk-student"
    gamma = _get(config, "kd.gamma")
    what = "continued pre-training (cross-entropy only)" if gamma == 0 else "knowledge distillation (CE + gamma KL)"
    return (f"\n# {run_id}\n\n"
            f"A student trained by `ddk train` with {what} and a {_get(config, 'mixture.policy', 'ddk')} "
            f"domain mixture over {len(domains)} domains ({', '.join(domains)}), starting from "
            f"`{_get(config, 'student.model')}`. The mixture is recomputed every "
            f"{_get(config, 'mixture.interval_steps')} steps from the student/teacher perplexity ratio of each "
            f"domain (DDK: domain-aware knowledge distillation).\n\n")


def _teacher_section(config: dict, evals: list[dict], domains: list[str], fingerprint: str | None) -> str:
    urls = list(_get(config, "teacher.urls", []) or [])
    out = ["## Teacher\n\n", f"- URLs: {', '.join(f'`{u}`' for u in urls) if urls else '(none: no teacher)'}\n"]
    if fingerprint:
        out.append(f"- tokenizer fingerprint: `{fingerprint}` (the teacher's and the student's)\n")
    teacher_loss = next((r.get("teacher_loss") for r in evals if r.get("teacher_loss")), None)
    if teacher_loss:
        out.append("- validation loss per domain (nats per token): "
                   + ", ".join(f"{d} {_num(teacher_loss.get(d), '.4f')}" for d in domains) + "\n")
    out.append("\n")
    return "".join(out)


def _config_section(config: dict, world_size: int | None) -> str:
    batch = _get(config, "train.batch_size")
    workers = world_size or _get(config, "ray.num_workers")
    rows = [
        ("policy", _get(config, "mixture.policy")),
        ("alpha", _get(config, "mixture.alpha")),
        ("interval_steps", _get(config, "mixture.interval_steps")),
        ("kd.loss", _get(config, "kd.loss")),
        ("gamma", _get(config, "kd.gamma")),
        ("temperature", _get(config, "kd.temperature")),
        ("top_k", _get(config, "kd.top_k")),
        ("steps", _get(config, "train.steps")),
        ("batch size", f"{batch} sequences per worker x {workers} workers" if batch and workers else batch),
        ("seq_len", _get(config, "data.seq_len")),
        ("lr", _get(config, "train.lr")),
        ("warmup_steps", _get(config, "train.warmup_steps")),
        ("weight_decay", _get(config, "train.weight_decay")),
        ("seed", config.get("seed")),
    ]
    return ("## Training config\n\n" + _table(["key", "value"], ([k, _num(v)] for k, v in rows if v is not None),
                                               right=2) + "\n")


def _history_section(history: list[dict], domains: list[str]) -> str:
    if not history:
        return "## Mixture history\n\nNo evaluation was recorded.\n\n"
    table_rows = []
    for h in history:
        w = h.get("weights") or {}
        step = _num(h.get("step"))
        if "eval_step" in h:
            step += f" (late answer to step {h['eval_step']})"
        table_rows.append([step, _num(h.get("version"))] + [_num(w.get(d), ".3f") if w else "-" for d in domains])
    return ("## Mixture history\n\nThe domain weights the controller answered at each evaluation (the mixture "
            "of the steps that follow).\n\n" + _table(["step", "version", *domains], table_rows) + "\n")


def _ratio_section(evals: list[dict], history: list[dict], domains: list[str]) -> str:
    head = "## Student/teacher perplexity ratio per domain\n\n"
    if not evals:
        return head + "No evaluation was recorded.\n\n"
    first, last = evals[0], evals[-1]
    q0, q1 = first.get("ratio") or {}, last.get("ratio") or {}
    w1 = next((h["weights"] for h in reversed(history) if h.get("weights")), {}) or {}
    mean = [sum(q[d] for d in domains if d in q) / max(1, sum(1 for d in domains if d in q)) for q in (q0, q1)]
    return (head + f"ratio = PPL_student / PPL_teacher on each domain's validation blocks, before (step "
            f"{first.get('step')}) and after (step {last.get('step')}); lower is closer to the teacher.\n\n"
            + _table(["domain", "ratio before", "ratio after", "final weight"],
                     ([d, _num(q0.get(d), ".3f"), _num(q1.get(d), ".3f"), _num(w1.get(d), ".3f")] for d in domains))
            + f"\nMean ratio: {mean[0]:.3f} before, {mean[1]:.3f} after.\n\n")
