"""A small conversation domain made from the quick kit, for on-policy runs (``kd.on_policy``): the kit's student
copied with a chat template, a ``qa`` domain of 40 two-turn conversations (3 for validation) beside the kit's
``code`` domain, and a data.yaml naming both. Used by the chaos harness's ``--on-policy`` schedule and by
tests/loop/test_onpolicy_faults.py (the same shape as tests/unit/test_onpolicy.py's ``chat_run_setup``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                 "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}")
QUESTIONS = ["def add(a, b):", "what is two plus three", "name a prime", "sort 3 1 2"]


def conversation(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"{QUESTIONS[i % 4]} ({i})"},
                         {"role": "assistant", "content": f"answer {i}: {i % 7}"}]}


def write_chat_setup(kit: Path, root: Path) -> dict[str, str]:
    """Write the student (with its chat template), the qa files and data.yaml under ``root``; the overrides a
    train config needs to use them (``student.model``, ``data.file``, ``data.seq_len``, ``data.cache_dir``)."""
    import yaml

    root.mkdir(parents=True, exist_ok=True)
    student = root / "student"
    if not student.exists():
        shutil.copytree(kit / "student", student)
    (student / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (root / "qa.jsonl").write_text("".join(json.dumps(conversation(i)) + "\n" for i in range(40)))
    (root / "qa-val.jsonl").write_text("".join(json.dumps(conversation(100 + i)) + "\n" for i in range(3)))
    (root / "data.yaml").write_text(yaml.safe_dump({"domains": [
        {"name": "code", "files": [str(kit / "data/code/train.jsonl")],
         "val_files": [str(kit / "data/code/val.jsonl")]},
        {"name": "qa", "files": [str(root / "qa.jsonl")], "val_files": [str(root / "qa-val.jsonl")]}]}))
    return {"student.model": str(student), "data.file": str(root / "data.yaml"), "data.seq_len": "32",
            "data.cache_dir": str(root / "cache")}
