"""A mixed run in-process: one text domain (the kit's code) and one conversation domain through the Trainer against
the real teacher and controller servers. The loss is finite and the per-domain validation losses of the student
and the teacher count the assistant tokens only: checked against a hand computation with both models run directly
on the validation conversations.

The kit's tokenizer has no chat template; the test's copy of the student gets a plain one (``role: content``, EOS
after an assistant turn). The teacher serves the kit's teacher unchanged: it scores token ids, and the vocabulary
(what the tokenizer check compares) is the same."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from inproc import lines, train

pytestmark = pytest.mark.slow

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
            "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}")
QUESTIONS = ["def add(a, b):", "what is the sum of two and three", "name a prime number", "sort the list 3 1 2",
             "return the first item", "is seven odd", "write a loop", "the court held that"]


def conversation(i: int) -> list[dict]:
    q = QUESTIONS[i % len(QUESTIONS)]
    return [{"role": "user", "content": f"{q} ({i})"}, {"role": "assistant", "content": f"answer {i}: return {i % 7}"}]


VAL = [conversation(100 + i) for i in range(3)]


def hand_loss(model_dir: Path, tokenizer, convs: list[list[dict]]) -> tuple[float, int, int]:
    """Summed next-token CE over the assistant tokens of ``convs`` and their count, from the textbook definition:
    the text is ``role: content`` lines with ``</s>`` after an assistant's content; a token is a label when its
    characters overlap an assistant's content or it is the EOS right after it. Also the tokens in all."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).float().eval()
    eos = tokenizer.eos_token
    total, count, tokens = 0.0, 0, 0
    for conv in convs:
        text, spans = "", []
        for m in conv:
            text += f"{m['role']}: "
            if m["role"] == "assistant":
                spans.append((len(text), len(text) + len(m["content"]) + len(eos)))
                text += m["content"] + eos
            else:
                text += m["content"]
            text += "\n"
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        tokens += len(ids)
        label = [any(a < e and b > s for s, e in spans) for a, b in enc["offset_mapping"]]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids[:-1]])).logits[0].double(), -1)
        for j in range(1, len(ids)):
            if label[j]:
                total -= float(logp[j - 1, ids[j]])
                count += 1
    return total, count, tokens


def test_text_and_conversation_domains_train_and_evaluate_on_assistant_tokens(kit, teacher_url, controller_url,
                                                                              tmp_path):
    from transformers import AutoTokenizer

    student = tmp_path / "student"
    shutil.copytree(kit / "student", student)
    (student / "chat_template.jinja").write_text(TEMPLATE)
    data = tmp_path / "data"
    data.mkdir()
    (data / "qa.jsonl").write_text("".join(json.dumps({"messages": conversation(i), "answer": str(i % 7)}) + "\n"
                                           for i in range(40)))
    (data / "qa-val.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in VAL))
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"domains": [
        {"name": "code", "files": [str(kit / "data/code/train.jsonl")],
         "val_files": [str(kit / "data/code/val.jsonl")]},
        {"name": "qa", "files": [str(data / "qa.jsonl")], "val_files": [str(data / "qa-val.jsonl")],
         "task": {"check": "exact", "field": "answer"}}]}))
    out = tmp_path / "run"
    summary = train(kit, out, "loop-chat", teacher_url, controller_url, f"student.model={student}",
                    f"data.file={tmp_path / 'data.yaml'}", "data.seq_len=64", f"data.cache_dir={tmp_path / 'cache'}",
                    "train.steps=3", "train.batch_size=4", "mixture.interval_steps=3", "checkpoint.every_steps=3")
    assert summary is not None
    records = lines(out)
    steps = [r for r in records if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3] and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    evals = [r for r in records if r["event"] == "eval"]
    last = max(evals, key=lambda r: r["step"])
    assert last["step"] == 3 and set(last["student_loss"]) == {"code", "qa"}

    tok = AutoTokenizer.from_pretrained(str(student))
    s_sum, n, tokens = hand_loss(out / "final", tok, VAL)
    t_sum, _, _ = hand_loss(kit / "teacher", tok, VAL)
    assert 0 < n < tokens / 2  # the assistant tokens, not every token
    assert last["student_loss"]["qa"] == pytest.approx(s_sum / n, rel=1e-4)
    assert last["teacher_loss"]["qa"] == pytest.approx(t_sum / n, rel=1e-3)
