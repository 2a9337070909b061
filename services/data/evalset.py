"""Evaluation sets and their error bars: which validation windows an evaluation scores, and how sure the
per-domain log-ratio is. numpy only, no torch; the sets read the cache's validation tokens and document table
(``PackedDomain.val_docs``), the rest is pure. docs/architecture.md, "Evaluation sets and error bars".

**The sample.** A domain's validation set is a sequence of documents (``lengths``: tokens of each, its EOS
included; ``keys``: a 64-bit content hash of each, so the choice does not depend on file order). A document of
``L = seq_len + 1`` tokens or more offers ``len // L`` non-overlapping *slots* ``[j L, (j + 1) L)``; a shorter one
offers one slot, itself, scored whole (the block is padded, the padding never scored). :func:`choose_windows`
orders the documents by a seeded hash of their keys and takes windows in rounds: round 0 one window from every
document in that order, round 1 a second window from the documents that have one, and so on, until the budget
(blocks, or scored predictions) is spent. So the set holds as many distinct documents as the budget allows,
spread over the whole validation set, and it is the same at every evaluation, on every rank and across resumes.

**Conversation domains** (``domain.val_mask``): every validation conversation is one document and one window
(its padded row; it fits in ``L`` tokens), and only its assistant tokens are scored (``EvalSet.mask``); a
``max_predictions`` budget still counts ``length - 1`` per window.

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
from dataclasses import dataclass
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


# ---------------------------------------------------------------------------------------------------------
# evaluation sets of a domain

PARTS = ("all", "steer", "score")  # eval.documents: every validation document, or one half (ddk compare)


@dataclass
class EvalSet:
    """One domain's evaluation blocks. ``blocks [n, L]`` (int64, padded beyond ``lengths``), ``lengths [n]``
    (tokens of each block that are scored: ``lengths - 1`` predictions), ``docs [n]`` (the document each block
    comes from, its index in the validation set). ``note``: how the set was drawn when it is not as asked (a
    half with no documents, say). ``mask [n, L]`` (bool; conversation domains): the tokens that are labels --
    then only they are scored (prediction ``j`` counts where ``mask[j + 1]``), not every token below ``lengths``."""

    blocks: np.ndarray
    lengths: np.ndarray
    docs: np.ndarray
    note: str = ""
    mask: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def documents(self) -> int:
        return int(len(np.unique(self.docs)))

    @property
    def predictions(self) -> int:
        if self.mask is not None:
            return int(np.sum(self.mask[:, 1:]))
        return int(np.sum(self.lengths - 1))

    def scored(self) -> np.ndarray:
        """bool ``[n, L - 1]``: the predictions that count (prediction ``j`` is of token ``j + 1``)."""
        if self.mask is not None:
            return np.asarray(self.mask[:, 1:], dtype=bool)
        return np.arange(self.blocks.shape[1] - 1)[None, :] < (self.lengths - 1)[:, None]

    def part(self, a: int, b: int) -> "EvalSet":
        return EvalSet(self.blocks[a:b], self.lengths[a:b], self.docs[a:b], self.note,
                       None if self.mask is None else self.mask[a:b])


def full_blocks(blocks) -> EvalSet:
    """Whole blocks ``[n, L]``, each its own document (blocks given directly, not drawn from a domain)."""
    arr = np.asarray(blocks, dtype=np.int64)
    if arr.ndim != 2:
        raise ValueError(f"blocks must be [n, L], got shape {arr.shape}")
    return EvalSet(arr, np.full(len(arr), arr.shape[1], np.int64), np.arange(len(arr)))


def validation_documents(domain) -> tuple[np.ndarray, np.ndarray]:
    """``(lengths, keys)`` of a domain's validation documents in stream order: the cache's document table
    (``val_docs``), or, for validation data without one (blocks given as a plain array), every block a
    document."""
    docs = getattr(domain, "val_docs", None)
    if docs is not None:
        return np.asarray(docs["lengths"], dtype=np.int64), np.asarray(docs["keys"], dtype=np.uint64)
    val = np.asarray(domain.val)
    return (np.full(len(val), val.shape[1], np.int64),
            np.array([content_key(row) for row in val], dtype=np.uint64))


def _val_tokens(domain, a: int, b: int) -> np.ndarray:
    val = domain.val
    if hasattr(val, "tokens"):
        return np.asarray(val.tokens(a, b))
    return np.asarray(val).reshape(-1)[a:b]


def evaluation_set(domain, sequences: int | None = 32, tokens: int | None = None, seed: int = 0,
                   part: str = "all") -> EvalSet:
    """The domain's evaluation set: ``sequences`` windows (or, with ``tokens``, windows until that many
    predictions), drawn from ``part`` of its validation documents (:data:`PARTS`; a half with no documents
    falls back to all of them, said in ``note``). Deterministic."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    L = int(domain.val.shape[1])
    lengths, keys = validation_documents(domain)
    allowed, note = None, ""
    if part != "all":
        steer = steering_half(keys)
        allowed = steer if part == "steer" else ~steer
        if not (allowed & (lengths >= 2)).any():
            allowed, note = None, f"no validation document in the {part} half: every document used"
    windows = choose_windows(lengths, keys, L, None if tokens else sequences, tokens, seed, allowed)
    if getattr(domain, "val_mask", None) is not None:  # conversations: one per validation row, padded, masked
        rows = [w.doc for w in windows]
        return EvalSet(np.asarray(domain.val[rows], dtype=np.int64).reshape(len(rows), L),
                       np.array([w.length for w in windows], np.int64), np.array(rows, np.int64), note,
                       np.asarray(domain.val_mask[rows], dtype=bool).reshape(len(rows), L))
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    pad = int((getattr(domain, "info", None) or {}).get("eos", 0) or 0)
    blocks = np.full((len(windows), L), pad, dtype=np.int64)
    for i, w in enumerate(windows):
        a = int(offsets[w.doc]) + w.start
        blocks[i, :w.length] = _val_tokens(domain, a, a + w.length)
    return EvalSet(blocks, np.array([w.length for w in windows], np.int64),
                   np.array([w.doc for w in windows], np.int64), note)


def validation_windows(domain) -> EvalSet:
    """Every slot of every validation document (:func:`evaluation_set` without a budget): the blocks any
    evaluation set of the domain is drawn from (what ``ddk teacher precompute`` scores for validation)."""
    return evaluation_set(domain, sequences=None, tokens=None)


def evaluation_sets(domains: dict, eval_cfg) -> dict[str, EvalSet]:
    """``{domain: EvalSet}`` for a train config's ``eval`` section (``sequences_per_domain``,
    ``tokens_per_domain``, ``seed``, ``documents``)."""
    return {n: evaluation_set(d, eval_cfg.sequences_per_domain, getattr(eval_cfg, "tokens_per_domain", None),
                              int(getattr(eval_cfg, "seed", 0)), getattr(eval_cfg, "documents", "all"))
            for n, d in domains.items()}


def sets_fingerprint(sets: dict[str, EvalSet]) -> str:
    return block_fingerprint([(n, s.blocks, s.lengths if s.mask is None else np.concatenate(
        [s.lengths, np.flatnonzero(s.mask.reshape(-1))])) for n, s in sorted(sets.items())])


def coverage(sets: dict[str, EvalSet]) -> dict[str, dict]:
    """Per domain: blocks, distinct documents and predictions the evaluation set covers."""
    return {n: {"blocks": len(s), "documents": s.documents, "tokens": s.predictions} for n, s in sets.items()}
