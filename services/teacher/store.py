"""The top-k store: a teacher's per-position top-k answers kept on disk, keyed by teacher, sequence and k.

Two layers in one module:

- **Pure encode/decode** (no I/O): :func:`encode_entry` turns one sequence's answer (``ids`` [R, k],
  ``logprobs`` [R, k] sorted descending per row, ``target_logprob`` [R]) into a self-describing blob and
  :func:`decode_entry` turns it back. Two encodings:

  - ``float16``: ids in the fewest whole bytes the vocabulary needs (1, 2, 3 or 4), logprobs and target
    logprobs as IEEE float16. Relative error at most 2^-11, exactly what a float16 wire frame carries.
  - ``compact``: ids through a per-blob id table: the distinct ids of the blob, most frequent first, in the
    fewest whole bytes the vocabulary needs, and for every entry its position in that table (a teacher's
    top-k lists of one sequence keep naming the same few hundred tokens, so positions are small numbers); per
    row the top logprob ``lp0`` as float16 and every logprob as a 1-byte code of its gap ``v = lp0 - lp`` on a
    log scale, ``u = log1p(v / A)`` quantised in :data:`COMPACT_LEVELS` steps over ``v`` in [0,
    :data:`COMPACT_MAX_GAP`]; the codes of a row are non-decreasing, so their steps (mostly 0..3) are stored.
    Table, positions and steps go through one zlib stream, as byte planes; target logprobs float16.
    The error of a logprob is at most ``|lp0 - fp16(lp0)| + (A + v) * (exp(step / 2) - 1)`` (:func:`compact_bound`):
    fine near the top of the distribution, coarser far down, where a probability weighs little in the KL.
    Gaps beyond COMPACT_MAX_GAP nats (probabilities e^-COMPACT_MAX_GAP times the top one) are clamped to it.
    Rows stay sorted descending. Bytes per entry and the top-k KL error of both encodings are measured by
    ``bench/store.py`` (docs/benchmarks.md).

  A blob starts with a 16-byte header (magic ``b"DKS1"``, encoding, id width, rows, k), so it decodes without
  outside information. A malformed blob raises :class:`StoreError`.

- **Storage**: :class:`TopkStore`, one SQLite file (stdlib ``sqlite3``; WAL journal, ``busy_timeout``, writes in
  ``BEGIN IMMEDIATE`` transactions): safe with several writer processes on one host and crash-safe (a
  SIGKILLed writer loses at most its open transaction; the file stays readable). One table ``topk`` keyed by
  ``(teacher, seq, k)``:

  - ``teacher``: the teacher's identity, :func:`ddk.fingerprint.model_fingerprint` of its model folder (what
    ``GET /v1/info`` calls ``model_fingerprint``). A store never serves one teacher's numbers for another.
  - ``seq``: :func:`sequence_key`, blake2b-128 of the sequence's token ids as int32 little-endian bytes plus
    its length.
  - ``k``: the entry's top-k. A lookup for k' is served by the smallest stored k >= k' (sliced to k').
  - ``checksum``: blake2b-128 over the key and the blob. A mismatch (a flipped bit on disk, a torn page) is a
    miss, logged and deleted, never a wrong answer.
  - ``size`` (the blob's bytes) and ``used`` (last read or write, ns since the epoch) for the optional
    ``max_bytes`` cap: after a write that takes the total of the blobs over the cap, the least recently used
    entries are deleted until it fits. The running total lives in a ``meta`` row kept by triggers in the same
    transactions, so it is right after a crash too. ``max_bytes`` counts the blobs, not the file: SQLite reuses
    freed pages but does not shrink the file.

API for the service cache and for precomputing (all methods thread-safe)::

    store = TopkStore(path, encoding="float16", vocab_size=V, max_bytes=None)
    store.get(teacher, token_ids, k)                 -> Entry(ids, logprobs, target_logprob) | None
    store.get_many(teacher, [token_ids, ...], k)     -> [Entry | None, ...]
    store.has_many(teacher, [token_ids, ...], k)     -> [bool, ...]   (keys only: resuming, counting gaps)
    store.put(teacher, token_ids, ids, logprobs, target_logprob) -> bool   (False: not stored)
    store.put_many(teacher, [(token_ids, ids, logprobs, target_logprob), ...]) -> int  (stored)
    store.put_blob(teacher, token_ids, blob)         (a blob from store.encode(...); what the service uses)
    store.stats()                                    -> {"entries", "bytes", "max_bytes", "encoding", "path"}

``Entry`` arrays are numpy: ids int32 [R, k'], logprobs and target_logprob float32, R = len(token_ids) - 1.
"""

from __future__ import annotations

import hashlib
import logging
import math
import sqlite3
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np

log = logging.getLogger(__name__)

ENCODINGS = ("float16", "compact")
_ENC_CODE = {"float16": 1, "compact": 3}  # 2: the first compact layout (bit-packed ids), retired
_CODE_ENC = {v: k for k, v in _ENC_CODE.items()}
MAGIC = b"DKS1"
HEADER = struct.Struct("<4sBBHII")  # magic, encoding, id width (bytes for float16, bits for compact), 0, rows, k
HEADER_SIZE = HEADER.size  # 16

# compact: gap v = lp0 - lp coded as round(log1p(v / A) / STEP), STEP = log1p(MAX_GAP / A) / (LEVELS - 1)
COMPACT_A = 0.25
COMPACT_MAX_GAP = 40.0
COMPACT_LEVELS = 128
COMPACT_STEP = math.log1p(COMPACT_MAX_GAP / COMPACT_A) / (COMPACT_LEVELS - 1)
_ZLIB_LEVEL = 9
MAX_ELEMENTS = 1 << 30  # a header claiming more is corrupt


class StoreError(ValueError):
    """Bytes that are not a valid store blob."""


class Entry(NamedTuple):
    ids: np.ndarray  # int32 [R, k]
    logprobs: np.ndarray  # float32 [R, k], descending per row
    target_logprob: np.ndarray  # float32 [R]


# ---------------------------------------------------------------------------------------------------------
# pure encode / decode

def id_bits(vocab_size: int) -> int:
    """Bits that hold every id of a vocabulary of ``vocab_size`` tokens."""
    return max(1, int(vocab_size - 1).bit_length())


def id_bytes(vocab_size: int) -> int:
    """The fewest whole bytes that hold every id of the vocabulary (1, 2, 3 or 4)."""
    return min(4, (id_bits(vocab_size) + 7) // 8)


def sequence_key(token_ids) -> bytes:
    """blake2b-128 of the token ids as int32 little-endian bytes followed by the length (uint64)."""
    arr = np.ascontiguousarray(np.asarray(token_ids).reshape(-1), dtype="<i4")
    h = hashlib.blake2b(arr.tobytes(), digest_size=16, person=b"ddk-topk-seq")
    h.update(struct.pack("<Q", arr.size))
    return h.digest()


def compact_bound(logprobs) -> np.ndarray:
    """The largest error :func:`encode_entry` with ``compact`` makes on each logprob ([R, k], descending rows)."""
    lp = np.asarray(logprobs, dtype=np.float64)
    lp0 = lp[:, :1]
    head_err = np.abs(lp0 - lp0.astype(np.float16).astype(np.float64))
    gap = np.clip(lp0.astype(np.float16).astype(np.float64) - lp, 0.0, COMPACT_MAX_GAP)
    return head_err + (COMPACT_A + gap) * math.expm1(COMPACT_STEP / 2) + 1e-6


def _check(ids, logprobs, target_logprob):
    ids = np.asarray(ids)
    logprobs = np.asarray(logprobs, dtype=np.float32)
    target_logprob = np.asarray(target_logprob, dtype=np.float32)
    if ids.ndim != 2 or logprobs.shape != ids.shape or target_logprob.shape != ids.shape[:1] or ids.size == 0:
        raise StoreError(f"shapes do not match: ids {ids.shape}, logprobs {logprobs.shape}, "
                         f"target_logprob {target_logprob.shape}")
    if ids.min() < 0:
        raise StoreError("ids: negative token id")
    return ids.astype(np.int64), logprobs, target_logprob


def _planes(values: np.ndarray, width: int) -> bytes:
    """Unsigned values as ``width`` little-endian byte planes (all low bytes, then the next ...): a plane of
    near-constant bytes is what zlib compresses best."""
    raw = np.ascontiguousarray(values.reshape(-1), dtype="<u4").view(np.uint8).reshape(-1, 4)[:, :width]
    return np.ascontiguousarray(raw.T).tobytes()


def _unpack_planes(data, n: int, width: int) -> np.ndarray:
    raw = np.zeros((n, 4), dtype=np.uint8)
    raw[:, :width] = np.frombuffer(data, dtype=np.uint8, count=n * width).reshape(width, n).T
    return raw.view("<u4").reshape(n).astype(np.int64)


def id_table(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(table, index): the distinct ids of a blob, most frequent first (ties: smaller id first), and each
    entry's position in that table, so that ``table[index] == ids``. A teacher's top-k lists of one sequence
    repeat the same few hundred tokens, so the index is small numbers, cheap for zlib's Huffman codes."""
    distinct, inverse, counts = np.unique(ids.reshape(-1), return_inverse=True, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return distinct[order], rank[inverse.reshape(-1)]


def _pack_bits(values: np.ndarray, bits: int) -> bytes:
    v = values.astype(np.uint32).reshape(-1)
    b = ((v[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(b.reshape(-1), bitorder="little").tobytes()


def _unpack_bits(data, n: int, bits: int) -> np.ndarray:
    b = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=n * bits, bitorder="little").reshape(n, bits)
    return (b.astype(np.int64) << np.arange(bits, dtype=np.int64)).sum(axis=1)


def _encode_compact(ids, logprobs, target, vocab: int) -> tuple[int, bytes]:
    """(id width in bits, body): float16 row heads and targets, a layout byte, then the ids either through
    the id table (layout 0: table size, table, positions and the logprob code steps in one zlib stream) or,
    where that is larger (a blob whose ids hardly repeat), bit-packed (layout 1) ahead of a zlib stream of the
    code steps."""
    bits = id_bits(vocab)
    head = logprobs[:, 0].astype("<f2")
    gap = np.clip(head.astype(np.float64)[:, None] - logprobs.astype(np.float64), 0.0, COMPACT_MAX_GAP)
    gap = np.nan_to_num(gap, nan=COMPACT_MAX_GAP, posinf=COMPACT_MAX_GAP)  # -inf logprobs: the floor
    codes = np.rint(np.log1p(gap / COMPACT_A) / COMPACT_STEP).astype(np.int16)
    codes = np.maximum.accumulate(codes, axis=1)  # descending rows -> non-decreasing codes (rounding ties)
    steps = np.diff(codes, axis=1, prepend=0).astype(np.uint8).tobytes()
    table, index = id_table(ids)
    tabled = b"\0" + zlib.compress(struct.pack("<I", table.size) + _planes(table, id_bytes(vocab))
                                   + _planes(index, id_bytes(table.size)) + steps, _ZLIB_LEVEL)
    packed = b"\1" + _pack_bits(ids, bits) + zlib.compress(steps, _ZLIB_LEVEL)
    return bits, head.tobytes() + target.astype("<f2").tobytes() + min(tabled, packed, key=len)


def _inflate(data, most: int) -> bytes:
    """One whole zlib stream of at most ``most`` bytes, nothing after it; else StoreError."""
    z = zlib.decompressobj()
    out = z.decompress(data, most + 1)
    if not z.eof or z.unused_data or z.unconsumed_tail or len(out) > most:
        raise StoreError("compact blob: a zlib stream is truncated, too long or followed by extra bytes")
    return out


def _decode_compact(body, rows: int, k: int, bits: int):
    if not 1 <= bits <= 32 or len(body) < 4 * rows + 1:
        raise StoreError(f"compact blob: id width {bits} bits, {len(body)} payload bytes")
    n, width = rows * k, (bits + 7) // 8
    head = np.frombuffer(body, dtype="<f2", count=rows).astype(np.float64)
    tgt = np.frombuffer(body, dtype="<f2", count=rows, offset=2 * rows).astype(np.float32)
    layout, rest = body[4 * rows], body[4 * rows + 1:]
    if layout == 0:  # ids through the id table
        payload = _inflate(rest, 4 + n * (width + 4))
        distinct = struct.unpack_from("<I", payload)[0] if len(payload) >= 4 else 0
        iw = id_bytes(max(distinct, 1))
        if not 1 <= distinct <= n or len(payload) != 4 + distinct * width + n * iw + n:
            raise StoreError(f"compact blob: {len(payload)} payload bytes do not fit rows={rows} k={k}")
        index = _unpack_planes(payload[4 + distinct * width:], n, iw)
        if index.max() >= distinct:
            raise StoreError("compact blob: an id index points past the id table")
        ids = _unpack_planes(payload[4:], distinct, width)[index]
        steps = payload[4 + distinct * width + n * iw:]
    elif layout == 1:  # ids bit-packed ahead of the code steps
        nid = (n * bits + 7) // 8
        ids = _unpack_bits(rest[:nid], n, bits)
        steps = _inflate(rest[nid:], n)
        if len(steps) != n:
            raise StoreError(f"compact blob: {len(steps)} codes for {n} entries")
    else:
        raise StoreError(f"compact blob: unknown id layout {layout}")
    codes = np.cumsum(np.frombuffer(steps, dtype=np.uint8).reshape(rows, k).astype(np.int64), axis=1)
    lps = (head[:, None] - COMPACT_A * np.expm1(codes * COMPACT_STEP)).astype(np.float32)
    return ids.astype(np.int32).reshape(rows, k), lps, tgt


def encode_entry(ids, logprobs, target_logprob, *, encoding: str = "float16", vocab_size: int | None = None) -> bytes:
    """One sequence's answer -> blob. ``vocab_size`` sets the id width (default: what the largest id needs)."""
    if encoding not in _ENC_CODE:
        raise StoreError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    ids, logprobs, target = _check(ids, logprobs, target_logprob)
    rows, k = ids.shape
    vocab = int(vocab_size) if vocab_size else int(ids.max()) + 1
    if ids.max() >= vocab:
        raise StoreError(f"ids: token id {int(ids.max())} outside the vocabulary of {vocab}")
    if encoding == "float16":
        width = id_bytes(vocab)
        raw = ids.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :width]
        body = (raw.tobytes() + logprobs.astype("<f2").tobytes() + target.astype("<f2").tobytes())
    else:
        width, body = _encode_compact(ids, logprobs, target, vocab)
    return HEADER.pack(MAGIC, _ENC_CODE[encoding], width, 0, rows, k) + body


def decode_entry(blob, k: int | None = None) -> Entry:
    """Blob -> Entry, cut to the first ``k`` columns when given (k <= the blob's k). Raises StoreError."""
    blob = bytes(blob)
    if len(blob) < HEADER_SIZE:
        raise StoreError(f"blob of {len(blob)} bytes is shorter than its header")
    magic, code, width, _, rows, kk = HEADER.unpack_from(blob)
    if magic != MAGIC or code not in _CODE_ENC:
        raise StoreError(f"not a top-k store blob (magic {magic!r}, encoding {code})")
    if rows < 1 or kk < 1 or rows * kk > MAX_ELEMENTS:
        raise StoreError(f"implausible blob size rows={rows} k={kk}")
    if k is not None and not 1 <= k <= kk:
        raise StoreError(f"k={k} asked of an entry with k={kk}")
    n = rows * kk
    body = memoryview(blob)[HEADER_SIZE:]
    try:
        if _CODE_ENC[code] == "float16":
            if not 1 <= width <= 4 or len(body) != n * width + 2 * n + 2 * rows:
                raise StoreError(f"float16 blob: {len(body)} payload bytes do not fit rows={rows} k={kk}")
            raw = np.zeros((n, 4), dtype=np.uint8)
            raw[:, :width] = np.frombuffer(body, dtype=np.uint8, count=n * width).reshape(n, width)
            ids = raw.view("<u4").reshape(rows, kk).astype(np.int32)
            off = n * width
            lps = np.frombuffer(body, dtype="<f2", count=n, offset=off).astype(np.float32).reshape(rows, kk)
            tgt = np.frombuffer(body, dtype="<f2", count=rows, offset=off + 2 * n).astype(np.float32)
        else:
            ids, lps, tgt = _decode_compact(body, rows, kk, width)
    except (ValueError, zlib.error) as e:  # truncated buffers, bad zlib stream
        if isinstance(e, StoreError):
            raise
        raise StoreError(f"malformed blob: {e}") from None
    if k is not None and k < kk:
        ids, lps = ids[:, :k], lps[:, :k]
    return Entry(np.ascontiguousarray(ids), np.ascontiguousarray(lps), np.ascontiguousarray(tgt))


def blob_shape(blob) -> tuple[str, int, int]:
    """(encoding, rows, k) of a blob, from its header."""
    magic, code, _, _, rows, k = HEADER.unpack_from(bytes(blob[:HEADER_SIZE]))
    if magic != MAGIC or code not in _CODE_ENC:
        raise StoreError("not a top-k store blob")
    return _CODE_ENC[code], rows, k


# ---------------------------------------------------------------------------------------------------------
# storage

_SCHEMA = """
CREATE TABLE IF NOT EXISTS topk (
    id INTEGER PRIMARY KEY,
    teacher TEXT NOT NULL,
    seq BLOB NOT NULL,
    k INTEGER NOT NULL,
    blob BLOB NOT NULL,
    checksum BLOB NOT NULL,
    size INTEGER NOT NULL,
    used INTEGER NOT NULL,
    UNIQUE (teacher, seq, k)
);
CREATE INDEX IF NOT EXISTS topk_used ON topk (used);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', 1), ('bytes', 0);
CREATE TRIGGER IF NOT EXISTS topk_ins AFTER INSERT ON topk BEGIN
    UPDATE meta SET value = value + NEW.size WHERE key = 'bytes'; END;
CREATE TRIGGER IF NOT EXISTS topk_del AFTER DELETE ON topk BEGIN
    UPDATE meta SET value = value - OLD.size WHERE key = 'bytes'; END;
CREATE TRIGGER IF NOT EXISTS topk_upd AFTER UPDATE OF size ON topk BEGIN
    UPDATE meta SET value = value - OLD.size + NEW.size WHERE key = 'bytes'; END;
"""


def _checksum(teacher: str, seq: bytes, k: int, blob: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=16, person=b"ddk-topk-entry")
    h.update(teacher.encode("utf-8") + b"\0" + seq + struct.pack("<I", k))
    h.update(blob)
    return h.digest()


class TopkStore:
    """A top-k store in one SQLite file (see the module docstring). ``encoding`` and ``vocab_size`` apply to
    writes; reads decode whatever encoding an entry was written in."""

    def __init__(self, path: str | Path, *, encoding: str = "float16", vocab_size: int | None = None,
                 max_bytes: int | None = None, busy_timeout_s: float = 30.0) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.encoding, self.vocab_size = encoding, vocab_size
        self.max_bytes = None if max_bytes is None else int(max_bytes)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), timeout=busy_timeout_s, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: consistent after any crash
        with self._lock:
            self._db.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")

    # -- helpers ------------------------------------------------------------------------------------------
    class _Tx:
        def __init__(self, store: "TopkStore") -> None:
            self.s = store

        def __enter__(self):
            self.s._lock.acquire()
            try:
                self.s._db.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.s._lock.release()
                raise
            return self.s._db

        def __exit__(self, exc_type, *exc) -> None:
            try:
                self.s._db.execute("ROLLBACK" if exc_type else "COMMIT")
            finally:
                self.s._lock.release()

    def _write(self) -> "_Tx":
        return TopkStore._Tx(self)

    def encode(self, ids, logprobs, target_logprob) -> bytes:
        """A blob in this store's encoding (pure)."""
        return encode_entry(ids, logprobs, target_logprob, encoding=self.encoding, vocab_size=self.vocab_size)

    # -- reads --------------------------------------------------------------------------------------------
    def get(self, teacher: str, token_ids, k: int) -> Entry | None:
        """The entry for ``token_ids`` scored by ``teacher`` with at least ``k`` columns, cut to k; None: a miss."""
        return self.get_many(teacher, [token_ids], k)[0]

    def get_many(self, teacher: str, sequences: Sequence, k: int) -> list[Entry | None]:
        """:meth:`get` for each sequence, in one read transaction (and one write marking the hits used)."""
        k = int(k)
        out: list[Entry | None] = []
        used, corrupt = [], []
        with self._lock:
            self._db.execute("BEGIN")
            try:
                for token_ids in sequences:
                    seq = sequence_key(token_ids)
                    rows = len(token_ids) - 1
                    hit = None
                    for rid, kk, blob, checksum in self._db.execute(
                            "SELECT id, k, blob, checksum FROM topk WHERE teacher = ? AND seq = ? AND k >= ? "
                            "ORDER BY k", (teacher, seq, k)):
                        hit = self._verified(rid, teacher, seq, kk, blob, checksum, rows, k)
                        if hit is None:
                            corrupt.append(rid)
                            continue
                        used.append(rid)
                        break
                    out.append(hit)
            finally:
                self._db.execute("COMMIT")
        if used or corrupt:
            self._touch(used, corrupt)
        return out

    def has_many(self, teacher: str, sequences: Sequence, k: int) -> list[bool]:
        """Whether an entry with at least ``k`` columns is stored for each sequence: the keys alone, no blob read
        or checked and nothing marked used (what resuming a precompute and counting a store's gaps need; a
        corrupt entry still counts until a :meth:`get` finds it out)."""
        k = int(k)
        with self._lock:
            self._db.execute("BEGIN")
            try:
                return [self._db.execute("SELECT 1 FROM topk WHERE teacher = ? AND seq = ? AND k >= ? LIMIT 1",
                                         (teacher, sequence_key(t), k)).fetchone() is not None for t in sequences]
            finally:
                self._db.execute("COMMIT")

    def _verified(self, rid, teacher, seq, kk, blob, checksum, rows, k) -> Entry | None:
        if _checksum(teacher, seq, kk, blob) != checksum:
            log.warning("top-k store %s: entry %d fails its checksum; treated as a miss and dropped", self.path, rid)
            return None
        try:
            entry = decode_entry(blob, k)
        except StoreError as e:
            log.warning("top-k store %s: entry %d does not decode (%s); treated as a miss and dropped",
                        self.path, rid, e)
            return None
        if entry.ids.shape[0] != rows:
            log.warning("top-k store %s: entry %d has %d rows for a sequence of %d; treated as a miss",
                        self.path, rid, entry.ids.shape[0], rows + 1)
            return None
        return entry

    def _touch(self, used: list[int], corrupt: list[int]) -> None:
        now = time.time_ns()
        try:
            with self._write() as db:
                db.executemany("UPDATE topk SET used = ? WHERE id = ?", [(now, r) for r in used])
                db.executemany("DELETE FROM topk WHERE id = ?", [(r,) for r in corrupt])
        except sqlite3.OperationalError as e:  # busy past the timeout: the LRU order is only a hint
            log.warning("top-k store %s: could not mark entries used (%s)", self.path, e)

    # -- writes -------------------------------------------------------------------------------------------
    def put(self, teacher: str, token_ids, ids, logprobs, target_logprob) -> bool:
        """Store one sequence's answer (encoded in this store's encoding); False when it was not stored (an
        entry with at least this k is there already, or the blob alone exceeds max_bytes)."""
        return self.put_blobs(teacher, [(token_ids, self.encode(ids, logprobs, target_logprob))]) == 1

    def put_many(self, teacher: str, items: Iterable) -> int:
        """``items``: (token_ids, ids, logprobs, target_logprob) tuples, stored in one transaction; returns how
        many were stored."""
        return self.put_blobs(teacher, [(t, self.encode(i, lp, tg)) for t, i, lp, tg in items])

    def put_blob(self, teacher: str, token_ids, blob: bytes) -> bool:
        """Store a blob made by :meth:`encode` / :func:`encode_entry`."""
        return self.put_blobs(teacher, [(token_ids, blob)]) == 1

    def put_blobs(self, teacher: str, items: Sequence[tuple]) -> int:
        stored = 0
        now = time.time_ns()
        with self._write() as db:
            for token_ids, blob in items:
                blob = bytes(blob)
                _, rows, k = blob_shape(blob)
                if rows != len(token_ids) - 1:
                    raise StoreError(f"blob has {rows} rows for a sequence of {len(token_ids)} ids")
                if self.max_bytes is not None and len(blob) > self.max_bytes:
                    continue
                seq = sequence_key(token_ids)
                if db.execute("SELECT 1 FROM topk WHERE teacher = ? AND seq = ? AND k >= ? LIMIT 1",
                              (teacher, seq, k)).fetchone():
                    continue  # a larger (or equal) k serves this one
                db.execute("DELETE FROM topk WHERE teacher = ? AND seq = ? AND k < ?", (teacher, seq, k))
                db.execute("INSERT INTO topk (teacher, seq, k, blob, checksum, size, used) VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (teacher, seq, k, blob, _checksum(teacher, seq, k, blob), len(blob), now))
                stored += 1
            if stored and self.max_bytes is not None:
                self._evict(db)
        return stored

    def _evict(self, db) -> None:
        total = db.execute("SELECT value FROM meta WHERE key = 'bytes'").fetchone()[0]
        if total <= self.max_bytes:
            return
        excess, victims = total - self.max_bytes, []
        for rid, size in db.execute("SELECT id, size FROM topk ORDER BY used, id"):
            victims.append((rid,))
            excess -= size
            if excess <= 0:
                break
        db.executemany("DELETE FROM topk WHERE id = ?", victims)
        log.debug("top-k store %s: evicted %d entries", self.path, len(victims))

    # -- the rest -----------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """``{"entries", "bytes" (sum of the blobs), "max_bytes", "encoding", "path"}``."""
        with self._lock:
            entries = self._db.execute("SELECT COUNT(*) FROM topk").fetchone()[0]
            total = self._db.execute("SELECT value FROM meta WHERE key = 'bytes'").fetchone()[0]
        return {"entries": int(entries), "bytes": int(total), "max_bytes": self.max_bytes,
                "encoding": self.encoding, "path": str(self.path)}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "TopkStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
