"""Evaluation sets and their error bars: which validation windows an evaluation scores, and how sure the
per-domain log-ratio is. Pure (numpy only, no I/O); docs/architecture.md, "Evaluation sets and error bars".

**The sample.** A domain's validation set is a sequence of documents (``lengths``: tokens of each, its EOS
included; ``keys``: a 64-bit content hash of each, so the choice does not depend on file order). A document of
``L = seq_len + 1`` tokens or more offers ``len // L`` non-overlapping *slots* ``[j L, (j + 1) L)``; a shorter one
offers one slot, itself, scored whole (the block is padded, the padding never scored). :func:`choose_windows`
orders the documents by a seeded hash of their keys and takes windows in rounds: round 0 one window from every
document in that order, round 1 a second window from the documents that have one, and so on, until the budget
(blocks, or scored predictions) is spent. So the set holds as many distinct documents as the budget allows,
spread over the whole validation set, and it is the same at every evaluation, on every rank and across resumes.

**The halves.** :func:`steering_half` splits the documents in two by a hash of their keys alone (no seed: every
arm of ``ddk compare`` sees the same halves): the runs steer by one half, ``ddk compare`` scores on the other.

**The error bar** (:func:`log_ratio_se`): the log-ratio ``log(PPL_S / PPL_T) = (S - T) / n`` with ``S``, ``T``
the student's and teacher's summed next-token losses and ``n`` the predictions, is a ratio estimator over
documents (blocks of one document are not independent, documents are the units sampled). With ``d_i = S_i - T_i``
and ``n_i`` per document, ``m`` documents and ``R = sum d_i / sum n_i``, the delta method gives

    SE(R) = sqrt( m / (m - 1) * sum_i (d_i - R n_i)^2 ) / sum_i n_i

None for one document (no spread to measure), 0 for identical documents.
"""

from __future__ import annotations

import hashlib
import math
from typing import NamedTuple

import numpy as np

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def mix64(x: np.ndarray, salt: int) -> np.ndarray:
    """splitmix64 of ``x ^ salt`` (uint64, element-wise): a well-spread, seeded hash of 64-bit keys."""
    with np.errstate(over="ignore"):
        z = (np.asarray(x, dtype=np.uint64) ^ np.uint64(salt & 0xFFFFFFFFFFFFFFFF)) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) & _M64


def content_key(tokens: np.ndarray) -> int:
    """A 64-bit key of a document from its token ids (for validation data without stored keys)."""
    return int.from_bytes(hashlib.sha1(np.ascontiguousarray(tokens, dtype=np.int64).tobytes()).digest()[:8], "big")


def steering_half(keys: np.ndarray) -> np.ndarray:
    """``True`` for the documents in the steering half (about half of them, by a hash of the key alone)."""
    return mix64(keys, 0x5EED_57EE) < np.uint64(1 << 63)


class Window(NamedTuple):
    doc: int     # the document's index in the validation set
    start: int   # its first token, relative to the document's start
    length: int  # tokens in the window: L, or the whole document when it is shorter


def choose_windows(lengths: np.ndarray, keys: np.ndarray, block_len: int, max_blocks: int | None = None,
                   max_predictions: int | None = None, seed: int = 0,
                   allowed: np.ndarray | None = None) -> list[Window]:
    """The evaluation windows of one domain (module docstring): documents in seeded-hash order, one window each
    per round, until ``max_blocks`` windows or ``max_predictions`` scored predictions (``length - 1`` each) are
    reached (both None: every slot of every document). ``allowed``: a boolean mask of the documents to draw
    from (a half). Documents of fewer than 2 tokens give no prediction and are skipped."""
    lengths = np.asarray(lengths, dtype=np.int64)
    keys = np.asarray(keys, dtype=np.uint64)
    if lengths.shape != keys.shape:
        raise ValueError(f"lengths {lengths.shape} and keys {keys.shape} differ")
    if block_len < 2:
        raise ValueError("block_len must be at least 2")
    ok = lengths >= 2
    if allowed is not None:
        ok &= np.asarray(allowed, dtype=bool)
    docs = np.flatnonzero(ok)
    order = docs[np.lexsort((docs, mix64(keys[docs], seed)))]  # seeded hash order, ties by index
    slots = np.maximum(1, lengths[order] // block_len)
    first = mix64(keys[order], seed ^ 0x51075) % slots.astype(np.uint64)  # each document's first slot
    out: list[Window] = []
    predictions = 0
    for r in range(int(slots.max()) if len(slots) else 0):
        for i in np.flatnonzero(slots > r):
            if (max_blocks is not None and len(out) >= max_blocks) or \
                    (max_predictions is not None and predictions >= max_predictions):
                return out
            d, s = int(order[i]), int(slots[i])
            length = int(min(block_len, lengths[d]))
            out.append(Window(d, int((int(first[i]) + r) % s) * block_len, length))
            predictions += length - 1
    return out


def per_document(docs: np.ndarray, *values: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per-block ``values`` summed per document (documents in ascending order of ``docs``)."""
    _, inverse = np.unique(np.asarray(docs), return_inverse=True)
    n = int(inverse.max()) + 1 if len(inverse) else 0
    return tuple(np.bincount(inverse, weights=np.asarray(v, dtype=np.float64), minlength=n) for v in values)


def log_ratio_se(student: np.ndarray, teacher: np.ndarray, predictions: np.ndarray) -> float | None:
    """Standard error of ``(sum student - sum teacher) / sum predictions`` by the grouped delta method (module
    docstring): per-document summed losses and prediction counts in; None for fewer than 2 documents."""
    s, t, n = (np.asarray(a, dtype=np.float64) for a in (student, teacher, predictions))
    m = len(n)
    if m < 2 or n.sum() <= 0:
        return None
    d = s - t
    r = d.sum() / n.sum()
    e = d - r * n
    return float(math.sqrt(m / (m - 1) * float((e * e).sum())) / n.sum())


def block_fingerprint(parts: list[tuple[str, np.ndarray, np.ndarray]]) -> str:
    """16 hex digits over ``(domain, blocks, lengths)`` of every domain: another validation file, seed or budget
    gives another fingerprint."""
    h = hashlib.sha256()
    for name, blocks, lengths in parts:
        h.update(name.encode() + b"\0")
        h.update(np.ascontiguousarray(blocks, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(lengths, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]
