"""Conversations (ddk.data.chat, ddk.data.chat_files): the masks of three chat templates checked against a reference
built by hand from the rendered string (the assistant contents' character spans, found in the text, mapped to tokens
by the tokenizer's offsets, plus the end-of-turn token right after each), the bad rows (file, line, field), the
left truncation and drop counts, and the next-token targets."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from ddk.data.chat import (IGNORE_INDEX, ChatRowError, ChatTemplateError, Conversation, FitStats, Tokenised,
                           conversations, fit_length, prepare_conversations, tokenise_conversation)
from ddk.data.chat_files import read_conversations, read_rows
from ddk.errors import UsageError


# a small template written for this test: no generation prompt, no special header tokens, EOS ends a reply and a
# newline (not a label) follows it
SMALL = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
         "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}")
# SmolLM2-Instruct's ChatML (its default system turn included)
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
          "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama-3's layout: BOS, header tokens, a blank line, the trimmed content, <|eot_id|>
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
          " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# (template, the text before an assistant's content, the end-of-turn text after it)
TEMPLATES = {
    "small": (SMALL, "assistant: ", "</s>"),
    "chatml": (CHATML, "<|im_start|>assistant\n", "<|im_end|>"),
    "llama3": (LLAMA3, "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
}

CONVS = [
    [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Reverse the word cat."},
     {"role": "assistant", "content": "tac"}, {"role": "user", "content": "And dog, please?"},
     {"role": "assistant", "content": "god it is. The assistant: said so"}],
    [{"role": "user", "content": "Sort 9 3 7"}, {"role": "assistant", "content": "3 7 9\nDone."},
     {"role": "user", "content": "thanks"}],
]


@pytest.fixture(scope="module")
def tok(kit):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(kit / "student"))
    t.add_tokens(["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                 special_tokens=True)
    return t


def reference_mask(tokenizer, text: str, messages: list[dict], trained: list[int], head: str, eot: str) -> list[bool]:
    """By hand: each trained assistant content located in the rendered text after its header, the tokens whose
    character span overlaps it, and the one token whose span is exactly the end-of-turn text right after it."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    mask = [False] * len(offsets)
    cursor = 0
    for i in trained:
        content = messages[i]["content"]
        at = text.index(head + content + eot, cursor)
        c0 = at + len(head)
        c1 = c0 + len(content)
        cursor = c1 + len(eot)
        hits = [j for j, (a, b) in enumerate(offsets) if a < c1 and b > c0]
        eots = [j for j, (a, b) in enumerate(offsets) if (a, b) == (c1, c1 + len(eot))]
        assert hits and len(eots) == 1, "the reference could not find the content or the end-of-turn token"
        assert tokenizer.convert_ids_to_tokens(enc["input_ids"][eots[0]]) == eot
        for j in hits + eots:
            mask[j] = True
    return mask


def check_template(tokenizer, template: str, head: str, eot: str) -> None:
    tokenizer.chat_template = template
    for msgs in CONVS:
        trained = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
        got = tokenise_conversation(tokenizer, msgs)
        assert got.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
        want = reference_mask(tokenizer, text, msgs, trained, head, eot)
        assert got.assistant_mask == want, (
            [tokenizer.decode([t]) for t, m in zip(got.input_ids, got.assistant_mask) if m],
            [tokenizer.decode([t]) for t, m in zip(got.input_ids, want) if m])


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_masks_match_the_hand_reference(tok, name):
    template, head, eot = TEMPLATES[name]
    check_template(tok, template, head, eot)


@pytest.mark.slow
def test_masks_on_the_real_kits_tokenizer_chatml(real_kit):
    from transformers import AutoTokenizer

    check_template(AutoTokenizer.from_pretrained(str(real_kit / "teacher")), CHATML, "<|im_start|>assistant\n",
                   "<|im_end|>")


class NoOffsets:
    """The quick kit's tokenizer without character offsets (as a slow tokenizer): the token-prefix path."""

    def __init__(self, tok):
        self._tok = tok
        self.chat_template = tok.chat_template
        self.name_or_path = tok.name_or_path
        self.all_special_ids = tok.all_special_ids
        self.added_tokens_decoder = tok.added_tokens_decoder

    def apply_chat_template(self, *a, **k):
        return self._tok.apply_chat_template(*a, **k)

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        if return_offsets_mapping:
            raise NotImplementedError("no offsets")
        return self._tok(text, add_special_tokens=add_special_tokens)


@pytest.mark.parametrize("name", ["small", "chatml"])
def test_masks_without_offsets_compare_token_prefixes(tok, name):
    template, head, eot = TEMPLATES[name]
    tok.chat_template = template
    plain = NoOffsets(tok)
    for msgs in CONVS:
        text = tok.apply_chat_template(msgs, tokenize=False)
        trained = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        assert tokenise_conversation(plain, msgs).assistant_mask == reference_mask(tok, text, msgs, trained, head, eot)


def test_prompt_completion_trains_the_completion_only(tok, tmp_path):
    tok.chat_template = CHATML
    shot = [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"},
            {"role": "user", "content": "2 + 2?"}]
    rows = [(1, {"prompt": shot, "completion": "4"}), (2, {"prompt": "Say hi", "completion": [
        {"role": "assistant", "content": "hi"}]})]
    convs = list(conversations(rows, "f.jsonl"))
    assert convs[0].trained == (3,) and convs[1].trained == (1,)
    assert convs[1].messages == ({"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"})
    t = tokenise_conversation(tok, convs[0])
    text = tok.apply_chat_template(list(convs[0].messages), tokenize=False)
    assert t.assistant_mask == reference_mask(tok, text, list(convs[0].messages), [3], "<|im_start|>assistant\n",
                                              "<|im_end|>")
    labelled = [tok.decode([i]) for i, m in zip(t.input_ids, t.assistant_mask) if m]
    assert labelled == ["4", "<|im_end|>"]  # not the few-shot answer "2"


def test_no_chat_template_names_the_tokenizer(kit):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(str(kit / "student"))
    assert not plain.chat_template
    with pytest.raises(ChatTemplateError, match=str(kit / "student")):
        tokenise_conversation(plain, CONVS[0])
    assert issubclass(ChatTemplateError, UsageError)


def test_targets_and_fit_length():
    # ids 10..15, labels on 13, 14 (content + end of turn)
    t = Tokenised([10, 11, 12, 13, 14, 15], [False, False, False, True, True, False])
    assert t.targets() == [IGNORE_INDEX, IGNORE_INDEX, 13, 14, IGNORE_INDEX, IGNORE_INDEX]
    st = FitStats()
    assert fit_length(t, 6, "drop", st) is t
    cut = fit_length(t, 4, "truncate_left", st)
    assert cut.input_ids == [12, 13, 14, 15] and cut.assistant_mask == [False, True, True, False]
    assert fit_length(t, 4, "drop", st) is None
    assert fit_length(t, 2, "truncate_left", st) is None  # [14, 15]: label 14 sits at position 0, nothing to predict
    assert (st.conversations, st.kept, st.truncated, st.dropped) == (4, 1, 1, 2)
    assert (st.tokens, st.label_tokens) == (6 + 4, 2 + 2)
    with pytest.raises(ValueError, match="overflow"):
        fit_length(t, 4, "middle")


def test_prepare_counts(tok):
    tok.chat_template = CHATML
    convs = [Conversation(tuple(m), tuple(i for i, x in enumerate(m) if x["role"] == "assistant")) for m in CONVS]
    full = [len(tokenise_conversation(tok, c)) for c in convs]
    seq_len = sorted(full)[1]  # the longest conversation does not fit
    out = prepare_conversations(tok, convs, seq_len, "drop")
    assert out.stats.dropped == sum(n > seq_len for n in full) >= 1
    assert len(out.items) == out.stats.kept == len(convs) - out.stats.dropped
    out = prepare_conversations(tok, convs, seq_len, "truncate_left")
    assert out.stats.truncated + out.stats.dropped == sum(n > seq_len for n in full)
    assert all(len(t) <= seq_len for t in out.items)


# ---------------------------------------------------------------------------------------------------------------
# bad rows: file, line, field

def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


OK = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
BAD = [
    ("mixed", [OK, "", {"prompt": "q", "completion": "a"}], 3, "prompt", "mixes forms"),
    ("neither", [OK, {"text": "plain"}], 2, "messages", "neither"),
    ("neither-first", [{"question": "q"}], 1, "messages", "neither"),
    ("role", [OK, {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}], 2,
     "messages[1].role", "unknown role 'bot'"),
    ("no-assistant", [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}], 1,
     "messages", "no assistant turn"),
    ("completion-missing", [{"prompt": "q"}], 1, "completion", "missing"),
    ("completion-no-assistant", [{"prompt": "q", "completion": [{"role": "user", "content": "x"}]}], 1,
     "completion", "no assistant turn"),
    ("content", [OK, OK, {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}], 3,
     "messages[0].content", "must be a string"),
    ("empty", [{"messages": []}], 1, "messages", "non-empty list"),
    ("both", [{"messages": OK["messages"], "prompt": "q", "completion": "a"}], 1, "prompt", "both"),
    ("json", [OK, "{not json"], 2, "(row)", "not JSON"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_rows_name_file_line_field(tmp_path, case):
    name, lines, line, field, problem = case
    path = write_jsonl(tmp_path / f"{name}.jsonl", lines)
    with pytest.raises(ChatRowError) as err:
        list(read_conversations(path))
    e = err.value
    assert (e.file, e.line, e.field) == (str(path), line, field)
    assert problem in str(e) and str(e).startswith(f"{path}:{line}: field {field!r}: ")
    assert "\n" not in str(e) and isinstance(e, UsageError)


def test_gzip_and_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    gz = tmp_path / "c.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps(OK) + "\n\n" + json.dumps(OK) + "\n")
    assert [c.line for c in read_conversations(gz)] == [1, 3]
    zstandard = pytest.importorskip("zstandard")
    zst = tmp_path / "c.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress((json.dumps(OK) + "\n" + json.dumps({"x": 1}) + "\n").encode()))
    with pytest.raises(ChatRowError) as err:
        list(read_conversations(zst))
    assert (err.value.file, err.value.line, err.value.field) == (str(zst), 2, "messages")
    rows = [{"prompt": "q1", "completion": "a1"}, {"prompt": "q2", "completion": "a2"},
            {"prompt": "q3", "completion": None}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    assert [n for n, _ in read_rows(tmp_path / "c.parquet")] == [1, 2, 3]
    with pytest.raises(ChatRowError) as err:
        list(read_conversations(tmp_path / "c.parquet"))
    assert (err.value.line, err.value.field) == (3, "completion")
    (tmp_path / "c.txt").write_text("hello\n")
    with pytest.raises(UsageError, match="conversations are read from"):
        list(read_rows(tmp_path / "c.txt"))


def test_masks_on_the_chat_kits_tokenizer():
    from ddk.kit.chat import CHAT_TEMPLATE, chat_tokenizer

    check_template(chat_tokenizer(256), CHAT_TEMPLATE, "<|im_start|>assistant\n", "<|im_end|>")


def test_a_template_that_fails_names_the_row(tok, tmp_path):
    # Llama-2-style rule: roles must alternate user/assistant (the template raises)
    tok.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                         "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
                         "{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}")
    path = write_jsonl(tmp_path / "alt.jsonl", [OK, {"messages": [
        {"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    convs = list(read_conversations(path))
    assert tokenise_conversation(tok, convs[0]).n_labels == 2  # "a" and </s>
    with pytest.raises(ChatTemplateError, match=rf"^{path}:2: the chat template of tokenizer .* roles must alternate"):
        tokenise_conversation(tok, convs[1])


def test_an_empty_answer_labels_the_end_of_turn(tok):
    tok.chat_template = CHATML
    t = tokenise_conversation(tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}])
    assert [tok.decode([i]) for i, m in zip(t.input_ids, t.assistant_mask) if m] == ["<|im_end|>"]


def random_conversation(rng) -> list[dict]:
    def text():
        while True:
            s = "".join(rng.choice("ab xy 12 9\n.?:") for _ in range(rng.randint(1, 14))).strip()
            if s:
                return s
    msgs = [{"role": "system", "content": text()}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 3)):
        msgs += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
    return msgs


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_masks_of_random_conversations(tok, name):
    """Seeded random contents (spaces, digits, newlines, punctuation next to the headers) against the reference."""
    import random

    template, head, eot = TEMPLATES[name]
    tok.chat_template = template
    rng = random.Random(27)
    for _ in range(25):
        msgs = random_conversation(rng)
        text = tok.apply_chat_template(msgs, tokenize=False)
        trained = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        assert tokenise_conversation(tok, msgs).assistant_mask == reference_mask(tok, text, msgs, trained, head, eot), msgs
