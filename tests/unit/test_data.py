"""Data: every file type loads, packing is EOS-separated blocks, validation is held out deterministically,
the token cache is reused and invalidated when it should be, bad input names the domain.

The streamed, parallel cache (issue 16) is checked against the in-memory algorithm it replaced, kept as
``reference_split_and_pack`` in bench/data.py: the same train and validation blocks on the quick kit for 1 and 2
worker processes, with the hash hold-out and its "at least one block" top-up spread over many shards; resuming
after an exception or a SIGKILL; uint16 against uint32; damaged shards and old-format caches rebuilt."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from ddk.data import cache as data_cache
from ddk.data import tokenizer as data_tok
from ddk.data.cache import prepare_domains
from ddk.data.domains import DomainSpec, PackedDomain, TokenBlocks, load_domain_specs, natural_proportions
from ddk.errors import UsageError

REPO = Path(__file__).resolve().parents[2]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_data", REPO / "bench" / "data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


reference_split_and_pack = _load_bench().reference_split_and_pack

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


def test_domain_task_and_overflow_keys(tmp_path):
    """data.yaml's optional task: (parsed by parse_task, kept on the spec) and overflow:; bad values name the file."""
    from ddk.data.tasks import TaskSpec

    write_jsonl(tmp_path / "a.jsonl", ["x"])
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"domains": [
        {"name": "qa", "files": ["a.jsonl"], "task": {"check": "exact", "field": "answer"}, "overflow": "drop"},
        {"name": "re", "files": ["a.jsonl"], "task": {"check": "regex", "pattern": "is (\\d+)"}},
        {"name": "plain", "files": ["a.jsonl"]}]}))
    qa, rx, plain = load_domain_specs(tmp_path / "data.yaml")
    assert qa.task == TaskSpec("exact", "answer") and qa.overflow == "drop"
    assert rx.task == TaskSpec("regex", "answer", pattern="is (\\d+)") and rx.overflow == "truncate_left"
    assert plain.task is None
    inline = load_domain_specs({"domains": [{"name": "qa", "files": ["a.jsonl"], "task": "exact"}]},
                               base_dir=tmp_path)
    assert inline[0].task == TaskSpec()
    for entry, needle in [({"task": {"check": "vibes"}}, r".task.check: 'vibes'"),
                          ({"task": {"check": "exact", "colour": 1}}, r".task: unknown key 'colour'"),
                          ({"overflow": "wrap"}, r".overflow: 'wrap'")]:
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"domains": [{"name": "qa", "files": ["a.jsonl"], **entry}]}))
        where = re.escape(f"{tmp_path / 'bad.yaml'}: data.domains[0] (qa)")
        with pytest.raises(UsageError, match=where + re.escape(needle)):
            load_domain_specs(tmp_path / "bad.yaml")


def test_missing_data_path(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        load_domain_specs(tmp_path / "nope.yaml")


# ---- file types ---------------------------------------------------------------------------------------------

def test_every_file_type_loads_the_same_documents(tmp_path, tokenizer):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    from datasets import Dataset

    docs = make_docs(40, 1, "same")
    write_jsonl(tmp_path / "d.jsonl", docs)
    raw = (tmp_path / "d.jsonl").read_bytes()
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    (tmp_path / "d.txt").write_text("\n\n".join(docs) + "\n")   # documents separated by blank lines
    (tmp_path / "d.txt.zst").write_bytes(zstandard.ZstdCompressor().compress((tmp_path / "d.txt").read_bytes()))
    pq.write_table(pa.table({"text": docs, "other": list(range(len(docs)))}), tmp_path / "d.parquet",
                   row_group_size=7)
    Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "hf"))
    with open(tmp_path / "all.jsonl", "w") as fh:  # single-file form, two domains interleaved
        for i, d in enumerate(docs):
            fh.write(json.dumps({"domain": "same", "text": d}) + "\n")
            fh.write(json.dumps({"domain": "noise", "text": f"noise {i} " + d}) + "\n")

    results = {}
    for name in ("d.jsonl", "d.jsonl.gz", "d.jsonl.zst", "d.txt", "d.txt.zst", "d.parquet", "hf"):
        specs = load_domain_specs([{"name": "same", "files": [name]}], base_dir=tmp_path)
        results[name] = prepare_domains(specs, tokenizer, 16, tmp_path / "cache", shard_chars=300,
                                        workers=1)["same"]
        assert results[name].build is not None
    single = load_domain_specs({"file": "all.jsonl"}, base_dir=tmp_path)
    assert [s.name for s in single] == ["same", "noise"]
    results["single"] = prepare_domains(single, tokenizer, 16, tmp_path / "cache")["same"]

    ref = results["d.jsonl"]
    assert ref.train.shape[1] == 17 and ref.train.dtype == np.uint16 and ref.val.shape[1] == 17
    assert len(ref.info["shards"]) > 3  # several shards read as one
    ref_train, ref_val = reference_split_and_pack(single[0], tokenizer, 16)
    np.testing.assert_array_equal(ref.train, ref_train)
    np.testing.assert_array_equal(ref.val, ref_val)
    for name, packed in results.items():
        np.testing.assert_array_equal(packed.train, ref.train, err_msg=name)
        np.testing.assert_array_equal(packed.val, ref.val, err_msg=name)


def test_data_folder_finds_compressed_train_files(tmp_path):
    import gzip

    write_jsonl(tmp_path / "data/code/train.jsonl", ["x"])
    (tmp_path / "data/prose").mkdir(parents=True)
    (tmp_path / "data/prose/train.jsonl.gz").write_bytes(gzip.compress(b'{"text": "y"}\n'))
    (tmp_path / "data/prose/val.jsonl.gz").write_bytes(gzip.compress(b'{"text": "z"}\n'))
    specs = load_domain_specs(tmp_path / "data")
    assert [(s.name, [Path(f).name for f in s.files], [Path(f).name for f in s.val_files]) for s in specs] == [
        ("code", ["train.jsonl"], []), ("prose", ["train.jsonl.gz"], ["val.jsonl.gz"])]


def test_packing_is_documents_joined_by_eos(tmp_path, tokenizer):
    train, val = make_docs(30, 2, "t"), make_docs(10, 3, "v")
    write_jsonl(tmp_path / "t.jsonl", train)
    write_jsonl(tmp_path / "v.jsonl", val)
    specs = load_domain_specs([{"name": "a", "files": ["t.jsonl"], "val_files": ["v.jsonl"]}], base_dir=tmp_path)
    packed = prepare_domains(specs, tokenizer, 8, tmp_path / "cache", shard_chars=200)["a"]
    stream = []
    for d in train:
        stream += tokenizer.encode(d, add_special_tokens=False) + [tokenizer.eos_token_id]
    n = len(stream) // 9
    assert packed.train.shape == (n, 9)
    assert np.asarray(packed.train).reshape(-1).tolist() == stream[: n * 9]
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
    a = prepare_domains([spec_a], tokenizer, 16, tmp_path / "cache", shard_chars=1000)["x"]
    b = prepare_domains([spec_b], tokenizer, 16, tmp_path / "cache", shard_chars=3000)["x"]
    val_docs, train_docs = set(interior_docs(a.val, tokenizer)), set(interior_docs(a.train, tokenizer))
    assert len(val_docs) >= 5 and len(train_docs) >= 100
    assert not val_docs & train_docs
    assert set(docs) >= val_docs | train_docs
    np.testing.assert_array_equal(a.val, b.val)  # the same held-out documents, whatever the order and shards
    # roughly val_fraction of the documents are held out
    assert 0.04 < (len(val_docs) + 2) / len(docs) < 0.2


def test_small_domain_still_gets_a_val_block(tmp_path, tokenizer):
    """val_fraction holds out too little: the lowest hashes above it are topped up, from several shards, and
    taken out of train -- exactly as the in-memory algorithm did."""
    spec = DomainSpec("s", [str(write_jsonl(tmp_path / "s.jsonl", make_docs(40, 5, "s")))], val_fraction=0.01)
    ref_train, ref_val = reference_split_and_pack(spec, tokenizer, 48)
    for workers in (1, 2):
        packed = prepare_domains([spec], tokenizer, 48, tmp_path / f"cache{workers}", shard_chars=150,
                                 workers=workers)["s"]
        assert len(packed.val) >= 1 and len(packed.train) >= 1
        covered = {}
        for f, a, b in packed.info["train"]["segments"]:
            covered[f] = covered.get(f, 0) + b - a
        cut = [f for f, n in covered.items() if n < packed.info["shards"][f]["tokens"]]
        assert len(cut) >= 2 and packed.info["val"]["topped_up"] >= 2  # top-ups taken from several shards
        np.testing.assert_array_equal(packed.train, ref_train)
        np.testing.assert_array_equal(packed.val, ref_val)


# ---- the streamed cache against the in-memory reference --------------------------------------------------------

@pytest.fixture(scope="module")
def kit_tokenizer(kit):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(kit / "tokenizer"))


@pytest.fixture(scope="module")
def kit_specs(kit):
    """The kit's domains twice: as data.yaml has them (val_files) and held out by hash from train.jsonl."""
    with_val = load_domain_specs(kit / "data.yaml")
    by_hash = [DomainSpec(f"{s.name}-hash", s.files, val_fraction=0.1) for s in with_val]
    return with_val + by_hash


class _Reference(dict):
    """The in-memory algorithm's (train, val) per kit domain, computed on first use."""

    def __init__(self, specs, tokenizer):
        super().__init__()
        self.specs, self.tokenizer = {s.name: s for s in specs}, tokenizer

    def __missing__(self, name):
        self[name] = reference_split_and_pack(self.specs[name], self.tokenizer, 128)
        return self[name]


@pytest.fixture(scope="module")
def kit_reference(kit_specs, kit_tokenizer):
    return _Reference(kit_specs, kit_tokenizer)


@pytest.mark.parametrize("workers", [1, 2])
def test_streamed_cache_equals_in_memory_reference_on_kit(tmp_path, kit_specs, kit_tokenizer, kit_reference,
                                                          workers):
    got = prepare_domains(kit_specs, kit_tokenizer, 128, tmp_path / "cache", workers=workers, shard_chars=60_000)
    for spec in kit_specs:
        ref_train, ref_val = kit_reference[spec.name]
        packed = got[spec.name]
        assert packed.build["tokenised"] >= 4 and packed.train.dtype == np.uint16
        assert isinstance(packed.train, TokenBlocks)
        np.testing.assert_array_equal(packed.train, ref_train, err_msg=spec.name)
        np.testing.assert_array_equal(packed.val, ref_val, err_msg=spec.name)
        # row by row and by slices across shard boundaries, as the sampler and the evaluation read them
        for i in (0, 1, len(ref_train) // 2, len(ref_train) - 1):
            np.testing.assert_array_equal(packed.train[i], ref_train[i])
        np.testing.assert_array_equal(packed.val[:5], ref_val[:5])
        assert packed.info["train"]["blocks"] == len(ref_train) and packed.info["val"]["blocks"] == len(ref_val)


def test_resume_after_an_error_midway(tmp_path, kit_specs, kit_tokenizer, kit_reference, monkeypatch):
    spec = next(s for s in kit_specs if s.name == "code-hash")
    real, written = data_cache._write_part, []

    def failing(*a, **k):
        if len(written) == 3:
            raise RuntimeError("injected: the machine went away")
        written.append(a[2])
        return real(*a, **k)

    monkeypatch.setattr(data_cache, "_write_part", failing)
    with pytest.raises(RuntimeError, match="injected"):
        prepare_domains([spec], kit_tokenizer, 128, tmp_path / "cache", workers=2, shard_chars=30_000)
    monkeypatch.setattr(data_cache, "_write_part", real)
    packed = prepare_domains([spec], kit_tokenizer, 128, tmp_path / "cache", workers=2,
                             shard_chars=30_000)[spec.name]
    assert packed.build["reused"] == 3 and packed.build["tokenised"] >= 3
    ref_train, ref_val = kit_reference[spec.name]
    np.testing.assert_array_equal(packed.train, ref_train)
    np.testing.assert_array_equal(packed.val, ref_val)


def test_resume_after_sigkill_of_ddk_data_prepare(tmp_path, kit, kit_specs, kit_tokenizer, kit_reference):
    """`ddk data prepare` killed with SIGKILL right after its 5th shard: the next run tokenises only the rest."""
    code = next(s for s in kit_specs if s.name == "code")
    config = yaml.safe_load((kit / "train.yaml").read_text())
    config["student"]["model"] = str(kit / "student")
    config["data"] = {"domains": [{"name": "code", "files": code.files, "val_files": code.val_files}],
                      "seq_len": 128, "cache_dir": str(tmp_path / "cache")}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    script = (
        "import os, signal, sys\n"
        "from ddk.data import cache\n"
        "real, n = cache._write_part, [0]\n"
        "def write(*a, **k):\n"
        "    out = real(*a, **k)\n"
        "    n[0] += 1\n"
        "    if n[0] == 5:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return out\n"
        "cache._write_part = write\n"
        "from ddk.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    argv = ["data", "prepare", str(tmp_path / "train.yaml"), "--workers", "1", "--shard-chars", "20000", "--quiet"]
    proc = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    (code_dir,) = (tmp_path / "cache").iterdir()
    assert not (code_dir / "meta.json").exists() and len(list(code_dir.glob("t*.json"))) == 5
    got = prepare_domains([code], kit_tokenizer, 128, tmp_path / "cache", workers=1, shard_chars=20000)["code"]
    assert got.build["reused"] == 5 and got.build["tokenised"] >= 5
    np.testing.assert_array_equal(got.train, kit_reference["code"][0])
    np.testing.assert_array_equal(got.val, kit_reference["code"][1])


def test_uint16_and_uint32_caches_give_the_same_blocks(tmp_path, tokenizer):
    spec = DomainSpec("a", [str(write_jsonl(tmp_path / "a.jsonl", make_docs(80, 9, "a")))], val_fraction=0.1)
    small = prepare_domains([spec], tokenizer, 16, tmp_path / "cache", shard_chars=500)["a"]
    wide = prepare_domains([spec], tokenizer, 16, tmp_path / "cache", shard_chars=500, dtype="uint32")["a"]
    assert (small.train.dtype, wide.train.dtype) == (np.uint16, np.uint32)
    assert small.info["dtype"] == "uint16" and wide.info["dtype"] == "uint32"
    assert len({p.name for p in (tmp_path / "cache").iterdir()}) == 2  # the dtype is part of the key
    np.testing.assert_array_equal(np.asarray(small.train, np.int64), np.asarray(wide.train, np.int64))
    np.testing.assert_array_equal(np.asarray(small.val, np.int64), np.asarray(wide.val, np.int64))
    with pytest.raises(UsageError, match="dtype"):
        prepare_domains([spec], tokenizer, 16, tmp_path / "cache", dtype="int64")


def test_big_vocabulary_gets_uint32(tmp_path):
    from ddk.data.domains import token_dtype

    class Tok:
        def __init__(self, n):
            self.n = n

        def get_vocab(self):
            return {"a": 0, "z": self.n - 1}

        def __len__(self):
            return self.n

    assert token_dtype(Tok(65_536)) == np.uint16 and token_dtype(Tok(65_537)) == np.uint32


# ---- cache ----------------------------------------------------------------------------------------------------

def test_cache_reused_and_invalidated(tmp_path, tokenizer):
    f = write_jsonl(tmp_path / "a.jsonl", make_docs(60, 6, "a"))
    specs = [DomainSpec("a", [str(f)])]
    cache = tmp_path / "cache"

    def built(**kw):
        return prepare_domains(specs, kw.pop("tok", tokenizer), kw.pop("seq_len", 16), cache)["a"].build is not None

    first = prepare_domains(specs, tokenizer, 16, cache)["a"]
    assert first.build is not None
    second = prepare_domains(specs, tokenizer, 16, cache)["a"]
    assert second.build is None                              # memory-mapped, not re-tokenised
    assert isinstance(second.train[0], np.memmap)
    np.testing.assert_array_equal(first.train, second.train)

    assert built(seq_len=8)                                  # seq_len is part of the key
    other = make_tokenizer(make_docs(50, 99, "other"), vocab_size=280)
    assert built(tok=other)                                  # a different tokenizer fingerprint
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file changed
    assert built()
    assert not built()


def test_unfinished_cache_is_rebuilt(tmp_path, tokenizer):
    f = write_jsonl(tmp_path / "a.jsonl", make_docs(60, 7, "a"))
    specs = [DomainSpec("a", [str(f)])]
    cache = tmp_path / "cache"
    good = np.array(prepare_domains(specs, tokenizer, 16, cache, shard_chars=400)["a"].train)
    (entry,) = cache.iterdir()
    (entry / "meta.json").unlink()                            # as if a writer died before finishing
    (entry / "t00001.train.npy").write_bytes(b"garbage")
    again = prepare_domains(specs, tokenizer, 16, cache, shard_chars=400)["a"]
    np.testing.assert_array_equal(again.train, good)
    assert again.build["tokenised"] == 1 and again.build["reused"] >= 2
    assert not [p for p in entry.iterdir() if p.name.endswith(".tmp")]


def test_corrupted_shard_is_detected_and_rebuilt(tmp_path, tokenizer):
    f = write_jsonl(tmp_path / "a.jsonl", make_docs(60, 7, "a"))
    specs = [DomainSpec("a", [str(f)])]
    cache = tmp_path / "cache"
    first = prepare_domains(specs, tokenizer, 16, cache, shard_chars=400)["a"]
    good_train, good_val = np.array(first.train), np.array(first.val)
    (entry,) = cache.iterdir()
    shard = entry / "t00002.train.npy"
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0xFF                                           # one flipped byte: same size, same header
    shard.write_bytes(bytes(raw))
    assert prepare_domains(specs, tokenizer, 16, cache)["a"].build is None  # a plain load checks sizes only
    fixed = prepare_domains(specs, tokenizer, 16, cache, verify=True)["a"]  # ddk data prepare checks crc32
    assert fixed.build == {**fixed.build, "tokenised": 1}
    np.testing.assert_array_equal(fixed.train, good_train)
    np.testing.assert_array_equal(fixed.val, good_val)
    # a truncated shard (or the hold-out file) is caught by any load
    with open(entry / "val-holdout.npy", "r+b") as fh:
        fh.truncate(200)
    again = prepare_domains(specs, tokenizer, 16, cache)["a"]
    assert again.build["tokenised"] == 0                      # every part still good: only finalised again
    np.testing.assert_array_equal(again.val, good_val)


def test_old_format_cache_is_rebuilt_not_misread(tmp_path, tokenizer):
    from ddk.fingerprint import tokenizer_fingerprint

    f = write_jsonl(tmp_path / "a.jsonl", make_docs(60, 8, "a"))
    spec = DomainSpec("a", [str(f)])
    cache = tmp_path / "cache"
    good = prepare_domains([spec], tokenizer, 16, tmp_path / "fresh")["a"]
    # a format-1 cache (int32 train.npy/val.npy, meta.json without "format") sitting in the new key's folder
    d = data_cache.domain_dir(cache, spec, tokenizer_fingerprint(tokenizer), tokenizer.eos_token_id, 16,
                              np.dtype("uint16"))
    d.mkdir(parents=True)
    np.save(d / "train.npy", np.zeros((3, 17), np.int32))
    np.save(d / "val.npy", np.zeros((1, 17), np.int32))
    (d / "meta.json").write_text(json.dumps({"name": "a", "seq_len": 16, "train_blocks": 3, "val_blocks": 1}))
    got = prepare_domains([spec], tokenizer, 16, cache)["a"]
    assert got.build is not None and got.info["format"] == data_cache.CACHE_FORMAT
    np.testing.assert_array_equal(got.train, good.train)
    assert not (d / "train.npy").exists()


def test_natural_proportions():
    z = lambda n: np.zeros((n, 5), dtype=np.int32)  # noqa: E731
    domains = {"a": PackedDomain("a", z(30), z(1)), "b": PackedDomain("b", z(10), z(1))}
    assert natural_proportions(domains) == pytest.approx({"a": 0.75, "b": 0.25})
    blocks = {"a": PackedDomain("a", TokenBlocks([np.zeros(30 * 5 + 3, np.uint16)], 5), z(1)),
              "b": PackedDomain("b", TokenBlocks([np.zeros(20, np.uint16), np.zeros(32, np.uint16)], 5), z(1))}
    assert natural_proportions(blocks) == pytest.approx({"a": 0.75, "b": 0.25})


def test_token_blocks_read_shards_as_one_array(tmp_path):
    stream = np.arange(103, dtype=np.uint16)
    cuts = [0, 4, 5, 30, 61, 103]
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        np.save(tmp_path / f"s{i}.npy", stream[a:b])
    segs = [(str(tmp_path / f"s{i}.npy"), 0, b - a) for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    blocks = TokenBlocks.open(segs, 10, np.uint16)
    ref = stream[:100].reshape(10, 10)
    assert blocks.shape == (10, 10) and len(blocks) == 10 and blocks.size == 100 and blocks.dtype == np.uint16
    np.testing.assert_array_equal(np.asarray(blocks), ref)
    for idx in (0, 3, -1, slice(2, 7), slice(None, None, 3), slice(8, 2), [5, 0, 5], np.array([1, 9]),
                (2, slice(1, 4)), (slice(1, 3), 0)):
        np.testing.assert_array_equal(blocks[idx], ref[idx], err_msg=str(idx))
    np.testing.assert_array_equal(np.stack(list(blocks)), ref)
    np.testing.assert_array_equal(blocks[1:4].astype(np.int64), ref[1:4].astype(np.int64))
    with pytest.raises(IndexError):
        blocks[10]
    again = pickle.loads(pickle.dumps(blocks))               # carries paths, not tokens
    assert len(pickle.dumps(blocks)) < 1000
    np.testing.assert_array_equal(np.asarray(again), ref)


def test_two_preparers_at_once_both_succeed(tmp_path, tokenizer):
    """Two workers preparing the same cache concurrently (threads started together): one builds, the other waits
    for it on the folder's lock and maps the result; both end up with complete, identical arrays."""
    import threading

    f = write_jsonl(tmp_path / "a.jsonl", make_docs(80, 8, "a"))
    specs = [DomainSpec("a", [str(f)])]
    barrier = threading.Barrier(2, timeout=30)
    results, errors = [None, None], []

    def prepare(i):
        try:
            barrier.wait()
            got = prepare_domains(specs, tokenizer, 16, tmp_path / "cache", shard_chars=500)["a"]
            results[i] = (np.array(got.train), got.build is not None)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=prepare, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    np.testing.assert_array_equal(results[0][0], results[1][0])
    assert len(results[0][0]) > 0
    assert sorted([results[0][1], results[1][1]]) == [False, True]  # built once
    (entry,) = (tmp_path / "cache").iterdir()
    assert (entry / "meta.json").is_file() and not [p for p in entry.iterdir() if p.name.endswith(".tmp")]


# ---- ddk data -------------------------------------------------------------------------------------------------

def test_ddk_data_inspect_and_prepare(tmp_path, kit, capsys):
    from ddk.cli import main

    cache = tmp_path / "cache"
    assert main(["data", "inspect", str(kit / "train.yaml"), "--cache-dir", str(cache), "--json",
                 "--set", "data.seq_len=64"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["domain"]: r for r in out["domains"]}
    assert set(rows) == {"code", "prose", "legal", "math"} and out["seq_len"] == 64
    assert sum(r["natural"] for r in rows.values()) == pytest.approx(1.0)
    code = rows["code"]
    assert code["train_documents"] == 153 and code["val_documents"] == 17
    assert code["train_blocks"] == code["train_tokens"] // 65 and code["dtype"] == "uint16"
    # the evaluation set: one window per document before any document gets a second (ddk.data.evalset)
    assert code["eval_documents"] == min(code["val_documents"], code["eval_blocks"]) and code["eval_tokens"] > 0
    assert main(["data", "prepare", str(kit / "train.yaml"), "--cache-dir", str(cache), "--quiet",
                 "--set", "data.seq_len=64"]) == 0
    text = capsys.readouterr().out
    assert "0 of 4 domains built" in text and "natural" in text
    assert main(["data", "inspect", str(kit / "data.yaml"), "--cache-dir", str(cache)]) == 2  # no tokenizer
    assert main(["data", "inspect", str(kit / "data.yaml"), "--cache-dir", str(cache), "--tokenizer",
                 str(kit / "tokenizer"), "--seq-len", "64"]) == 0
    assert "math" in capsys.readouterr().out


@pytest.mark.slow
def test_ray_data_gives_the_same_cache(tmp_path, kit, kit_specs, kit_reference):
    """``ddk data prepare --ray``: chunks tokenised by Ray Data's ``map_batches`` on a local Ray (2 CPUs), in
    windows smaller than the domain (so several datasets run), with the tokenizers-only tokenizer: the same
    blocks as the in-memory reference, and the same parts as the local path."""
    import ray

    from ddk.fingerprint import tokenizer_fingerprint

    specs = [s for s in kit_specs if s.name in ("code", "prose-hash")]
    tok = data_tok.load_tokenizer(kit / "tokenizer")
    assert isinstance(tok, data_tok.TokenizerFile)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        got = prepare_domains(specs, tok, 128, tmp_path / "cache", use_ray=True, shard_chars=60_000)
    finally:
        ray.shutdown()
    assert "ray.data" in sys.modules
    local = prepare_domains(specs, tok, 128, tmp_path / "local", workers=1, shard_chars=60_000)
    for spec in specs:
        assert got[spec.name].build["tokenised"] >= 4
        np.testing.assert_array_equal(got[spec.name].train, kit_reference[spec.name][0], err_msg=spec.name)
        np.testing.assert_array_equal(got[spec.name].val, kit_reference[spec.name][1], err_msg=spec.name)
        key = (spec, tokenizer_fingerprint(tok), tok.eos_token_id, 128, np.dtype("uint16"))
        ray_dir = data_cache.domain_dir(tmp_path / "cache", *key)
        local_dir = data_cache.domain_dir(tmp_path / "local", *key)
        assert ray_dir.name == local_dir.name and (ray_dir / "meta.json").is_file()
        shards = got[spec.name].info["shards"]
        assert shards == local[spec.name].info["shards"]       # the same shards, numbered by corpus position
        for f in shards:
            assert (ray_dir / f).read_bytes() == (local_dir / f).read_bytes(), f


# ---- the tokenizer without transformers ------------------------------------------------------------------------

@pytest.mark.parametrize("folder", ["tokenizer", "student"])
def test_tokenizers_only_tokenizer_gives_the_transformers_key_and_ids(tmp_path, kit, folder):
    """``ddk data prepare`` reads tokenizer.json with the tokenizers library: the same fingerprint (vocabulary
    with added tokens), EOS, dtype and so the same cache folder as transformers' tokenizer, and the same ids."""
    from transformers import AutoTokenizer

    from ddk.fingerprint import tokenizer_fingerprint, vocab_fingerprint
    from ddk.data.domains import read_documents, token_dtype

    hf = AutoTokenizer.from_pretrained(str(kit / folder))
    tok = data_tok.load_tokenizer(kit / folder)
    assert isinstance(tok, data_tok.TokenizerFile)
    assert tok.get_vocab() == hf.get_vocab() and len(tok) == len(hf)
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(hf) == vocab_fingerprint(hf.get_vocab())
    assert (tok.eos_token, tok.eos_token_id) == (hf.eos_token, hf.eos_token_id)
    assert token_dtype(tok) == token_dtype(hf)
    specs = load_domain_specs(kit / "data.yaml")
    for spec in specs:
        key = [tokenizer_fingerprint(tok), tok.eos_token_id, 128, token_dtype(tok)]
        assert data_cache.domain_dir(tmp_path, spec, *key) == data_cache.domain_dir(
            tmp_path, spec, tokenizer_fingerprint(hf), hf.eos_token_id, 128, token_dtype(hf))
        texts = list(read_documents(spec, spec.files))[:60] + ["", " leading", "tabs\t\tand\n\nnewlines  ",
                                                               "</s> in text <s><pad>", "ünïcödé ✓ 中文"]
        want = hf(texts, add_special_tokens=False)["input_ids"]
        assert tok(texts, add_special_tokens=False)["input_ids"] == want, spec.name
        assert data_tok.make_encoder(data_tok.tokenizer_payload(tok))(texts) == want, spec.name
        assert data_tok.make_encoder(data_tok.tokenizer_payload(hf))(texts) == want, spec.name
    assert tok.decode(tok.encode("def f(x):\n    return x", add_special_tokens=False)) == "def f(x):\n    return x"


def test_tokenizer_falls_back_to_transformers_when_the_file_is_not_enough(tmp_path, kit, caplog):
    import logging
    import shutil

    assert data_tok.tokenizer_file(tmp_path) == (None, "no tokenizer.json")
    # an EOS that tokenizer.json lacks: transformers adds it (another vocabulary), so transformers is used
    d = tmp_path / "tok"
    shutil.copytree(kit / "tokenizer", d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": "<|end|>"}))
    tok, why = data_tok.tokenizer_file(d)
    assert tok is None and "'<|end|>' not in tokenizer.json" in why
    with caplog.at_level(logging.INFO, logger="ddk.data.tokenizer"):
        hf = data_tok.load_tokenizer(d)
    assert not isinstance(hf, data_tok.TokenizerFile) and hf.eos_token == "<|end|>" and len(hf) == 2049
    assert "loading with transformers" in caplog.text
    # a named class is rebuilt by transformers: not read directly unless asked
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "GPT2Tokenizer"}))
    assert data_tok.tokenizer_file(d)[0] is None
    os.environ[data_tok.TOKENIZER_ENV] = "tokenizers"
    try:
        assert isinstance(data_tok.tokenizer_file(d)[0], data_tok.TokenizerFile)
    finally:
        del os.environ[data_tok.TOKENIZER_ENV]


def test_ddk_data_prepare_imports_neither_torch_nor_transformers(tmp_path, kit):
    """The driver of `ddk data prepare` (2 worker processes) never imports torch or transformers."""
    docs = make_docs(400, 11, "doc")
    write_jsonl(tmp_path / "data/a/train.jsonl", docs)
    script = ("import json, sys\n"
              "from ddk.cli import main\n"
              "rc = main(sys.argv[1:])\n"
              "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules, "
              "'transformers': 'transformers' in sys.modules}))\n")
    argv = ["data", "prepare", str(tmp_path / "data"), "--tokenizer", str(kit / "tokenizer"), "--seq-len", "16",
            "--cache-dir", str(tmp_path / "cache"), "--workers", "2", "--shard-chars", "2000", "--quiet"]
    proc = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"rc": 0, "torch": False, "transformers": False}
    (d,) = (tmp_path / "cache").iterdir()
    assert len(list(d.glob("t*.json"))) >= 4
