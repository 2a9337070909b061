"""The ``seqkd`` arm of ``ddk compare``: SFT on the teacher's own greedy answers (sequence-level KD, Kim & Rush 2016).

Before the runs, the teacher answers every training prompt of the task domains once (each row's conversation up to
its last assistant turn, :func:`ddk.data.tasks.task_prompts`, rendered with the student tokenizer's chat
template; greedy, at most :data:`MAX_NEW_TOKENS` new tokens, through the teacher service's ``POST /v1/generate``).
The rows are written again with the teacher's answer as their last assistant turn into ``OUT/seqkd/data/<domain>/
train.jsonl`` and a ``OUT/seqkd/data.yaml`` that keeps every domain's validation files, task checker and overflow
setting (the scoring sets and the task accuracy are the other arms'); domains without a task keep their own
training files. A row the teacher answers with nothing (its first token a stop id) is left out and counted.

The data is written once per compare out dir and reused by every seed (``OUT/seqkd/manifest.json``, written last,
records the source files, the teacher's model fingerprint and the settings; a different one regenerates it). The
``seqkd`` run is then ``cpt``'s (CE only, the natural mixture) with ``data.file`` set to that data.yaml.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

from ddk.errors import UsageError

log = logging.getLogger("ddk.compare")

MAX_NEW_TOKENS = 64  # as ddk eval --tasks
CHUNK = 512  # prompts between progress lines


def answered_row(row: dict, prompt_messages: list[dict], answer: str) -> dict:
    """The row with its conversation replaced by the prompt turns and the teacher's ``answer`` as the assistant's
    (messages form; the row's other fields, such as the checker's ``answer``, kept). Pure."""
    kept = {k: v for k, v in row.items() if k not in ("messages", "prompt", "completion")}
    return {"messages": [*prompt_messages, {"role": "assistant", "content": answer}], **kept}


def domain_entry(spec, files: Sequence[str]) -> dict:
    """A data.yaml entry for ``spec`` with training ``files`` (absolute paths). Pure."""
    if getattr(spec, "select", None):
        raise UsageError(f"--policies seqkd: domain {spec.name} comes from one file with a domain field; give each "
                         "domain its own files in data.yaml")
    entry: dict = {"name": spec.name, "files": [str(f) for f in files]}
    if spec.val_files:
        entry["val_files"] = [str(f) for f in spec.val_files]
    else:
        entry["val_fraction"] = spec.val_fraction
    if spec.task is not None:
        entry["task"] = {k: v for k, v in asdict(spec.task).items() if v is not None}
    if spec.overflow != "truncate_left":
        entry["overflow"] = spec.overflow
    return entry


def seqkd_data(specs: Sequence, out_dir: Path, tokenizer, generate: Callable[[list[list[int]]], list],
               teacher_id: str, progress: Callable[[str], None] = print) -> Path:
    """``OUT/seqkd/data.yaml``: the task domains' training rows answered by ``generate`` (``prompt ids ->
    [(answer ids, finish_reason)]``, the teacher), written once and reused while the manifest matches."""
    import yaml

    from ddk.data.tasks import render_prompt, task_prompts
    from ddk.experiments.tasks import task_domains

    judged, _ = task_domains(specs)
    if not judged:
        raise UsageError("--policies seqkd: the data config has no domain with a task: and val_files (the teacher "
                         "answers the training prompts of those domains)")
    root = out_dir / "seqkd"
    want = {"source": {s.name: list(s.files) for s in judged}, "teacher": teacher_id,
            "max_new_tokens": MAX_NEW_TOKENS}
    manifest = root / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("key") == want:
        progress(f"seqkd: the teacher's answers in {root} reused")
        return root / "data.yaml"
    counts, entries, names = {}, [], {s.name for s in judged}
    for spec in specs:
        if spec.name not in names:
            entries.append(domain_entry(spec, spec.files))
            continue
        prompts = task_prompts(spec.files)
        ids = [render_prompt(tokenizer, p.messages, f"{p.file}:{p.line}") for p in prompts]
        answers = _answer(spec.name, ids, generate, tokenizer, progress)
        rows = [answered_row(p.row, p.messages, a) for p, a in zip(prompts, answers) if a.strip()]
        path = root / "data" / spec.name / "train.jsonl"
        _write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
        counts[spec.name] = {"rows": len(rows), "empty_answers": len(prompts) - len(rows)}
        entries.append(domain_entry(spec, [path]))
    _write_atomic(root / "data.yaml", yaml.safe_dump({"domains": entries}, sort_keys=False))
    _write_atomic(manifest, json.dumps({"key": want, "domains": counts}, indent=1))
    return root / "data.yaml"


def _answer(name: str, ids: list[list[int]], generate, tokenizer, progress) -> list[str]:
    """The decoded answers to ``ids``, :data:`CHUNK` prompts at a time, with a progress line after each."""
    answers: list[str] = []
    t0 = time.monotonic()
    for a in range(0, len(ids), CHUNK):
        outs = generate(ids[a:a + CHUNK])
        answers += [tokenizer.decode(o[0], skip_special_tokens=True) for o in outs]
        progress(f"seqkd: {name} {len(answers)}/{len(ids)} teacher answers "
                 f"({len(answers) / max(time.monotonic() - t0, 1e-9):.0f}/s)")
    return answers


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def teacher_generator(url: str, tokenizer, max_new: int = MAX_NEW_TOKENS) -> tuple[Callable, str]:
    """``(generate(prompt ids), teacher id)`` for the teacher service at ``url``: its ``/v1/generate``, stopped at the
    student tokenizer's stop ids; exit 2 when its tokenizer is not the student's (the prompts are the student's ids
    and the answers are decoded with its tokenizer)."""
    from ddk.data.tasks import stop_ids
    from ddk.fingerprint import tokenizer_fingerprint
    from ddk.teacher.client import TeacherClient
    from ddk.teacher.generation import generate_remote

    with TeacherClient([url], retry_for=60.0) as c:
        info = c.info()
    if info.get("tokenizer_fingerprint") != tokenizer_fingerprint(tokenizer):
        raise UsageError(f"--policies seqkd: the teacher at {url} has another tokenizer than the student "
                         "(tokenizer_fingerprint of /v1/info); sequence-level KD here needs a shared one")
    stops = stop_ids(tokenizer)
    teacher_id = str(info.get("model_fingerprint") or info.get("model"))
    return (lambda ids: generate_remote(url, ids, max_new, stops)), teacher_id
