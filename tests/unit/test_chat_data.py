"""Conversation domains through the token cache (ddk.data.chat_cache via prepare_domains and ``ddk data prepare``):
the cached rows and loss masks against a reference built by hand from the ChatML text, bad rows (exit 2 naming
file:line and field, nothing cached), a tokenizer without a chat template, a domain mixing forms, truncation and
dropping counted by ``ddk data inspect``, an old-format cache rebuilt, and the evaluation set scoring assistant tokens
only. The tokenizer is the chat kit's (ddk.kit.chat.chat_tokenizer): ChatML, one token per ASCII character."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from ddk.data.cache import prepare_domains
from ddk.data.domains import IGNORE_INDEX, DomainSpec, load_domain_specs

SEQ = 96
CONVS = [
    [{"role": "user", "content": f"add {i} and {i + 1}"}, {"role": "assistant", "content": f"it is {2 * i + 1}"}]
    for i in range(12)
] + [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
      {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
      {"role": "assistant", "content": "ciao"}]]


@pytest.fixture(scope="module")
def tok():
    from ddk.kit.chat import chat_tokenizer

    return chat_tokenizer(256)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("chat-tok")
    tok.save_pretrained(str(d))
    return d


def write_rows(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reference(tok, messages) -> tuple[list[int], list[bool]]:
    """Tokens and labels written by hand from ChatML: ``<|im_start|>ROLE\\nCONTENT<|im_end|>\\n`` per turn; the
    assistant's content and its ``<|im_end|>`` are labels (one token per character of plain text)."""
    ids: list[int] = []
    labels: list[bool] = []

    def text(s: str, label: bool) -> None:
        got = tok(s, add_special_tokens=False)["input_ids"]
        assert len(got) == len(s)  # the chat kit's tokenizer: one token per character
        ids.extend(got)
        labels.extend([label] * len(got))

    def special(name: str, label: bool) -> None:
        ids.append(tok.convert_tokens_to_ids(name))
        labels.append(label)

    for m in messages:
        a = m["role"] == "assistant"
        special("<|im_start|>", False)
        text(m["role"] + "\n", False)
        text(m["content"], a)
        special("<|im_end|>", a)
        text("\n", False)
    return ids, labels


def test_cached_rows_and_masks_match_the_hand_reference(tmp_path, tok):
    f = write_rows(tmp_path / "chat.jsonl", [{"messages": c, "answer": "extra fields are kept out"} for c in CONVS])
    val = write_rows(tmp_path / "val.jsonl", [{"prompt": "say x", "completion": "x"}])
    spec = DomainSpec("chat", [str(f)], val_files=[str(val)])
    d = prepare_domains([spec], tok, SEQ, tmp_path / "cache")["chat"]
    assert d.conversations and d.train.shape == (len(CONVS), SEQ + 1) and d.val.shape == (1, SEQ + 1)
    pad = tok.pad_token_id
    for r, conv in enumerate(CONVS):
        ids, labels = reference(tok, conv)
        n = len(ids)
        assert n <= SEQ + 1
        assert d.train[r, :n].tolist() == ids and (d.train[r, n:] == pad).all()
        assert d.train_mask[r].astype(bool).tolist() == labels + [False] * (SEQ + 1 - n)
        # the targets: token j + 1 where it is a label, else IGNORE_INDEX (padding included)
        want = [ids[j + 1] if labels[j + 1] else IGNORE_INDEX for j in range(n - 1)] + [IGNORE_INDEX] * (SEQ + 1 - n)
        assert d.targets([r]).tolist() == [want]
    ids, labels = reference(tok, [{"role": "user", "content": "say x"}, {"role": "assistant", "content": "x"}])
    assert d.val[0, :len(ids)].tolist() == ids and d.val_mask[0, :len(ids)].astype(bool).tolist() == labels
    info = d.info
    assert info["kind"] == "conversations" and info["train"]["truncated"] == info["train"]["dropped"] == 0
    assert info["train"]["assistant_tokens"] == sum(sum(reference(tok, c)[1]) for c in CONVS)
    again = prepare_domains([spec], tok, SEQ, tmp_path / "cache")["chat"]
    assert again.build is None and np.array_equal(np.asarray(again.train), np.asarray(d.train))


def test_text_and_conversation_domains_in_one_call_and_a_hash_held_out_split(tmp_path, tok):
    f = write_rows(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVS])
    t = write_rows(tmp_path / "text.jsonl", [{"text": f"plain text number {i} " * 4} for i in range(30)])
    got = prepare_domains([DomainSpec("chat", [str(f)], val_fraction=0.2), DomainSpec("text", [str(t)])], tok, SEQ,
                          tmp_path / "cache")
    assert got["chat"].conversations and not got["text"].conversations
    assert got["text"].targets([0]).tolist() == [np.asarray(got["text"].train[0], np.int64)[1:].tolist()]
    chat = got["chat"]
    assert len(chat.train) + len(chat.val) == len(CONVS) and len(chat.val) >= 1
    rows = {tuple(np.asarray(r).tolist()) for r in chat.train} | {tuple(np.asarray(r).tolist()) for r in chat.val}
    assert len(rows) == len(CONVS)  # every conversation once, train and validation disjoint


def test_truncate_left_and_drop_are_counted(tmp_path, tok, tok_dir, capsys):
    from ddk.cli import main

    long = [{"role": "user", "content": "q" * 100}, {"role": "assistant", "content": "the answer"}]
    rows = [{"messages": c} for c in CONVS[:4]] + [{"messages": long}]
    f = write_rows(tmp_path / "d/chat.jsonl", rows)
    v = write_rows(tmp_path / "d/val.jsonl", rows[:2])
    for overflow in ("truncate_left", "drop"):
        (tmp_path / "data.yaml").write_text(yaml.safe_dump({"domains": [
            {"name": "chat", "files": [str(f)], "val_files": [str(v)], "overflow": overflow}]}))
        assert main(["data", "inspect", str(tmp_path / "data.yaml"), "--tokenizer", str(tok_dir), "--seq-len",
                     str(SEQ), "--cache-dir", str(tmp_path / "cache"), "--json"]) == 0
        (row,) = json.loads(capsys.readouterr().out)["domains"]
        train = row["conversations"]["train"]
        assert train["conversations"] == 5 and row["overflow"] == overflow
        assert (train["truncated"], train["dropped"]) == ((1, 0) if overflow == "truncate_left" else (0, 1))
        assert row["train_blocks"] == (5 if overflow == "truncate_left" else 4)
    spec = load_domain_specs(tmp_path / "data.yaml")[0]
    spec.overflow = "truncate_left"
    d = prepare_domains([spec], tok, SEQ, tmp_path / "cache")["chat"]
    ids, labels = reference(tok, long)
    assert d.train[4].tolist() == ids[-(SEQ + 1):]  # its last seq_len + 1 tokens, the answer kept
    assert d.train_mask[4].astype(bool).tolist() == labels[-(SEQ + 1):]
    assert main(["data", "inspect", str(tmp_path / "data.yaml"), "--tokenizer", str(tok_dir), "--seq-len",
                 str(SEQ), "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "conversation domain" in out and "truncated" in out


BAD = [
    ("mixed forms", [{"messages": CONVS[0]}, {"prompt": "a", "completion": "b"}], 2, "prompt", "mixes forms"),
    ("neither form", [{"messages": CONVS[0]}, {"question": "a"}], 2, "messages", "neither"),
    ("unknown role", [{"messages": CONVS[0]}, {"messages": [{"role": "robot", "content": "x"}]}], 2,
     "messages[0].role", "unknown role 'robot'"),
    ("no assistant", [{"messages": CONVS[0]}, {"messages": CONVS[1]},
                      {"messages": [{"role": "user", "content": "x"}]}], 3, "messages", "no assistant turn"),
    ("no completion assistant", [{"prompt": "a", "completion": [{"role": "user", "content": "b"}]}], 1,
     "completion", "no assistant turn"),
]


@pytest.mark.parametrize("case, rows, line, field, problem", BAD, ids=[b[0] for b in BAD])
def test_bad_rows_exit_2_naming_file_line_field_and_cache_nothing(tmp_path, tok_dir, capsys, case, rows, line,
                                                                   field, problem):
    from ddk.cli import main

    f = write_rows(tmp_path / "chat.jsonl", rows)
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"domains": [{"name": "chat", "files": ["chat.jsonl"]}]}))
    cache = tmp_path / "cache"
    assert main(["data", "prepare", str(tmp_path / "data.yaml"), "--tokenizer", str(tok_dir), "--cache-dir",
                 str(cache), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddk: error: ") and len(err.splitlines()) == 1
    assert f"{f}:{line}: field {field!r}: " in err and problem in err, err
    assert not list(cache.rglob("meta.json")) and not [p for p in cache.rglob("*.npy")]


def test_bad_parquet_row_names_its_row(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ddk.errors import UsageError

    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    with pytest.raises(UsageError, match=rf"{tmp_path / 'c.parquet'}:2: field 'completion'"):
        prepare_domains([DomainSpec("c", [str(tmp_path / "c.parquet")])], tok, SEQ, tmp_path / "cache")


def test_no_chat_template_and_files_that_disagree(tmp_path, tok, kit_tokenizer_no_template, capsys):
    from ddk.cli import main
    from ddk.errors import UsageError

    f = write_rows(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVS])
    t = write_rows(tmp_path / "text.jsonl", [{"text": "x y z"}])
    with pytest.raises(UsageError, match="has no chat template"):
        prepare_domains([DomainSpec("c", [str(f)])], kit_tokenizer_no_template, SEQ, tmp_path / "cache")
    with pytest.raises(UsageError, match=rf"domain c: {f} holds conversations but {t} holds text"):
        prepare_domains([DomainSpec("c", [str(f), str(t)])], tok, SEQ, tmp_path / "cache")
    bare = tmp_path / "bare-tokenizer"  # saved without a template: ddk data prepare names it
    kit_tokenizer_no_template.save_pretrained(str(bare))
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"domains": [{"name": "c", "files": ["chat.jsonl"]}]}))
    assert main(["data", "prepare", str(tmp_path / "data.yaml"), "--tokenizer", str(bare), "--cache-dir",
                 str(tmp_path / "cache"), "--quiet"]) == 2
    assert f"tokenizer {bare} has no chat template" in capsys.readouterr().err
    assert not list(tmp_path.rglob("meta.json"))


@pytest.fixture
def kit_tokenizer_no_template(tok):
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = None
    return t


def test_an_old_format_cache_is_rebuilt(tmp_path, tok):
    f = write_rows(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVS])
    spec = DomainSpec("c", [str(f)], val_fraction=0.2)
    first = prepare_domains([spec], tok, SEQ, tmp_path / "cache")["c"]
    assert first.build is not None
    (meta_path,) = (tmp_path / "cache").rglob("meta.json")
    meta = json.loads(meta_path.read_text())
    meta["format"] = 3  # what an older ddk wrote
    meta_path.write_text(json.dumps(meta))
    again = prepare_domains([spec], tok, SEQ, tmp_path / "cache")["c"]
    assert again.build is not None and json.loads(meta_path.read_text())["format"] == 4
    assert np.array_equal(np.asarray(again.train), np.asarray(first.train))


def test_evaluation_set_scores_assistant_tokens_only(tmp_path, tok):
    from ddk.data.evalset import evaluation_set

    f = write_rows(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVS])
    v = write_rows(tmp_path / "val.jsonl", [{"messages": c} for c in CONVS[:3]])
    d = prepare_domains([DomainSpec("c", [str(f)], val_files=[str(v)])], tok, SEQ, tmp_path / "cache")["c"]
    es = evaluation_set(d, sequences=8)
    assert len(es) == 3 and es.documents == 3
    by_row = {int(doc): i for i, doc in enumerate(es.docs)}
    for r, conv in enumerate(CONVS[:3]):
        ids, labels = reference(tok, conv)
        i = by_row[r]
        assert es.blocks[i, :len(ids)].tolist() == ids and es.lengths[i] == len(ids)
        assert es.scored()[i].tolist() == (labels[1:] + [False] * (SEQ + 1 - len(ids)))
    assert es.predictions == sum(sum(reference(tok, c)[1][1:]) for c in CONVS[:3])


def test_feed_batches_carry_assistant_only_labels(tmp_path, tok):
    """The trainer's feed (domain_labels, as Trainer._setup_feed wires it): a conversation row's labels are its
    assistant tokens (hand reference), a text row's every next token; text alone: no labels at all."""
    import torch

    from ddk.trainer.feed import TeacherFeed, domain_labels
    from ddk.trainer.mixture_sync import MixtureSync
    from ddk.trainer.sampler import DomainSampler

    f = write_rows(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVS])
    t = write_rows(tmp_path / "text.jsonl", [{"text": f"plain text number {i} " * 4} for i in range(30)])
    domains = prepare_domains([DomainSpec("chat", [str(f)], val_fraction=0.2), DomainSpec("text", [str(t)])], tok,
                              SEQ, tmp_path / "cache")
    assert domain_labels({"text": domains["text"]}) is None
    sampler = DomainSampler({n: len(d.train) for n, d in domains.items()}, seed=0)
    feed = TeacherFeed(sampler, lambda rows: np.stack([domains[dn].train[i] for dn, i in rows]), batch_size=6,
                       mixture=MixtureSync({"chat": 1.0, "text": 1.0}), labels=domain_labels(domains))
    feed.schedule(0, 2)
    seen = set()
    for step in range(2):
        batch, _ = feed.next(step)
        for r, (dn, i) in enumerate(batch.rows):
            seen.add(dn)
            ids = batch.input_ids[r].tolist()
            if dn == "text":
                assert batch.labels[r].tolist() == ids[1:]
                continue
            mask = domains[dn].train_mask[i].astype(bool)
            want = [ids[j + 1] if mask[j + 1] else IGNORE_INDEX for j in range(SEQ)]
            assert batch.labels[r].tolist() == want and (batch.labels[r] != IGNORE_INDEX).sum() > 0
            assert torch.equal(batch.targets()[r], batch.labels[r])
    assert seen == {"chat", "text"}
