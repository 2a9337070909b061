"""The teacher's ``POST /v1/generate`` for real (``ddk teacher serve`` on the quick kit's teacher, hf engine) and
``ddk eval --tasks --teacher URL``: the service's answers against greedy decoding written here from its definition
(plain transformers, the whole sequence through the model at each step), 4xx bodies naming the field, and the
teacher's accuracy beside the model's, counted by hand."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
import torch
import yaml

from ddk.cli import main as cli_main

pytestmark = pytest.mark.slow

TEMPLATE = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")


def hand_greedy(model, ids: list[int], max_new: int, stops: set[int]) -> list[int]:
    out, seq = [], list(ids)
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            if nxt in stops:
                break
            out.append(nxt)
            seq.append(nxt)
    return out


@pytest.fixture(scope="module")
def teacher(kit):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(kit / "teacher", dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(kit / "teacher"))


def test_generate_answers_are_greedy_decoding(teacher_url, teacher):
    model, tok = teacher
    texts = ["def main(", "The court held that the", "Let n be an integer such", "x"]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    eos = tok.eos_token_id
    r = httpx.post(f"{teacher_url}/v1/generate", json={"input_ids": prompts, "max_new_tokens": 10,
                                                          "stop_ids": [eos]}, timeout=120)
    assert r.status_code == 200, r.text
    seqs = r.json()["sequences"]
    assert [s["ids"] for s in seqs] == [hand_greedy(model, p, 10, {eos}) for p in prompts]
    assert all(s["finish_reason"] == ("length" if len(s["ids"]) == 10 else "stop") for s in seqs)
    # without stop_ids: the model's own eos
    r = httpx.post(f"{teacher_url}/v1/generate", json={"input_ids": prompts[:1], "max_new_tokens": 3}, timeout=60)
    assert r.status_code == 200 and r.json()["sequences"][0]["ids"] == hand_greedy(model, prompts[0], 3, {eos})
    metrics = httpx.get(f"{teacher_url}/metrics").text
    assert 'ddk_teacher_generate_requests_total{status="200"}' in metrics


@pytest.mark.parametrize("body, status, field", [
    ({"input_ids": [[1, 2]]}, 422, "max_new_tokens"),
    ({"input_ids": [[1, 2]], "max_new_tokens": 4, "top_k": 3}, 422, "body"),
    ({"input_ids": [[1, 99999]], "max_new_tokens": 4}, 422, "input_ids[0][1]"),
    ({"input_ids": [[1] * 250], "max_new_tokens": 10}, 413, "input_ids[0]"),
])
def test_generate_bad_bodies_are_4xx_naming_the_field(teacher_url, body, status, field):
    r = httpx.post(f"{teacher_url}/v1/generate", json=body, timeout=30)
    assert r.status_code == status
    assert r.json()["detail"].startswith(field + ":")


def test_eval_tasks_gives_the_teachers_accuracy_beside_the_models(kit, teacher_url, teacher, tmp_path, capsys):
    """The model is the teacher itself (a copy whose tokenizer has a chat template: same vocabulary, same
    fingerprint), so both accuracies are the hand count: references of rows 0 and 2 are the greedy answers to the
    prompts rendered by hand, rows 1 and 3 are wrong: 2/4 each."""
    model, tok = teacher
    shutil.copytree(kit / "teacher", tmp_path / "model")
    cfg_path = tmp_path / "model" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = TEMPLATE
    cfg_path.write_text(json.dumps(cfg))
    questions = ["def add(a, b):", "The parties agree that", "import numpy as", "The theorem states"]
    refs = []
    for q in questions:
        ids = tok(f"user: {q}\nassistant:", add_special_tokens=False)["input_ids"]  # the template, by hand
        refs.append(tok.decode(hand_greedy(model, ids, 8, {tok.eos_token_id}), skip_special_tokens=True))
    refs[1], refs[3] = "not the answer", "nor this"
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "-"}], "answer": a}
            for q, a in zip(questions, refs)]
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"domains": [
        {"name": "qa", "files": ["val.jsonl"], "val_files": ["val.jsonl"], "task": "exact"}]}))
    argv = ["eval", "--tasks", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data.yaml"),
            "--teacher", teacher_url, "--max-new-tokens", "8", "--json"]
    assert cli_main(argv) == 0
    row = json.loads(capsys.readouterr().out)["domains"]["qa"]
    assert (row["correct"], row["total"], row["teacher_correct"], row["teacher_total"]) == (2, 4, 2, 4)
    assert row["accuracy"] == row["teacher_accuracy"] == 0.5
    # --route to a domain that is not a task domain: exit 2 naming the flag
    assert cli_main(argv[:-1] + ["--route", f"nope={teacher_url}"]) == 2
    assert "--route" in capsys.readouterr().err
