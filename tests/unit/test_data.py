"""Data: every file type loads, packing is EOS-separated blocks, validation is held out deterministically,
the token cache is reused and invalidated when it should be, bad input names the domain."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import yaml

from ddk.errors import UsageError
from ddk.trainer import data as data_mod
from ddk.trainer.data import (DomainSpec, PackedDomain, load_domain_specs, natural_proportions,
                                   prepare_domains)

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def make_tokenizer(texts, vocab_size=300):
    """A small byte-level BPE tokenizer with an <eos> token, trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def make_docs(n, seed, prefix):
    rng = random.Random(seed)
    return [f"{prefix} {i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(make_docs(50, 0, "doc"))


def write_jsonl(path, docs, **extra):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d, **extra}) + "\n" for d in docs))
    return path


def interior_docs(blocks, tokenizer):
    """Documents fully inside the token stream of ``blocks`` (between two EOS), decoded."""
    stream = np.asarray(blocks).reshape(-1).tolist()
    eos = tokenizer.eos_token_id
    cuts = [i for i, t in enumerate(stream) if t == eos]
    return [tokenizer.decode(stream[a + 1:b]) for a, b in zip(cuts, cuts[1:])]


# ---- specs ------------------------------------------------------------------------------------------------

def test_data_yaml_dir_and_inline_forms(tmp_path):
    write_jsonl(tmp_path / "data/code/train.jsonl", ["x"])
    write_jsonl(tmp_path / "data/code/val.jsonl", ["y"])
    write_jsonl(tmp_path / "data/prose/train.jsonl", ["z"])
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"domains": [
        {"name": "code", "files": ["data/code/train.jsonl"], "val_files": ["data/code/val.jsonl"]},
        {"name": "prose", "files": ["data/prose/train.jsonl"]}], "val_fraction": 0.1}))
    by_file = load_domain_specs(str(tmp_path / "data.yaml"))
    by_dir = load_domain_specs(tmp_path)                # a directory holding data.yaml
    by_subdirs = load_domain_specs(tmp_path / "data")   # the kit's data/ without a yaml
    assert [s.name for s in by_file] == ["code", "prose"]
    assert by_file == by_dir
    assert by_file[0].files == [str(tmp_path / "data/code/train.jsonl")]
    assert by_file[0].val_files == [str(tmp_path / "data/code/val.jsonl")]
    assert by_file[1].val_files == [] and by_file[1].val_fraction == 0.1
    assert [(s.name, s.files, s.val_files) for s in by_subdirs] == [(s.name, s.files, s.val_files) for s in by_file]
    inline = load_domain_specs([{"name": "code", "files": ["data/code/train.jsonl"]}], base_dir=tmp_path)
    assert inline[0].files == by_file[0].files
    # a train config as --data: its data section
    (tmp_path / "train.yaml").write_text(yaml.safe_dump({"run_id": "r", "data": {"file": "data.yaml"}}))
    assert load_domain_specs(tmp_path / "train.yaml") == by_file


@pytest.mark.parametrize("entry, needle", [
    ({"name": "code", "files": ["missing.jsonl"]}, "domain code: no such file"),
    ({"name": "code", "files": ["notes.csv"]}, "domain code: unknown file type .csv"),
    ({"name": "code", "files": []}, "domain code: no files"),
    ({"name": "code"}, "domain code: no files"),
    ({"files": ["a.jsonl"]}, "needs a 'name'"),
    ({"name": "code", "files": ["a.jsonl"], "bogus": 1}, "domain code: unknown key"),
])
def test_bad_specs_name_the_domain(tmp_path, entry, needle):
    write_jsonl(tmp_path / "a.jsonl", ["x"])
    (tmp_path / "notes.csv").write_text("text\nx\n")
    with pytest.raises(UsageError, match=needle):
        load_domain_specs([entry], base_dir=tmp_path)


def test_missing_data_path(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        load_domain_specs(tmp_path / "nope.yaml")


# ---- file types ---------------------------------------------------------------------------------------------

def test_every_file_type_loads_the_same_documents(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    docs = make_docs(40, 1, "same")
    write_jsonl(tmp_path / "d.jsonl", docs)
    (tmp_path / "d.txt").write_text("\n\n".join(docs) + "\n")   # documents separated by blank lines
    pq.write_table(pa.table({"text": docs, "other": list(range(len(docs)))}), tmp_path / "d.parquet")
    Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "hf"))
    with open(tmp_path / "all.jsonl", "w") as fh:  # single-file form, two domains interleaved
        for i, d in enumerate(docs):
            fh.write(json.dumps({"domain": "same", "text": d}) + "\n")
            fh.write(json.dumps({"domain": "noise", "text": f"noise {i} " + d}) + "\n")

    results = {}
    for name in ("d.jsonl", "d.txt", "d.parquet", "hf"):
        specs = load_domain_specs([{"name": "same", "files": [name]}], base_dir=tmp_path)
        results[name] = prepare_domains(specs, tokenizer, 16, tmp_path / "cache")["same"]
    single = load_domain_specs({"file": "all.jsonl"}, base_dir=tmp_path)
    assert [s.name for s in single] == ["same", "noise"]
    results["single"] = prepare_domains(single, tokenizer, 16, tmp_path / "cache")["same"]

    ref = results["d.jsonl"]
    assert ref.train.shape[1] == 17 and ref.train.dtype == np.int32 and ref.val.shape[1] == 17
    for name, packed in results.items():
        np.testing.assert_array_equal(packed.train, ref.train, err_msg=name)
        np.testing.assert_array_equal(packed.val, ref.val, err_msg=name)


def test_packing_is_documents_joined_by_eos(tmp_path, tokenizer):
    train, val = make_docs(30, 2, "t"), make_docs(10, 3, "v")
    write_jsonl(tmp_path / "t.jsonl", train)
    write_jsonl(tmp_path / "v.jsonl", val)
    specs = load_domain_specs([{"name": "a", "files": ["t.jsonl"], "val_files": ["v.jsonl"]}], base_dir=tmp_path)
    packed = prepare_domains(specs, tokenizer, 8, tmp_path / "cache")["a"]
    stream = []
    for d in train:
        stream += tokenizer.encode(d, add_special_tokens=False) + [tokenizer.eos_token_id]
    n = len(stream) // 9
    assert packed.train.shape == (n, 9)
    assert packed.train.reshape(-1).tolist() == stream[: n * 9]
    assert interior_docs(packed.val, tokenizer) == val[1:len(interior_docs(packed.val, tokenizer)) + 1]


def test_errors_for_bad_records_and_tiny_domains(tmp_path, tokenizer):
    (tmp_path / "bad.jsonl").write_text('{"txt": "oops"}\n')
    write_jsonl(tmp_path / "tiny.jsonl", ["hi"])
    (tmp_path / "empty.jsonl").write_text("\n")
    cases = [("bad.jsonl", "domain a: .*no 'text' field"), ("tiny.jsonl", "domain a: too little"),
             ("empty.jsonl", "domain a: no documents")]
    for f, needle in cases:
        specs = load_domain_specs([{"name": "a", "files": [f]}], base_dir=tmp_path)
        with pytest.raises(UsageError, match=needle):
            prepare_domains(specs, tokenizer, 32, tmp_path / "cache")


# ---- validation hold-out --------------------------------------------------------------------------------------

def test_val_is_disjoint_and_independent_of_file_order(tmp_path, tokenizer):
    docs = make_docs(200, 4, "doc")
    write_jsonl(tmp_path / "a.jsonl", docs)
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    write_jsonl(tmp_path / "b.jsonl", shuffled)
    spec_a = DomainSpec("x", [str(tmp_path / "a.jsonl")], val_fraction=0.1)
    spec_b = DomainSpec("x", [str(tmp_path / "b.jsonl")], val_fraction=0.1)
    a = prepare_domains([spec_a], tokenizer, 16, tmp_path / "cache")["x"]
    b = prepare_domains([spec_b], tokenizer, 16, tmp_path / "cache")["x"]
    val_docs, train_docs = set(interior_docs(a.val, tokenizer)), set(interior_docs(a.train, tokenizer))
    assert len(val_docs) >= 5 and len(train_docs) >= 100
    assert not val_docs & train_docs
    assert set(docs) >= val_docs | train_docs
    np.testing.assert_array_equal(a.val, b.val)  # the same held-out documents, whatever the order
    # roughly val_fraction of the documents are held out
    assert 0.04 < (len(val_docs) + 2) / len(docs) < 0.2


def test_small_domain_still_gets_a_val_block(tmp_path, tokenizer):
    write_jsonl(tmp_path / "s.jsonl", make_docs(12, 5, "s"))
    packed = prepare_domains([DomainSpec("s", [str(tmp_path / "s.jsonl")], val_fraction=0.01)],
                             tokenizer, 16, tmp_path / "cache")["s"]
    assert len(packed.val) >= 1 and len(packed.train) >= 1


# ---- cache ----------------------------------------------------------------------------------------------------

def test_cache_reused_and_invalidated(tmp_path, tokenizer, monkeypatch):
    f = write_jsonl(tmp_path / "a.jsonl", make_docs(60, 6, "a"))
    specs = [DomainSpec("a", [str(f)])]
    cache = tmp_path / "cache"
    calls = []
    real = data_mod._tokenize
    monkeypatch.setattr(data_mod, "_tokenize", lambda *a, **k: calls.append(1) or real(*a, **k))

    first = prepare_domains(specs, tokenizer, 16, cache)["a"]
    assert len(calls) == 1
    second = prepare_domains(specs, tokenizer, 16, cache)["a"]
    assert len(calls) == 1                                   # memory-mapped, not re-tokenised
    assert isinstance(second.train, np.memmap)
    np.testing.assert_array_equal(first.train, second.train)

    prepare_domains(specs, tokenizer, 8, cache)              # seq_len is part of the key
    assert len(calls) == 2
    other = make_tokenizer(make_docs(50, 99, "other"), vocab_size=280)
    prepare_domains(specs, other, 16, cache)                 # a different tokenizer fingerprint
    assert len(calls) == 3
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file changed
    prepare_domains(specs, tokenizer, 16, cache)
    assert len(calls) == 4
    prepare_domains(specs, tokenizer, 16, cache)
    assert len(calls) == 4


def test_unfinished_cache_is_rebuilt(tmp_path, tokenizer):
    f = write_jsonl(tmp_path / "a.jsonl", make_docs(60, 7, "a"))
    specs = [DomainSpec("a", [str(f)])]
    cache = tmp_path / "cache"
    good = np.array(prepare_domains(specs, tokenizer, 16, cache)["a"].train)
    (entry,) = cache.iterdir()
    (entry / "meta.json").unlink()                            # as if a writer died before finishing
    (entry / "train.npy").write_bytes(b"garbage")
    np.testing.assert_array_equal(prepare_domains(specs, tokenizer, 16, cache)["a"].train, good)
    assert not [p for p in entry.iterdir() if p.name.endswith(".tmp")]


def test_natural_proportions():
    z = lambda n: np.zeros((n, 5), dtype=np.int32)  # noqa: E731
    domains = {"a": PackedDomain("a", z(30), z(1)), "b": PackedDomain("b", z(10), z(1))}
    assert natural_proportions(domains) == pytest.approx({"a": 0.75, "b": 0.25})


def test_two_preparers_at_once_both_succeed(tmp_path, tokenizer, monkeypatch):
    """Two workers preparing the same cache concurrently: both tokenise (held at a barrier so they overlap),
    both write, both end up with complete, identical arrays."""
    import threading

    f = write_jsonl(tmp_path / "a.jsonl", make_docs(80, 8, "a"))
    specs = [DomainSpec("a", [str(f)])]
    barrier = threading.Barrier(2, timeout=30)
    real = data_mod._tokenize

    def slow_tokenize(*a, **k):
        out = real(*a, **k)
        barrier.wait()  # both threads have missed the cache and are about to write
        return out

    monkeypatch.setattr(data_mod, "_tokenize", slow_tokenize)
    results, errors = [None, None], []

    def prepare(i):
        try:
            results[i] = np.array(prepare_domains(specs, tokenizer, 16, tmp_path / "cache")["a"].train)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=prepare, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    np.testing.assert_array_equal(results[0], results[1])
    assert len(results[0]) > 0
    (entry,) = (tmp_path / "cache").iterdir()
    assert sorted(p.name for p in entry.iterdir()) == ["meta.json", "train.npy", "val.npy"]
