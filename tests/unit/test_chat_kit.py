"""The chat kit's data part (ddk.kit.chat): the generated questions and answers checked by hand-written arithmetic,
uniqueness, the train/validation split, determinism, the character-level tokenizer, the exact checker on
hand-made generations, and (slow) one tiny end-to-end build."""

from __future__ import annotations

import json
import re

import pytest

from ddk.kit.chat import (CHAT_DOMAINS, CHAT_TEMPLATE, ChatKitSpec, ChatModelSize, build_chat_kit, chat_tokenizer,
                          check_answers, generate_domain)

FACTOR = {("km", "m"): 1000, ("m", "cm"): 100, ("m", "mm"): 1000, ("cm", "mm"): 10, ("kg", "g"): 1000,
          ("l", "ml"): 1000}


def expected(domain: str, q: str) -> str:
    """The answer worked out from the question text alone."""
    if domain == "add":
        a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", q).groups())
        return str(a + b)
    if domain == "sort":
        return " ".join(str(x) for x in sorted(int(t) for t in q.removeprefix("Sort: ").split()))
    if domain == "reverse":
        return "".join(reversed(q.removeprefix("Reverse: ")))
    n, src, dst = re.fullmatch(r"Convert (\d+) (\w+) to (\w+)\.", q).groups()
    return str(int(n) * FACTOR[(src, dst)])


@pytest.mark.parametrize("domain", CHAT_DOMAINS)
def test_generated_rows(domain):
    train, val = generate_domain(domain, 300, 60, seed=7)
    assert (len(train), len(val)) == (300, 60)
    qs = [r["messages"][0]["content"] for r in train + val]
    assert len(set(qs)) == len(qs)  # unique, so no validation question is a training one
    for r in train + val:
        user, asst = r["messages"]
        assert (user["role"], asst["role"]) == ("user", "assistant")
        assert asst["content"] == r["answer"] == expected(domain, user["content"])
    assert generate_domain(domain, 300, 60, seed=7) == (train, val)
    assert generate_domain(domain, 300, 60, seed=8) != (train, val)


def test_tokenizer_is_character_level():
    tok = chat_tokenizer(256)
    text = "What is 482 + 37? Sort: 9 10 tenalp"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok.chat_template == CHAT_TEMPLATE and tok.eos_token == "<|im_end|>" and tok.pad_token_id == 0


def test_check_answers_by_hand():
    rows = [{"answer": "519"}, {"answer": "3 7 19 42"}, {"answer": "tac"}]
    assert check_answers("x", rows, ["519", " 3 7  19 42. ", "cat"]) == (2, 3)


def test_data_only_build(tmp_path):
    info = build_chat_kit(tmp_path / "kit", seed=0, spec=ChatKitSpec(n_train=20, n_val=5), train=False)
    assert info["domains"] == list(CHAT_DOMAINS) and "teacher" not in info
    for d in CHAT_DOMAINS:
        rows = [json.loads(x) for x in (tmp_path / "kit" / "data" / d / "val.jsonl").read_text().splitlines()]
        assert len(rows) == 5
    from ddk.data.domains import load_domain_specs

    assert [s.name for s in load_domain_specs(tmp_path / "kit" / "data.yaml")] == list(CHAT_DOMAINS)
    with pytest.raises(FileExistsError):
        build_chat_kit(tmp_path / "kit", train=False)


@pytest.mark.slow
def test_tiny_build_end_to_end(tmp_path):
    """The training path runs and writes loadable models (tiny sizes: no accuracy claim)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = ChatKitSpec(seq_len=64, n_train=40, n_val=8, teacher=ChatModelSize(1, 32, 2, 64, 3, batch_blocks=4),
                       student=ChatModelSize(1, 16, 2, 32, 2, batch_blocks=4), max_new_tokens=8)
    info = build_chat_kit(tmp_path / "kit", seed=0, spec=spec)
    assert info["packing"]["kept"] == 4 * 40 and set(info["teacher"]["accuracy"]) == set(CHAT_DOMAINS)
    assert json.loads((tmp_path / "kit" / "kit.json").read_text())["seed"] == 0
    for name in ("teacher", "student"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "kit" / name))
        assert AutoTokenizer.from_pretrained(str(tmp_path / "kit" / name)).chat_template == CHAT_TEMPLATE
