"""A small conversation domain made from the quick kit, for on-policy runs (``kd.on_policy``): the kit's student
copied with a chat template, a ``qa`` domain of 40 two-turn conversations (3 for validation) beside the kit's
``code`` domain (plain text), and a data.yaml naming both. Used by tests/loop/test_onpolicy_faults.py (the same
shape as tests/unit/test_onpolicy.py's ``chat_run_setup``) and, with ``code=False`` (a second conversation domain,
``echo``, instead of ``code``: every row of every step is a rollout), by the chaos harness's ``--on-policy``
schedule.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                 "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}")
QUESTIONS = ["def add(a, b):", "what is two plus three", "name a prime", "sort 3 1 2"]
WORDS = ["return", "import", "class", "value", "print", "while", "lambda"]


def conversation(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"{QUESTIONS[i % 4]} ({i})"},
                         {"role": "assistant", "content": f"answer {i}: {i % 7}"}]}


def echo(i: int) -> dict:
    w = WORDS[i % len(WORDS)]
    return {"messages": [{"role": "user", "content": f"repeat {w} {i % 3 + 1} times"},
                         {"role": "assistant", "content": " ".join([w] * (i % 3 + 1))}]}


def _jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_chat_setup(kit: Path, root: Path, code: bool = True) -> dict[str, str]:
    """Write the student (with its chat template), the conversation files and data.yaml under ``root``; the
    overrides a train config needs to use them (``student.model``, ``data.file``, ``data.seq_len``,
    ``data.cache_dir``). ``code``: the kit's plain-text ``code`` domain beside ``qa`` (else ``echo``)."""
    import yaml

    root.mkdir(parents=True, exist_ok=True)
    student = root / "student"
    if not student.exists():
        shutil.copytree(kit / "student", student)
    (student / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    qa = {"name": "qa", "files": [_jsonl(root / "qa.jsonl", map(conversation, range(40)))],
          "val_files": [_jsonl(root / "qa-val.jsonl", map(conversation, range(100, 103)))]}
    other = ({"name": "code", "files": [str(kit / "data/code/train.jsonl")],
              "val_files": [str(kit / "data/code/val.jsonl")]} if code else
             {"name": "echo", "files": [_jsonl(root / "echo.jsonl", map(echo, range(40)))],
              "val_files": [_jsonl(root / "echo-val.jsonl", map(echo, range(100, 103)))]})
    (root / "data.yaml").write_text(yaml.safe_dump({"domains": [other, qa]}))
    return {"student.model": str(student), "data.file": str(root / "data.yaml"), "data.seq_len": "32",
            "data.cache_dir": str(root / "cache")}
