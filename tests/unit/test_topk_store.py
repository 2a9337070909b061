"""The top-k store (ddk.teacher.store) on real SQLite files, and the teacher's model fingerprint.

Teacher-like data: rows of sorted log-softmax values of random logits (a peaked and a flat part), ids unique per
row. Every check compares against the float32 input, never against the store's own code.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import signal
import sqlite3
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from ddk.teacher.store import (ENCODINGS, StoreError, TopkStore, compact_bound, decode_entry, encode_entry,
                               id_bytes, sequence_key)

VOCAB = 5000
FP_A, FP_B = "a" * 32, "b" * 32


def answer(rows: int, k: int, seed: int = 0, vocab: int = VOCAB):
    """(ids int32 [R, k], logprobs float32 [R, k] descending, target float32 [R]) like a teacher's."""
    g = np.random.default_rng(seed)
    logits = g.standard_normal((rows, vocab)) * g.uniform(0.5, 4.0, (rows, 1))
    logits[:, :3] += g.uniform(0, 8, (rows, 1))  # some rows peaked
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ids = np.argsort(-lp, axis=1)[:, :k].astype(np.int32)
    vals = np.take_along_axis(lp, ids, 1).astype(np.float32)
    target = lp[np.arange(rows), g.integers(0, vocab, rows)].astype(np.float32)
    return ids, vals, target


def tokens(n: int, length: int = 9, seed: int = 0) -> list[list[int]]:
    g = np.random.default_rng(seed + 1000)
    return [g.integers(0, VOCAB, length).tolist() for _ in range(n)]


# -- pure encode / decode -------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 7, 64])
def test_float16_round_trip_within_half_precision(k):
    ids, lp, tg = answer(33, k, seed=k)
    blob = encode_entry(ids, lp, tg, encoding="float16", vocab_size=VOCAB)
    e = decode_entry(blob)
    assert np.array_equal(e.ids, ids) and e.ids.dtype == np.int32
    assert e.logprobs.dtype == np.float32 and e.logprobs.shape == lp.shape
    assert (np.abs(e.logprobs - lp) <= np.abs(lp) * 2 ** -11 + 1e-7).all()
    assert (np.abs(e.target_logprob - tg) <= np.abs(tg) * 2 ** -11 + 1e-7).all()
    # exactly the float16 a wire frame would carry
    assert np.array_equal(e.logprobs, lp.astype(np.float16).astype(np.float32))
    # ids in the fewest whole bytes: 5000 ids -> 2 bytes each
    assert len(blob) == 16 + 33 * k * (2 + 2) + 33 * 2


@pytest.mark.parametrize("vocab, width", [(200, 1), (256, 1), (257, 2), (65536, 2), (65537, 3), (128256, 3),
                                          (1 << 24, 3), ((1 << 24) + 1, 4)])
def test_float16_id_width_is_the_fewest_whole_bytes(vocab, width):
    assert id_bytes(vocab) == width
    ids = np.array([[0, vocab - 1]], dtype=np.int64)
    e = decode_entry(encode_entry(ids, np.array([[-0.1, -2.0]]), np.array([-1.0]), vocab_size=vocab))
    assert e.ids.tolist() == [[0, vocab - 1]]
    e = decode_entry(encode_entry(ids, np.array([[-0.1, -2.0]]), np.array([-1.0]), encoding="compact",
                                  vocab_size=vocab))
    assert e.ids.tolist() == [[0, vocab - 1]]


@pytest.mark.parametrize("k", [1, 8, 64])
def test_compact_round_trip_within_its_bound_and_smaller(k):
    ids, lp, tg = answer(40, k, seed=10 + k)
    blob = encode_entry(ids, lp, tg, encoding="compact", vocab_size=VOCAB)
    e = decode_entry(blob)
    assert np.array_equal(e.ids, ids)
    err = np.abs(e.logprobs.astype(np.float64) - lp)
    assert (err <= compact_bound(lp)).all()
    assert err.max() > 0  # it is lossy: the bound is what is being tested
    assert (np.diff(e.logprobs, axis=1) <= 0).all()  # rows stay sorted descending
    assert (np.abs(e.target_logprob - tg) <= np.abs(tg) * 2 ** -11 + 1e-7).all()
    assert len(blob) < len(encode_entry(ids, lp, tg, encoding="float16", vocab_size=VOCAB))
    # near the top of a row (gap < 1 nat) the error is small in absolute terms
    near = (lp[:, :1] - lp) < 1.0
    assert err[near].max() < 0.05


def test_compact_clamps_minus_infinity_and_far_tails():
    ids = np.array([[3, 1, 2]])
    lp = np.array([[-0.01, -50.0, -np.inf]], dtype=np.float32)
    e = decode_entry(encode_entry(ids, lp, np.array([-3.0]), encoding="compact", vocab_size=8))
    assert np.isfinite(e.logprobs).all() and e.logprobs[0, 1] <= -39 and e.logprobs[0, 2] <= -39


def test_decode_cuts_to_a_smaller_k_and_refuses_a_larger_one():
    ids, lp, tg = answer(5, 16)
    for enc in ENCODINGS:
        blob = encode_entry(ids, lp, tg, encoding=enc, vocab_size=VOCAB)
        full, cut = decode_entry(blob), decode_entry(blob, 4)
        assert np.array_equal(cut.ids, ids[:, :4]) and np.array_equal(cut.logprobs, full.logprobs[:, :4])
        with pytest.raises(StoreError):
            decode_entry(blob, 17)


def test_malformed_blobs_raise_store_error():
    ids, lp, tg = answer(5, 4)
    for enc in ENCODINGS:
        blob = encode_entry(ids, lp, tg, encoding=enc)
        for bad in (blob[:10], blob[:-3], b"XXXX" + blob[4:], blob + b"\0"):
            with pytest.raises(StoreError):
                decode_entry(bad)
    with pytest.raises(StoreError):
        encode_entry(ids, lp, tg, vocab_size=2)  # ids outside the vocabulary
    with pytest.raises(StoreError):
        encode_entry(ids, lp[:, :2], tg)  # shapes


def test_sequence_key_depends_on_every_id_and_the_length():
    assert sequence_key([1, 2, 3]) == sequence_key(np.array([1, 2, 3], dtype=np.int64))
    assert sequence_key([1, 2, 3]) != sequence_key([1, 2, 4])
    assert sequence_key([0, 0]) != sequence_key([0, 0, 0])


# -- the store ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("encoding", ENCODINGS)
def test_put_get_and_an_entry_for_k_serves_smaller_k(tmp_path, encoding):
    s = TopkStore(tmp_path / "s.sqlite", encoding=encoding, vocab_size=VOCAB)
    seqs = tokens(3)
    answers = [answer(8, 16, seed=i) for i in range(3)]
    assert s.put_many(FP_A, [(t, *a) for t, a in zip(seqs, answers)]) == 3
    for t, (ids, lp, tg) in zip(seqs, answers):
        for k in (16, 5, 1):
            e = s.get(FP_A, t, k)
            assert e is not None and np.array_equal(e.ids, ids[:, :k])
            bound = np.abs(lp[:, :k]) * 2 ** -11 + 1e-7 if encoding == "float16" else compact_bound(lp)[:, :k]
            assert (np.abs(e.logprobs - lp[:, :k]) <= bound).all()
        assert s.get(FP_A, t, 17) is None  # a larger k is a miss
    assert s.get_many(FP_A, [seqs[0], tokens(1, seed=9)[0], seqs[2]], 8)[1] is None
    # a larger k replaces the smaller entry; a smaller one is not stored next to a larger one
    big = answer(8, 32, seed=5)
    assert s.put(FP_A, seqs[0], *big)
    assert not s.put(FP_A, seqs[0], *answer(8, 4, seed=6))
    assert s.stats()["entries"] == 3
    assert np.array_equal(s.get(FP_A, seqs[0], 16).ids, big[0][:, :16])
    s.close()
    # persisted: another connection reads the same
    s2 = TopkStore(tmp_path / "s.sqlite")
    assert np.array_equal(s2.get(FP_A, seqs[1], 16).ids, answers[1][0])
    assert s2.stats()["bytes"] == sum(len(b) for (b,) in sqlite3.connect(tmp_path / "s.sqlite").execute(
        "SELECT blob FROM topk"))


def test_another_teachers_fingerprint_never_hits(tmp_path):
    s = TopkStore(tmp_path / "s.sqlite")
    t = tokens(1)[0]
    s.put(FP_A, t, *answer(8, 4))
    assert s.get(FP_A, t, 4) is not None
    assert s.get(FP_B, t, 4) is None and s.get(FP_B, t, 1) is None
    # B's own entry for the same tokens stays B's
    other = answer(8, 4, seed=3)
    s.put(FP_B, t, *other)
    assert np.array_equal(s.get(FP_B, t, 4).ids, other[0])
    assert not np.array_equal(s.get(FP_A, t, 4).ids, other[0])


@pytest.mark.parametrize("where", ["blob-middle", "blob-header", "checksum"])
def test_a_flipped_byte_is_a_logged_miss_never_a_wrong_answer(tmp_path, caplog, where):
    path = tmp_path / "s.sqlite"
    s = TopkStore(path, vocab_size=VOCAB)
    seqs = tokens(2)
    for i, t in enumerate(seqs):
        s.put(FP_A, t, *answer(8, 8, seed=i))
    db = sqlite3.connect(path)
    rid, blob, checksum = db.execute("SELECT id, blob, checksum FROM topk WHERE seq = ?",
                                     (sequence_key(seqs[0]),)).fetchone()
    col, data = ("checksum", bytearray(checksum)) if where == "checksum" else ("blob", bytearray(blob))
    data[len(data) // 2 if where != "blob-header" else 13] ^= 0x10
    db.execute(f"UPDATE topk SET {col} = ? WHERE id = ?", (bytes(data), rid))
    db.commit()
    db.close()
    with caplog.at_level(logging.WARNING, logger="ddk.teacher.store"):
        assert s.get(FP_A, seqs[0], 8) is None
    assert any("checksum" in r.getMessage() for r in caplog.records)
    assert s.get(FP_A, seqs[1], 8) is not None  # the others are served
    # the bad entry is gone, so the next answer is stored again
    assert s.put(FP_A, seqs[0], *answer(8, 8, seed=0))
    assert np.array_equal(s.get(FP_A, seqs[0], 8).ids, answer(8, 8, seed=0)[0])


def test_eviction_keeps_the_total_under_the_cap_and_drops_the_least_recently_used(tmp_path):
    one = len(encode_entry(*answer(8, 8), vocab_size=VOCAB))
    cap = 4 * one + one // 2  # room for four entries
    s = TopkStore(tmp_path / "s.sqlite", vocab_size=VOCAB, max_bytes=cap)
    seqs = tokens(8)
    for i in range(4):
        s.put(FP_A, seqs[i], *answer(8, 8, seed=i))
        time.sleep(0.002)
    assert s.stats()["entries"] == 4
    s.get(FP_A, seqs[0], 8)  # 0 is now the most recently used; 1 the least
    time.sleep(0.002)
    s.put(FP_A, seqs[4], *answer(8, 8, seed=4))
    st = s.stats()
    assert st["bytes"] <= cap and st["entries"] == 4
    assert s.get(FP_A, seqs[1], 8) is None
    assert all(s.get(FP_A, seqs[i], 8) is not None for i in (0, 2, 3, 4))
    for i in range(5, 8):
        s.put(FP_A, seqs[i], *answer(8, 8, seed=i))
        assert s.stats()["bytes"] <= cap
    # an entry larger than the whole cap is not stored (and evicts nothing)
    before = s.stats()
    assert not s.put(FP_A, tokens(1, 65, seed=50)[0], *answer(64, 64))
    assert s.stats() == before


def _writer(path: str, offset: int, n: int) -> None:
    s = TopkStore(path, vocab_size=VOCAB)
    for i in range(offset, offset + n):
        s.put(FP_A, tokens(1, seed=i)[0], *answer(8, 8, seed=i))
    s.close()


def test_two_writer_processes_on_one_file(tmp_path):
    path = str(tmp_path / "s.sqlite")
    TopkStore(path).close()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, o, 40)) for o in (0, 1000)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    s = TopkStore(path)
    assert s.stats()["entries"] == 80
    for i in list(range(40)) + list(range(1000, 1040)):
        e = s.get(FP_A, tokens(1, seed=i)[0], 8)
        assert e is not None and np.array_equal(e.ids, answer(8, 8, seed=i)[0])
    assert s.stats()["bytes"] == sum(len(b) for (b,) in sqlite3.connect(path).execute("SELECT blob FROM topk"))


def _endless_writer(path: str) -> None:
    s = TopkStore(path, vocab_size=VOCAB)
    i = 0
    while True:  # large entries, so the kill lands inside a write
        s.put(FP_A, tokens(1, 257, seed=i)[0], *answer(256, 64, seed=i % 7))
        i += 1


def test_a_writer_killed_mid_write_leaves_a_readable_store(tmp_path):
    path = str(tmp_path / "s.sqlite")
    TopkStore(path).close()
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_endless_writer, args=(path,))
    p.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until it has written a few
        time.sleep(0.2)
        if sqlite3.connect(path, timeout=30).execute("SELECT COUNT(*) FROM topk").fetchone()[0] >= 3:
            break
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    assert p.exitcode == -signal.SIGKILL
    s = TopkStore(path)
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    n = s.stats()["entries"]
    assert n >= 3
    i = 0
    served = 0
    while served < n:  # every entry that is there decodes to what was written, in order
        e = s.get(FP_A, tokens(1, 257, seed=i)[0], 64)
        assert e is not None, f"entry {i} of {n} missing"
        assert np.array_equal(e.ids, answer(256, 64, seed=i % 7)[0])
        served += 1
        i += 1
    # and it takes new writes
    assert s.put(FP_A, tokens(1, seed=99999)[0], *answer(8, 8))


# -- model fingerprint ------------------------------------------------------------------------------------------

def _fake_model(d: Path, weight_bytes: int) -> Path:
    d.mkdir()
    header = b'{"w":{"dtype":"F32","shape":[%d],"data_offsets":[0,%d]}}' % (weight_bytes // 4, weight_bytes)
    g = np.random.default_rng(0)
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header
                                          + g.integers(0, 256, weight_bytes, dtype=np.uint8).tobytes())
    (d / "config.json").write_text('{"vocab_size": 10}')
    (d / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0, "b": 1}}}')
    (d / "README.md").write_text("notes")
    return d


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("full_hash_bytes", [1 << 30, 1 << 16], ids=["hashed-whole", "sampled"])
def test_model_fingerprint(tmp_path, full_hash_bytes):
    from ddk.fingerprint import model_fingerprint

    def fp(d):
        return model_fingerprint(d, full_hash_bytes=full_hash_bytes)

    m = _fake_model(tmp_path / "m", 3 << 20)
    base = fp(m)
    assert len(base) == 32 and fp(m) == base
    # stable: a copy elsewhere, a new mtime, a file the model does not read
    c = tmp_path / "copy"
    shutil.copytree(m, c)
    os.utime(c / "model.safetensors", (0, 0))
    (c / "README.md").write_text("other notes")
    assert fp(c) == base
    # one weight byte in the middle of the file
    st = c / "model.safetensors"
    _flip(st, st.stat().st_size // 2)
    assert fp(c) != base
    _flip(st, st.stat().st_size // 2)
    assert fp(c) == base
    # the tokenizer; the config
    (c / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0, "c": 1}}}')
    assert fp(c) != base
    shutil.copy(m / "tokenizer.json", c / "tokenizer.json")
    (c / "config.json").write_text('{"vocab_size": 11}')
    assert fp(c) != base
    shutil.copy(m / "config.json", c / "config.json")
    assert fp(c) == base
    # the first and the last weight byte, and the safetensors header
    for off in (40, st.stat().st_size - 1, 20):
        _flip(st, off)
        assert fp(c) != base
        _flip(st, off)
    assert fp(c) == base


def test_model_fingerprint_samples_large_files_only_where_documented(tmp_path):
    """The documented limit: a large file is sampled, so a byte outside the sampled windows goes unnoticed."""
    from ddk.fingerprint import model_fingerprint

    m = _fake_model(tmp_path / "m", 3 << 20)
    base = model_fingerprint(m, full_hash_bytes=1 << 16)
    st = m / "model.safetensors"
    off = st.stat().st_size * 3 // 32  # between the 1/16 and 2/16 windows
    _flip(st, off)
    assert model_fingerprint(m, full_hash_bytes=1 << 16) == base
    assert model_fingerprint(m) != base  # a 3 MiB file is hashed whole by default


def test_id_table_orders_ids_by_frequency_and_indexes_every_entry():
    from ddk.teacher.store import id_table

    table, index = id_table(np.array([[5, 5, 7], [7, 5, 9]]))
    assert table.tolist() == [5, 7, 9]  # 5 three times, 7 twice, 9 once
    assert index.tolist() == [0, 0, 1, 1, 0, 2]


def test_compact_ids_of_a_large_vocabulary_cost_less_than_their_bits_when_they_repeat():
    """Top-k lists that keep naming the same few hundred of 128,256 tokens: the id table beats 17-bit ids;
    ids that never repeat fall back to the bit-packed layout (never worse than it by more than a byte)."""
    g = np.random.default_rng(3)
    vocab, rows, k = 128256, 255, 64
    common = g.choice(vocab, size=400, replace=False)
    ids = np.stack([g.choice(common, size=k, replace=False, p=None) for _ in range(rows)])
    lp = -np.sort(g.exponential(2.0, (rows, k)), axis=1).astype(np.float32)
    blob = encode_entry(ids, lp, lp[:, 0], encoding="compact", vocab_size=vocab)
    assert np.array_equal(decode_entry(blob).ids, ids)
    assert len(blob) < rows * k * 17 / 8  # less than the ids alone, bit-packed
    unique = g.choice(vocab, size=(rows, k), replace=False)  # no id twice in the blob
    blob = encode_entry(unique, lp, lp[:, 0], encoding="compact", vocab_size=vocab)
    assert np.array_equal(decode_entry(blob).ids, unique)
    assert blob[16 + 4 * rows] == 1  # the bit-packed layout
