"""Task accuracy of conversation domains: ``ddk eval --tasks --model DIR --data CONFIG [--teacher URL] [--json]``.

A domain is judged when its ``data.yaml`` entry names a ``task:`` (:mod:`ddk.data.tasks`: ``exact`` on the row's
``answer`` by default, a ``regex``, or the user's ``module:function``) and has ``val_files``; other domains (text
domains, domains without a checker or without validation files) are skipped with a note. Its validation prompts are
the rows of its ``val_files`` with the last assistant turn removed (that turn is the answer), rendered with the model
tokenizer's chat template with ``add_generation_prompt=True`` and tokenised without added special tokens (the
template writes them): :func:`ddk.data.tasks.task_prompts` and :func:`~ddk.data.tasks.render_prompt`. The model
answers greedily (:func:`ddk.teacher.generation.greedy_generate`, batched, at most ``--max-new-tokens``), stopped at
the tokenizer's or the model's eos or an end-of-turn token (:func:`ddk.data.tasks.stop_ids`); the answer is decoded
without special tokens and judged by the domain's checker against the row (:func:`ddk.data.tasks.judge`).
Accuracy = correct / total per domain.

The teacher (``--teacher URL``, ``--route DOMAIN=URL``) answers the same prompt ids through the teacher service's
``POST /v1/generate``; its tokenizer must be the model's (the ``tokenizer_fingerprint`` of ``/v1/info``, else exit 2),
since the prompts are the model's token ids and the answers are decoded with the model's tokenizer.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ddk.data.tasks import TaskPrompt, fit_prompt, judge, render_prompt, stop_ids, task_prompts
from ddk.errors import UsageError

log = logging.getLogger("ddk.eval")


@dataclass
class TaskResult:
    """One domain's accuracy: ``correct`` of ``total`` rows; ``answers`` the decoded answers, in row order."""

    correct: int
    total: int
    answers: list[str] = field(default_factory=list)
    truncated: int = 0  # prompts cut from the left to leave room for max_new_tokens

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def evaluate_domain(tokenizer, task, prompts: Sequence[TaskPrompt], generate: Callable[[list[list[int]]], list],
                    room: int | None = None) -> TaskResult:
    """Render, generate (``generate(prompt_ids) -> [(ids, finish_reason)]``), decode and judge one domain."""
    ids, cut = [], 0
    for p in prompts:
        x, was_cut = fit_prompt(render_prompt(tokenizer, p.messages, f"{p.file}:{p.line}"), room)
        ids.append(x)
        cut += was_cut
    outs = generate(ids) if ids else []
    answers = [tokenizer.decode(o[0], skip_special_tokens=True) for o in outs]
    return TaskResult(judge(task, prompts, answers), len(prompts), answers, cut)


def task_domains(specs) -> tuple[list, dict[str, str]]:
    """(the specs judged, {skipped domain: why})."""
    judged, skipped = [], {}
    for s in specs:
        if getattr(s, "task", None) is None:
            skipped[s.name] = "no task: in data.yaml (a text domain or no checker)"
        elif not s.val_files:
            skipped[s.name] = "no val_files to take validation prompts from"
        else:
            judged.append(s)
    return judged, skipped


def result_rows(model: dict[str, TaskResult], teacher: dict[str, TaskResult] | None = None,
                checks: dict[str, str] | None = None) -> dict[str, dict]:
    """``{domain: {accuracy, correct, total[, teacher_accuracy, teacher_correct, teacher_total]}}`` (pure)."""
    out = {}
    for d, r in model.items():
        row: dict[str, Any] = {"accuracy": r.accuracy, "correct": r.correct, "total": r.total}
        if checks and d in checks:
            row["check"] = checks[d]
        if r.truncated:
            row["truncated_prompts"] = r.truncated
        if teacher is not None and d in teacher:
            t = teacher[d]
            row.update(teacher_accuracy=t.accuracy, teacher_correct=t.correct, teacher_total=t.total)
        out[d] = row
    return out


def format_accuracy_table(rows: dict[str, dict]) -> str:
    """The ``ddk eval --tasks`` table (pure): domain, check, rows, model accuracy, and the teacher's beside it."""
    with_teacher = any("teacher_accuracy" in r for r in rows.values())
    head = ["domain", "check", "rows", "correct", "accuracy"] + (["teacher correct", "teacher accuracy"]
                                                                 if with_teacher else [])
    lines = []
    for d, r in rows.items():
        cells = [d, str(r.get("check", "")), str(r["total"]), str(r["correct"]), f"{r['accuracy']:.3f}"]
        if with_teacher:
            cells += ([str(r["teacher_correct"]), f"{r['teacher_accuracy']:.3f}"] if "teacher_accuracy" in r
                      else ["", ""])
        lines.append(cells)
    widths = [max(len(h), *(len(c[j]) for c in lines)) if lines else len(h) for j, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if j < 2 else c.rjust(w)  # noqa: E731
                                  for j, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in lines])


def _teacher_generators(args, domains: list[str], fingerprint: str, stops: list[int], max_new: int) -> dict:
    """``{domain: generate(prompt_ids)}`` through ``/v1/generate`` of ``--teacher`` or the domain's ``--route``;
    each teacher's tokenizer checked against the model's (exit 2 naming the flag)."""
    from ddk.teacher.client import TeacherClient, TeacherUnavailable
    from ddk.teacher.generation import generate_remote

    routes = dict(getattr(args, "route", None) or [])
    unknown = sorted(set(routes) - set(domains))
    if unknown:
        raise UsageError(f"--route: {unknown[0]!r} is not a task domain (task domains: {', '.join(domains)})")
    out = {}
    checked: dict[str, str] = {}
    for d in domains:
        url = routes.get(d) or args.teacher
        if not url:
            continue
        flag = f"--route {d}" if d in routes else "--teacher"
        if url not in checked:
            try:
                with TeacherClient([url], retry_for=30.0) as c:
                    checked[url] = c.info().get("tokenizer_fingerprint")
            except TeacherUnavailable as e:
                raise UsageError(f"{flag}: no teacher answers at {url} ({e})") from None
            if checked[url] != fingerprint:
                raise UsageError(f"{flag}: the teacher at {url} has tokenizer fingerprint {checked[url]}, the "
                                 f"model's is {fingerprint}; /v1/generate takes the model's token ids")
        out[d] = (lambda u: lambda ids: generate_remote(u, ids, max_new, stops))(url)
    return out


def model_accuracy(model_dir: Path, specs: Sequence, max_new: int = 64, batch_size: int = 16,
                   limit: int | None = None, progress: Callable[[str], None] | None = None) -> dict[str, TaskResult]:
    """``{domain: TaskResult}`` of the model folder ``model_dir`` on the validation prompts of the task domains
    ``specs`` (:func:`task_domains`' judged ones): greedy, at most ``max_new`` tokens, batched, on the GPU when
    there is one. ``progress`` gets a line per domain. What ``ddk compare`` writes into each run's summary.json."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ddk.data.chat import require_chat_template
    from ddk.teacher.generation import greedy_generate, model_stop_ids

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    require_chat_template(tokenizer)
    prompts = {s.name: task_prompts(s.val_files, limit) for s in specs}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=False).float().to(device)
    stops = stop_ids(tokenizer, model_stop_ids(model))
    room = prompt_room(model, max_new)
    out: dict[str, TaskResult] = {}
    for s in specs:
        t0 = time.monotonic()
        out[s.name] = evaluate_domain(tokenizer, s.task, prompts[s.name], lambda ids: greedy_generate(
            model, ids, max_new, stops, tokenizer.pad_token_id, batch_size), room)
        if progress:
            progress(f"task {s.name}: {out[s.name].correct}/{out[s.name].total} right "
                     f"({time.monotonic() - t0:.1f} s)")
    return out


def prompt_room(model, max_new: int) -> int | None:
    """How many prompt ids fit beside ``max_new`` new ones in the model's positions (None: no limit known);
    none left is exit 2 naming --max-new-tokens."""
    positions = getattr(model.config, "max_position_embeddings", None)
    room = int(positions) - max_new if positions else None
    if room is not None and room < 1:
        raise UsageError(f"--max-new-tokens: {max_new} leaves no room for a prompt in the model's {positions} "
                         "positions")
    return room


def main(args) -> int:
    """``ddk eval --tasks --model DIR --data CONFIG [--teacher URL] [--route D=URL] [--max-new-tokens N]
    [--limit N] [--batch-size N] [--json]``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ddk.data.chat import require_chat_template
    from ddk.data.domains import load_domain_specs
    from ddk.fingerprint import tokenizer_fingerprint
    from ddk.teacher.client import TeacherRequestError
    from ddk.teacher.generation import greedy_generate, model_stop_ids

    model_dir = Path(args.model).expanduser()
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"--model: no Hugging Face model directory at {model_dir}")
    if not Path(args.data).expanduser().exists():
        raise UsageError(f"--data: no such file or directory: {args.data}")
    max_new = int(getattr(args, "max_new_tokens", None) or 64)
    limit = getattr(args, "limit", None)
    batch_size = int(getattr(args, "batch_size", None) or 16)
    specs, skipped = task_domains(load_domain_specs(args.data))
    if not specs:
        raise UsageError(f"--data {args.data}: no domain names a task: to check answers with "
                         f"({'; '.join(f'{d}: {why}' for d, why in skipped.items())})")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    require_chat_template(tokenizer)
    prompts = {s.name: task_prompts(s.val_files, limit) for s in specs}  # bad rows: exit 2 before any model loads
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=False).float().to(device)
    stops = stop_ids(tokenizer, model_stop_ids(model))
    teachers = (_teacher_generators(args, [s.name for s in specs], tokenizer_fingerprint(tokenizer), stops, max_new)
                if args.teacher or getattr(args, "route", None) else {})
    room = prompt_room(model, max_new)
    t0 = time.monotonic()
    ours: dict[str, TaskResult] = {}
    theirs: dict[str, TaskResult] = {}
    for s in specs:
        log.info("task %s: %d prompts", s.name, len(prompts[s.name]))
        ours[s.name] = evaluate_domain(tokenizer, s.task, prompts[s.name], lambda ids: greedy_generate(
            model, ids, max_new, stops, tokenizer.pad_token_id, batch_size), room)
        log.info("task %s: model %d/%d right", s.name, ours[s.name].correct, ours[s.name].total)
        if s.name in teachers:
            try:
                theirs[s.name] = evaluate_domain(tokenizer, s.task, prompts[s.name], teachers[s.name], room)
            except TeacherRequestError as e:
                raise UsageError(f"--teacher: {e}") from None
            log.info("task %s: teacher %d/%d right", s.name, theirs[s.name].correct, theirs[s.name].total)
    rows = result_rows(ours, theirs if teachers else None, {s.name: s.task.check for s in specs})
    if args.json:
        print(json.dumps({"model": str(model_dir.resolve()), "max_new_tokens": max_new, "limit": limit,
                          "domains": rows, "skipped": skipped, "seconds": round(time.monotonic() - t0, 2)},
                         indent=2))
    else:
        print(format_accuracy_table(rows))
        for d, why in skipped.items():
            print(f"skipped {d}: {why}")
        print(f"greedy, at most {max_new} new tokens; {time.monotonic() - t0:.1f} s")
    return 0
