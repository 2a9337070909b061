"""Pure parts of the teacher: wire frames, request checks, the batching queue (no server, no model)."""

from __future__ import annotations

import asyncio
import json
import struct
import threading
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddk.teacher import wire
from ddk.teacher.batcher import Batcher, Job, QueueFull
from ddk.teacher.engines import TopK
from ddk.teacher.validate import RequestError, parse_topk_request
from ddk.teacher.wire import FrameReader, WireError, decode_frame, decode_frames, encode_frame


def sample(rows=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 50_000, size=(rows, k)).astype(np.int32)
    lps = -np.sort(rng.exponential(3.0, size=(rows, k)).astype(np.float32), axis=1)
    tgt = -rng.exponential(5.0, size=rows).astype(np.float32)
    return ids, lps, tgt


# -- frame layout ----------------------------------------------------------------------------

def test_layout_is_the_documented_one():
    """Decode a frame by hand with struct, following the module docstring (not the decoder)."""
    ids, lps, tgt = sample(rows=2, k=3)
    data = encode_frame(7, ids, lps, tgt, "float32")
    magic, version, code, flags, index, rows, k, crc = struct.unpack_from("<4sHBBIIII", data, 0)
    assert (magic, version, code, flags, index, rows, k) == (b"DDKT", 1, 2, 0, 7, 2, 3)
    assert len(data) == 24 + 2 * 3 * 4 + 2 * 3 * 4 + 2 * 4
    assert crc == zlib.crc32(data[24:], zlib.crc32(data[:20]))
    assert list(struct.unpack_from("<6i", data, 24)) == ids.ravel().tolist()
    assert list(struct.unpack_from("<6f", data, 48)) == lps.ravel().tolist()
    assert list(struct.unpack_from("<2f", data, 72)) == tgt.tolist()
    half = encode_frame(7, ids, lps, tgt, "float16")
    assert half[6] == 1 and len(half) == 24 + 24 + 12 + 4


def test_round_trip_float32_exact_and_float16_within_precision():
    ids, lps, tgt = sample(rows=9, k=4)
    f = decode_frame(encode_frame(3, ids, lps, tgt, "float32"))
    assert f.index == 3
    np.testing.assert_array_equal(f.ids, ids)
    np.testing.assert_array_equal(f.logprobs, lps)
    np.testing.assert_array_equal(f.target_logprob, tgt)
    h = decode_frame(encode_frame(3, ids, lps, tgt, "float16"))
    assert h.logprobs.dtype == np.float16
    np.testing.assert_array_equal(h.ids, ids)
    # float16 keeps 11 significant bits: relative error at most 2**-11
    np.testing.assert_allclose(h.logprobs.astype(np.float32), lps, rtol=2 ** -11, atol=1e-7)
    np.testing.assert_allclose(h.target_logprob.astype(np.float32), tgt, rtol=2 ** -11, atol=1e-7)


def test_bad_shapes_and_dtype_are_refused():
    ids, lps, tgt = sample()
    with pytest.raises(WireError):
        encode_frame(0, ids, lps[:, :2], tgt)
    with pytest.raises(WireError):
        encode_frame(0, ids, lps, tgt, "bfloat16")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 20), k=st.integers(1, 8), n=st.integers(1, 4),
       cuts=st.lists(st.integers(0, 10_000), max_size=12), dtype=st.sampled_from(["float16", "float32"]))
def test_reader_reassembles_frames_from_any_chunking(rows, k, n, cuts, dtype):
    frames = [sample(rows, k, seed=i) for i in range(n)]
    data = b"".join(encode_frame(i, *f, dtype) for i, f in enumerate(frames))
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    reader, got = FrameReader(), []
    for a, b in zip(points, points[1:]):
        got += reader.feed(data[a:b])
    reader.close()
    assert [g.index for g in got] == list(range(n))
    for g, (ids, lps, tgt) in zip(got, frames):
        np.testing.assert_array_equal(g.ids, ids)
        np.testing.assert_array_equal(g.logprobs, lps.astype(dtype))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_give_wire_error(data):
    with pytest.raises(WireError):
        decode_frame(data)
    with pytest.raises(WireError):
        decode_frames(data if data else b"x")


@settings(max_examples=100, deadline=None)
@given(cut=st.integers(0, 10_000))
def test_truncated_frames_give_wire_error(cut):
    data = encode_frame(1, *sample(4, 3), "float16")
    cut = cut % len(data)  # strictly shorter than the frame
    with pytest.raises(WireError):
        decode_frame(data[:cut])
    reader = FrameReader()
    assert reader.feed(data[:cut]) == []
    if cut:
        with pytest.raises(WireError, match="ended inside a frame"):
            reader.close()
    else:
        reader.close()  # an empty stream is zero frames, not an error


@settings(max_examples=150, deadline=None)
@given(pos=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_any_flipped_bit_gives_wire_error(pos, bit):
    data = bytearray(encode_frame(2, *sample(3, 2), "float32"))
    pos %= len(data)
    data[pos] ^= 1 << bit
    with pytest.raises(WireError):
        decode_frame(bytes(data))


def test_trailing_bytes_and_unknown_version_are_refused():
    data = encode_frame(0, *sample(2, 2))
    with pytest.raises(WireError, match="trailing"):
        decode_frame(data + b"\0")
    bumped = bytearray(data)
    bumped[4:6] = struct.pack("<H", 2)
    with pytest.raises(WireError, match="version"):
        decode_frame(bytes(bumped))


# -- request checks --------------------------------------------------------------------------

LIMITS = dict(vocab_size=100, max_seq_len=16, max_top_k=8, max_batch_tokens=40)


def parse(body):
    return parse_topk_request(body if isinstance(body, bytes) else body.encode(), **LIMITS)


def test_valid_request_parses():
    req = parse('{"input_ids": [[1, 2, 3], [4, 5, 99]], "top_k": 8, "dtype": "float16"}')
    assert [r.tolist() for r in req.input_ids] == [[1, 2, 3], [4, 5, 99]] and req.top_k == 8 and req.dtype == "float16"
    assert all(r.dtype == np.int64 for r in req.input_ids)
    assert parse('{"input_ids": [[0, 1]], "top_k": 1}').dtype == "float32"


def test_ragged_request_parses_and_is_bounded_by_the_sum_of_lengths():
    rows = [[1, 2, 3, 4, 5], list(range(16)), [7, 8], list(range(10, 27))[:16]]
    req = parse(json.dumps({"input_ids": rows, "top_k": 2}))
    assert [r.tolist() for r in req.input_ids] == rows and req.lengths == [5, 16, 2, 16] and req.tokens == 39
    with pytest.raises(RequestError) as e:  # 41 tokens in all (the longest x B would be 64: not what counts)
        parse(json.dumps({"input_ids": rows + [[1, 2]], "top_k": 2}))
    assert e.value.status == 413 and "41 tokens" in e.value.detail and "limit of 40" in e.value.detail
    for bad, status, field in (([[1, 2], list(range(17))], 413, "input_ids[1]: sequence length 17"),
                               ([[1, 2, 3], [4]], 422, "input_ids[1]: sequences must have at least 2"),
                               ([[1, 2, 3], [4, 5, 6, 7], [8, 100]], 422, "input_ids[2][1]: token id 100"),
                               ([[1, 2, 3], [4, 5, -3, 7]], 422, "input_ids[1][2]"),
                               ([[1, 2, 3], [4, 5.5]], 422, "input_ids[1][1]")):
        with pytest.raises(RequestError) as e:
            parse(json.dumps({"input_ids": bad, "top_k": 2}))
        assert e.value.status == status and field in e.value.detail, e.value.detail


@pytest.mark.parametrize("body, status, field", [
    ('not json', 422, "body"),
    ('[1, 2]', 422, "body"),
    ('{"input_ids": [[1, 2]]}', 422, "top_k"),
    ('{"input_ids": [[1, 2]], "top_k": 0}', 422, "top_k"),
    ('{"input_ids": [[1, 2]], "top_k": 9}', 422, "top_k"),
    ('{"input_ids": [[1, 2]], "top_k": true}', 422, "top_k"),
    ('{"input_ids": [[1, 2]], "top_k": 2.0}', 422, "top_k"),
    ('{"input_ids": [[1, 2]], "top_k": 2, "dtype": "int8"}', 422, "dtype"),
    ('{"input_ids": [[1, 2]], "top_k": 2, "extra": 1}', 422, "extra"),
    ('{"top_k": 2}', 422, "input_ids"),
    ('{"input_ids": [], "top_k": 2}', 422, "input_ids"),
    ('{"input_ids": "1 2", "top_k": 2}', 422, "input_ids"),
    ('{"input_ids": [1, 2], "top_k": 2}', 422, "input_ids[0]"),
    ('{"input_ids": [[1, 2], [3]], "top_k": 2}', 422, "input_ids[1]"),
    ('{"input_ids": [[1]], "top_k": 2}', 422, "at least 2"),
    ('{"input_ids": [[]], "top_k": 2}', 422, "at least 2"),
    ('{"input_ids": [[1, 2.5]], "top_k": 2}', 422, "input_ids[0][1]"),
    ('{"input_ids": [[1, true]], "top_k": 2}', 422, "input_ids[0][1]"),
    ('{"input_ids": [[1, "2"]], "top_k": 2}', 422, "input_ids[0][1]"),
    ('{"input_ids": [[1, 100]], "top_k": 2}', 422, "input_ids[0][1]"),
    ('{"input_ids": [[1, 2], [-1, 2]], "top_k": 2}', 422, "input_ids[1][0]"),
    ('{"input_ids": [[1, 99999999999999999999999]], "top_k": 2}', 422, "input_ids"),
    ('{"input_ids": [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]], "top_k": 2}', 413, "max_seq_len"),
    ('{"input_ids": [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]] , "top_k": 2}', None, None),
    ('{"input_ids": [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], '
     '[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]], "top_k": 2}', 413, "limit"),
])
def test_bad_requests_name_the_field(body, status, field):
    if status is None:
        parse(body)
        return
    with pytest.raises(RequestError) as e:
        parse(body)
    assert e.value.status == status
    assert field in e.value.detail


# -- batching queue --------------------------------------------------------------------------

class GatedEngine:
    """Stand-in engine for the queue logic: records batches, waits on a gate, answers with ids."""

    def __init__(self):
        self.batches: list[list[int]] = []
        self.gate = threading.Event()

    def topk(self, sequences, top_k):
        self.gate.wait(10)
        self.batches.append([len(s) for s in sequences])
        return [TopK(ids=np.asarray(s[1:], dtype=np.int32)[:, None], logprobs=np.zeros((len(s) - 1, 1), np.float32),
                     target_logprob=np.zeros(len(s) - 1, np.float32)) for s in sequences]


def test_batcher_merges_requests_within_the_token_limit_and_bounds_the_queue():
    async def scenario():
        engine = GatedEngine()
        b = Batcher(engine, max_batch_tokens=40, max_queue=3)
        b.start()
        try:
            first = Job(np.arange(20).reshape(2, 10), 1)  # the worker takes it and blocks on the gate
            b.submit(first)
            while b.queued_sequences:
                await asyncio.sleep(0.01)
            jobs = [Job(np.arange(i, i + 20).reshape(2, 10), 1) for i in range(3)]
            for j in jobs:
                b.submit(j)
            assert b.queue_depth == 3
            with pytest.raises(QueueFull) as full:
                b.submit(Job(np.arange(4).reshape(1, 4), 1))
            assert full.value.retry_after >= 1
            engine.gate.set()
            for j in [first] + jobs:
                got = sorted([await asyncio.wait_for(j.results.get(), 10) for _ in range(2)], key=lambda x: x[0])
                assert [i for i, _ in got] == [0, 1]
                for i, res in got:  # each answer went to its own request and row
                    assert res.ids[:, 0].tolist() == j.input_ids[i, 1:].tolist()
            # 1 batch for `first`, then 6 queued sequences of 10 tokens in batches of at most 40 tokens
            assert engine.batches == [[10, 10], [10, 10, 10, 10], [10, 10]]
            assert b.queue_depth == 0
        finally:
            engine.gate.set()
            b.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize("padded, expected", [
    # FIFO order 5, 17, 2, 33 | 3, 3 | 20 with a budget of 40: padded = sequences x longest, real = sum of lengths
    (True, [[4], [5, 17], [2], [33], [3, 3], [20]]),  # 3 x 17, 2 x 33, 3 x 20 would pass 40
    (False, [[4], [5, 17, 2], [33, 3, 3], [20]]),
])
def test_batcher_packs_ragged_sequences_by_tokens(padded, expected):
    async def scenario():
        engine = GatedEngine()
        b = Batcher(engine, max_batch_tokens=40, max_queue=8, padded=padded)
        b.start()
        try:
            blocker = Job([np.arange(4)], 1)
            b.submit(blocker)
            while b.queued_sequences:
                await asyncio.sleep(0.01)
            ragged = Job([np.arange(n) + n for n in (5, 17, 2, 33)], 1)
            short = Job(np.arange(6).reshape(2, 3), 1)
            last = Job([np.arange(20)], 1)
            for j in (ragged, short, last):
                b.submit(j)
            engine.gate.set()
            for j in (blocker, ragged, short, last):
                got = sorted([await asyncio.wait_for(j.results.get(), 10) for _ in j.lengths], key=lambda x: x[0])
                assert [i for i, _ in got] == list(range(len(j.lengths)))
                for i, res in got:  # each answer went to its own request and sequence, with its own length
                    assert res.ids[:, 0].tolist() == list(j.input_ids[i][1:])
            assert engine.batches == expected
            for batch in expected:
                cost = len(batch) * max(batch) if padded else sum(batch)
                assert cost <= 40 or len(batch) == 1
            assert b.queue_depth == 0 and b.queued_sequences == 0 and b._queued_tokens == 0
        finally:
            engine.gate.set()
            b.stop()

    asyncio.run(scenario())


def test_batcher_counts_padding_unless_the_engine_packs():
    class Packing(GatedEngine):
        pads_batches = False

    assert Batcher(GatedEngine()).padded is True  # engines that do not say are taken to pad (the safe side)
    assert Batcher(Packing()).padded is False
    assert Batcher(Packing(), padded=True).padded is True


def test_batcher_skips_cancelled_requests_and_reports_engine_errors():
    class Failing(GatedEngine):
        def topk(self, sequences, top_k):
            if any(s[0] == 99 for s in sequences):
                raise RuntimeError("boom")
            return super().topk(sequences, top_k)

    async def scenario():
        engine = Failing()
        b = Batcher(engine, max_batch_tokens=10, max_queue=8)
        b.start()
        try:
            blocker = Job(np.arange(10).reshape(1, 10), 1)
            b.submit(blocker)
            while b.queued_sequences:
                await asyncio.sleep(0.01)
            gone = Job(np.arange(30).reshape(3, 10), 1)
            b.submit(gone)
            gone.cancel()
            bad = Job(np.full((1, 10), 99), 1)
            b.submit(bad)
            engine.gate.set()
            assert isinstance(await asyncio.wait_for(bad.results.get(), 10), RuntimeError)
            await asyncio.wait_for(blocker.results.get(), 10)
            assert engine.batches == [[10]]  # the cancelled request never reached the engine
            assert b.queue_depth == 0 and b.queued_sequences == 0
            ok = Job(np.arange(10).reshape(1, 10), 1)  # the worker survived the failure
            b.submit(ok)
            i, _ = await asyncio.wait_for(ok.results.get(), 10)
            assert i == 0
        finally:
            engine.gate.set()
            b.stop()

    asyncio.run(scenario())


def test_media_type_constant():
    assert wire.MEDIA_TYPE == "application/x-ddk-topk"
