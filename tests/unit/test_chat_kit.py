"""The chat kit's data part (ddk.kit.chat): the generated questions and answers checked by hand-written arithmetic,
uniqueness, the train/validation split, determinism, the character-level tokenizer, the exact checker on
hand-made generations, and (slow) one tiny end-to-end build."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from ddk.kit.chat import (CHAT_DOMAINS, CHAT_TEMPLATE, ChatKitSpec, ChatModelSize, build_chat_kit, chat_tokenizer,
                          check_answers, ensure_chat_kit, generate_domain, make_example)

FACTOR = {("km", "m"): 1000, ("m", "cm"): 100, ("m", "mm"): 1000, ("cm", "mm"): 10, ("dm", "cm"): 10,
          ("t", "kg"): 1000, ("kg", "g"): 1000, ("g", "mg"): 1000, ("l", "ml"): 1000, ("l", "cl"): 100}


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


class Scripted:
    """A stand-in for random.Random that hands out the values a test chose (so the expected answer is known)."""

    def __init__(self, *values):
        self.values = list(values)

    def randrange(self, *_):
        return self.values.pop(0)

    randint = randrange

    def choice(self, seq):
        v = self.values.pop(0)
        assert v in seq
        return v


@pytest.mark.parametrize("domain,values,question,answer", [
    ("add", (47, 85), "What is 47 + 85?", "132"),
    ("add", (10, 90), "What is 10 + 90?", "100"),
    ("sort", (4, 42, 17, 93, 10), "Sort: 42 17 93 10", "10 17 42 93"),
    ("sort", (3, 55, 12, 55), "Sort: 55 12 55", "12 55 55"),
    ("reverse", (6, *"planet"), "Reverse: planet", "tenalp"),
    ("units", (("km", "m", 1000), 37), "Convert 37 km to m.", "37000"),
    ("units", (("cm", "mm", 10), 5), "Convert 5 cm to mm.", "50"),
])
def test_known_examples_by_hand(domain, values, question, answer):
    assert make_example(domain, Scripted(*values)) == (question, answer)


def test_train_and_validation_are_disjoint():
    for d in CHAT_DOMAINS:
        train, val = generate_domain(d, 2000, 200, seed=0)
        tq = {r["messages"][0]["content"] for r in train}
        vq = {r["messages"][0]["content"] for r in val}
        assert len(tq) == 2000 and len(vq) == 200 and not tq & vq
        # each side is the hash's: sha1("seed:question") below 0.2 of the range is validation, by hand here
        for q, is_val in [(q, False) for q in tq] + [(q, True) for q in vq]:
            h = int.from_bytes(hashlib.sha1(f"0:{q}".encode()).digest()[:8], "big")
            assert (h < 0.2 * 2**64) == is_val


def test_tokenizer_round_trips_conversations():
    tok = chat_tokenizer(256)
    msgs = [{"role": "user", "content": "Convert 37 km to m."}, {"role": "assistant", "content": "37000"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<|im_start|>user\nConvert 37 km to m.<|im_end|>\n<|im_start|>assistant\n37000<|im_end|>\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 2
    for s in ["3 7 19 42", "tenalp", "What is 9 + 3?", "  two  spaces ", "a\nb"]:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(s) and tok.decode(ids, skip_special_tokens=True) == s


TINY = ChatKitSpec(seq_len=64, n_train=40, n_val=8, teacher=ChatModelSize(1, 32, 2, 64, 3, batch_blocks=4),
                   student=ChatModelSize(1, 16, 2, 32, 2, batch_blocks=4), max_new_tokens=8, repeat={"add": 2})


def test_tiny_kit_layout_and_reuse(tmp_path, capsys):
    """What ``ddk fixtures --chat`` builds, with tiny sizes (seconds; no accuracy claim): the layout, data.yaml's
    task keys, train.yaml, the models with their generation config, kit.json; a rerun reuses it; the CLI refuses a
    kit of other sizes and other flags beside --chat (exit 2)."""
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from ddk.cli import main as cli_main
    from ddk.data.domains import load_domain_specs
    from ddk.trainer.config import load_config

    out = ensure_chat_kit(tmp_path / "kit", seed=0, spec=TINY)
    assert sorted(p.name for p in out.iterdir()) == ["data", "data.yaml", "kit.json", "student", "teacher",
                                                      "tokenizer", "train.yaml"]
    specs = load_domain_specs(out / "data.yaml")
    assert [s.name for s in specs] == list(CHAT_DOMAINS)
    assert all((s.task.check, s.task.field) == ("exact", "answer") for s in specs)
    train = yaml.safe_load((out / "train.yaml").read_text())
    assert train["student"]["model"] == "student" and train["data"] == {"file": "data.yaml", "seq_len": 64}
    assert train["teacher"]["urls"] == ["http://127.0.0.1:8100"] and train["run_id"] == "ddk-chat"
    cfg = load_config(str(out / "train.yaml"))  # the trainer's own checks: paths exist, sections known
    assert cfg.student.model == str(out / "student") and cfg.data.file == str(out / "data.yaml")
    info = json.loads((out / "kit.json").read_text())
    assert info["kind"] == "chat" and info["packing"]["kept"] == 5 * 40  # add twice
    assert set(info["teacher"]["accuracy"]) == set(info["student"]["accuracy"]) == set(CHAT_DOMAINS)
    im_end = AutoTokenizer.from_pretrained(str(out / "tokenizer")).convert_tokens_to_ids("<|im_end|>")
    for name in ("teacher", "student"):
        assert (out / name / "model.safetensors").exists() and not list((out / name).glob("*.bin"))
        AutoModelForCausalLM.from_pretrained(str(out / name))
        assert AutoTokenizer.from_pretrained(str(out / name)).chat_template == CHAT_TEMPLATE
        assert GenerationConfig.from_pretrained(str(out / name)).eos_token_id == im_end == 4
    stamp = (out / "kit.json").stat().st_mtime_ns
    assert ensure_chat_kit(out, seed=0, spec=TINY) == out and (out / "kit.json").stat().st_mtime_ns == stamp
    assert cli_main(["fixtures", "--chat", "--out", str(out)]) == 2  # the default sizes: not this kit
    assert "other sizes" in capsys.readouterr().err
    assert cli_main(["fixtures", "--chat", "--quick", "--out", str(tmp_path / "other")]) == 2
    assert (out / "kit.json").stat().st_mtime_ns == stamp and not (tmp_path / "other").exists()
