"""Cross-tokenizer alignment by byte spans (issue 29, the pure part): spans, groups, shared vocabulary, bits/byte.

The student and the teacher read the same text, each through its own tokenizer. Every token covers a span of the
text's UTF-8 bytes; where both tokenisations have a token boundary at the same byte, the two sequences can be cut
into **aligned groups**: a contiguous run of student tokens and a contiguous run of teacher tokens covering exactly
the same bytes. The groups are the finest such cut (every common boundary ends a group). At a group's end b both
models have read exactly ``text[:b]``, so the student's next-token distribution after its last token of the group
and the teacher's after its own last token are both distributions over "what comes after byte b", and the loss
(``ddk.trainer.xtok_loss``) compares them. The rule and a worked example: docs/architecture.md, "Cross-tokenizer
alignment".

Pure: lists and numpy arrays in, numpy arrays out; no tokenizer library is imported here. What a tokenizer gives
(its char offsets from ``return_offsets_mapping``, its token pieces, its special-tokens mask, its vocabulary and
the ``decoder`` section of its ``tokenizer.json``) is passed in by the caller.

Byte spans (:func:`byte_spans`) are half-open ``[start, end)`` over the text's UTF-8 bytes, non-decreasing, and they
**tile** the text: the non-empty spans, in order, start at 0, each starts where the previous one ended, and the last
ends at the text's byte length. Special tokens (and tokens that end inside a character they share with the next
token) get an empty span ``(c, c)`` at the current cursor; an empty-span token belongs to the group of the next
non-empty token.
"""

from __future__ import annotations

import math
from typing import Iterable, NamedTuple, Sequence

import numpy as np

SCHEMES = ("byte_level", "sentencepiece", "plain")
METASPACE = "\u2581"  # SentencePiece's space marker '▁'


# ---------------------------------------------------------------------------------------------------------
# token pieces -> bytes

def byte_level_table() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE pieces are strings of these characters).

    The printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, 0x7F-0xA0, 0xAD) map to
    U+0100 onwards in byte order, so the space 0x20 is 'Ġ' (U+0120) and '\\n' 0x0A is 'Ċ' (U+010A).
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


_BYTE_LEVEL_DECODE = {ch: b for b, ch in byte_level_table().items()}


def piece_bytes(piece: str, scheme: str) -> bytes | None:
    """The bytes a vocabulary piece stands for, or None when it stands for none (not decodable in ``scheme``).

    ``byte_level``: each character is one byte through :func:`byte_level_table` ('Ġ' -> b' ').
    ``sentencepiece``: '▁' is a space, ``<0xNN>`` (byte fallback) is that one byte, anything else its UTF-8.
    ``plain``: the piece's UTF-8 as it is.
    """
    if scheme == "byte_level":
        try:
            return bytes(_BYTE_LEVEL_DECODE[ch] for ch in piece)
        except KeyError:
            return None
    if scheme == "sentencepiece":
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return piece.replace(METASPACE, " ").encode("utf-8")
    if scheme == "plain":
        return piece.encode("utf-8")
    raise ValueError(f"scheme: unknown {scheme!r} (known: {', '.join(SCHEMES)})")


def _decoder_types(decoder: dict | None) -> list[dict]:
    if not decoder:
        return []
    if decoder.get("type") == "Sequence":
        return [d for sub in decoder.get("decoders", []) for d in _decoder_types(sub)]
    return [decoder]


def piece_scheme(decoder: dict | None) -> str:
    """The piece scheme from the ``decoder`` section of a ``tokenizer.json`` (a dict, or None when it has none).

    ByteLevel -> ``byte_level``; Metaspace, ByteFallback or a Replace of '▁' -> ``sentencepiece``; no decoder ->
    ``plain``. Any other decoder (WordPiece's '##', CTC, ...) is a ValueError: its pieces do not concatenate back
    to the text's bytes, so byte spans cannot be checked against them.
    """
    parts = _decoder_types(decoder)
    types = {d.get("type") for d in parts}
    if "ByteLevel" in types:
        return "byte_level"
    if "Metaspace" in types or "ByteFallback" in types or any(
            d.get("type") == "Replace" and (d.get("pattern") or {}).get("String") == METASPACE for d in parts):
        return "sentencepiece"
    if not parts:
        return "plain"
    raise ValueError(f"decoder {sorted(t for t in types if t)}: pieces of this tokenizer cannot be mapped to bytes")


# ---------------------------------------------------------------------------------------------------------
# char offsets -> byte spans

def char_to_byte_table(text: str) -> np.ndarray:
    """``table[i]`` = the UTF-8 byte offset of character i (``table[len(text)]`` = the text's byte length)."""
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # code points (a lone surrogate raises)
    lengths = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)  # UTF-8 bytes per character
    return np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(lengths)])


def char_to_byte_offsets(text: str, offsets: Sequence[Sequence[int]]) -> np.ndarray:
    """Character offsets ``[(start, end), ...]`` (``return_offsets_mapping``) as UTF-8 byte offsets, ``[n, 2]``.

    A token that covers part of a multi-byte character (a byte-level or byte-fallback piece) has that whole
    character's offsets; so do its neighbours that cover the rest of it (see :func:`byte_spans`).
    """
    table = char_to_byte_table(text)
    arr = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    if arr.size and (arr.min() < 0 or arr.max() > len(text) or (arr[:, 1] < arr[:, 0]).any()):
        raise ValueError(f"offsets out of range for a text of {len(text)} characters")
    return table[arr]


def byte_spans(text: str, offsets: Sequence[Sequence[int]], pieces: Sequence[str] | None = None,
               scheme: str | None = None, special: Sequence[int | bool] | None = None) -> np.ndarray:
    """Tiling UTF-8 byte spans ``[n, 2]`` (int64) of one encoding of ``text`` (module docstring: what tiling is).

    ``offsets``: the encoding's character offsets; ``special``: its special-tokens mask (1 = special: an empty
    span; default none). With ``pieces`` (the encoding's token strings) and their ``scheme``, each token's byte
    length is its piece's (:func:`piece_bytes`); when those lengths add up to the text's bytes exactly, the spans
    are their running sums -- exact, also for byte pieces inside one character and for whitespace that the
    offsets leave out (a ByteLevel post-processor with ``trim_offsets``). Each such span must touch the token's
    own byte offsets (ValueError otherwise: the pieces are not this text's). Otherwise (a normaliser changed the
    text, or no pieces given) the spans come from the offsets alone:

    - a token whose offsets reach past the start of the next token's (they share a character, as the byte
      pieces of one multi-byte character do) gets an empty span: it cannot end a group;
    - every other token spans from the cursor (the previous span's end) to its own end, so a gap the offsets
      leave (trimmed or dropped whitespace) goes to the token after it; a gap after the last token goes to it.

    The offsets rule never claims a boundary that is not one; it only loses boundaries inside characters (so
    groups can be coarser than with pieces).
    """
    raw = char_to_byte_offsets(text, offsets)
    n = raw.shape[0]
    n_bytes = len(text.encode("utf-8"))
    is_special = np.zeros(n, dtype=bool) if special is None else np.asarray(special, dtype=bool).reshape(-1)
    if is_special.shape[0] != n:
        raise ValueError(f"special mask has {is_special.shape[0]} entries for {n} tokens")
    if pieces is not None:
        if len(pieces) != n:
            raise ValueError(f"{len(pieces)} pieces for {n} offsets")
        if scheme is None:
            raise ValueError("scheme is required with pieces")
        decoded = [b"" if sp else piece_bytes(p, scheme) for p, sp in zip(pieces, is_special)]
        if all(d is not None for d in decoded) and sum(len(d) for d in decoded) == n_bytes:
            ends = np.cumsum([len(d) for d in decoded], dtype=np.int64)
            spans = np.stack([ends - np.array([len(d) for d in decoded], dtype=np.int64), ends], axis=1)
            spans = spans.reshape(n, 2)
            apart = ~is_special & ((spans[:, 0] > raw[:, 1]) | (raw[:, 0] > spans[:, 1]))
            if apart.any():
                i = int(np.flatnonzero(apart)[0])
                raise ValueError(f"token {i} ({pieces[i]!r}): piece bytes [{spans[i, 0]}, {spans[i, 1]}) do not "
                                 f"touch its offsets [{raw[i, 0]}, {raw[i, 1]}) in the text")
            return spans
    spans = np.zeros((n, 2), dtype=np.int64)
    regular = np.flatnonzero(~is_special)
    if len(regular):
        r = raw[regular]
        ends = r[:, 1].copy()
        ends[:-1][r[1:, 0] < r[:-1, 1]] = 0  # shares a character with the next token: no boundary here
        ends = np.maximum.accumulate(ends)     # from the cursor (the previous end) on: gaps go to the next token
        if ends[-1] > n_bytes:
            raise ValueError("offsets run past the text")
        ends[-1] = n_bytes                     # a trailing gap goes to the last token
        spans[regular, 1] = ends
        spans[regular, 0] = np.concatenate([np.zeros(1, dtype=np.int64), ends[:-1]])
    # specials: an empty span at the cursor where they stand (the end of the regular token before, or 0)
    special_idx = np.flatnonzero(is_special)
    if len(special_idx):
        before = np.searchsorted(regular, special_idx) - 1
        spans[special_idx, 0] = spans[special_idx, 1] = np.where(before >= 0, spans[regular[before], 1], 0)
    return spans


def spans_from_pieces(pieces: Sequence[str], scheme: str, special: Sequence[int | bool] | None = None) -> np.ndarray:
    """Byte spans ``[n, 2]`` from the pieces alone (running sums of their byte lengths; specials empty).

    For a token sequence without its text (the student's cached token ids), when the pieces concatenate to the
    text, as byte-level and byte-fallback pieces do. ValueError for a piece that stands for no bytes.
    """
    is_special = [False] * len(pieces) if special is None else [bool(s) for s in special]
    lengths = []
    for p, sp in zip(pieces, is_special):
        b = b"" if sp else piece_bytes(p, scheme)
        if b is None:
            raise ValueError(f"piece {p!r} stands for no bytes in scheme {scheme!r}")
        lengths.append(len(b))
    ends = np.cumsum(np.asarray(lengths, dtype=np.int64))
    return np.stack([ends - np.asarray(lengths, dtype=np.int64), ends], axis=1).reshape(-1, 2)


def vocab_byte_lengths(vocab: dict[str, int], scheme: str, special: Iterable[str] = ()) -> np.ndarray:
    """``[V]`` int64: the byte length of each id's piece (0 for ``special`` pieces, -1 for pieces that stand for
    no bytes), V = the largest id + 1. A lookup table for :func:`spans_from_ids`."""
    special = set(special)
    out = np.full(max(vocab.values(), default=-1) + 1, -1, dtype=np.int64)
    for piece, i in vocab.items():
        b = b"" if piece in special else piece_bytes(piece, scheme)
        if b is not None:
            out[int(i)] = len(b)
    return out


def spans_from_ids(ids: Sequence[int] | np.ndarray, byte_lengths: np.ndarray) -> np.ndarray:
    """:func:`spans_from_pieces` from token ids and a :func:`vocab_byte_lengths` table, vectorised (the student's
    cached blocks). ValueError for an id whose piece stands for no bytes."""
    lengths = np.asarray(byte_lengths, dtype=np.int64)[np.asarray(ids, dtype=np.int64).reshape(-1)]
    if (lengths < 0).any():
        raise ValueError(f"token id {int(np.asarray(ids).reshape(-1)[np.argmax(lengths < 0)])} stands for no bytes")
    ends = np.cumsum(lengths)
    return np.stack([ends - lengths, ends], axis=1)


def check_tiling(spans: np.ndarray, n_bytes: int | None = None) -> None:
    """ValueError unless ``spans`` tile ``[0, n_bytes)`` (module docstring); ``n_bytes=None``: their own end."""
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    expected = np.concatenate([np.zeros(1, dtype=np.int64), spans[:-1, 1]])  # each starts where the last ended
    bad = (spans[:, 0] != expected) | (spans[:, 1] < spans[:, 0])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"span {i} [{spans[i, 0]}, {spans[i, 1]}) does not continue at byte {expected[i]}")
    cursor = int(spans[-1, 1]) if len(spans) else 0
    if n_bytes is not None and cursor != n_bytes:
        raise ValueError(f"spans end at byte {cursor}, the text has {n_bytes}")


# ---------------------------------------------------------------------------------------------------------
# aligned groups

class Groups(NamedTuple):
    """Aligned groups, ``[G]`` int64 arrays each: group g is student tokens ``[student_start, student_end)`` and
    teacher tokens ``[teacher_start, teacher_end)``, both covering bytes ``[byte_start, byte_end)``."""

    student_start: np.ndarray
    student_end: np.ndarray
    teacher_start: np.ndarray
    teacher_end: np.ndarray
    byte_start: np.ndarray
    byte_end: np.ndarray

    def __len__(self) -> int:  # the number of groups (not the tuple's six fields)
        return int(self.byte_end.shape[0])

    def as_tuples(self) -> list[tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]:
        """``[((s0, s1), (t0, t1), (b0, b1)), ...]``: each group's student, teacher and byte ranges."""
        return [((a, b), (c, d), (e, f)) for a, b, c, d, e, f in zip(*(x.tolist() for x in self))]


def align_groups(student_spans: np.ndarray, teacher_spans: np.ndarray) -> Groups:
    """The finest cut of both token sequences at their common byte boundaries (the aligned groups).

    Both span arrays must tile the same start (checked); a boundary is the end of a non-empty span. A group ends
    at every byte where both sides have a boundary, and takes every token up to and including the side's token
    that ends there (so the empty-span tokens before it). Tokens after the last common boundary (a side that
    runs on, such as a teacher given a longer text, and trailing empty-span tokens) are in no group.
    """
    s = np.asarray(student_spans, dtype=np.int64).reshape(-1, 2)
    t = np.asarray(teacher_spans, dtype=np.int64).reshape(-1, 2)
    check_tiling(s)
    check_tiling(t)
    s_nonempty = s[:, 1] > s[:, 0]
    t_nonempty = t[:, 1] > t[:, 0]
    s_ends = s[s_nonempty, 1]
    t_ends = t[t_nonempty, 1]
    common = np.intersect1d(s_ends, t_ends)  # sorted, unique (ends of non-empty spans are strictly increasing)
    # the token (index) that ends at each common boundary, on each side
    s_last = np.flatnonzero(s_nonempty)[np.searchsorted(s_ends, common)]
    t_last = np.flatnonzero(t_nonempty)[np.searchsorted(t_ends, common)]
    s_end = s_last + 1
    t_end = t_last + 1
    zero = np.zeros(1, dtype=np.int64)
    s_start = np.concatenate([zero, s_end])[:-1]  # each group starts where the previous one ended
    t_start = np.concatenate([zero, t_end])[:-1]
    b_start = np.concatenate([zero, common])[:-1]
    return Groups(s_start, s_end, t_start, t_end, b_start, common.astype(np.int64))


def compared_positions(groups: Groups, student_labelled: np.ndarray | None = None,
                       teacher_scored: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(group index, student position, teacher position)``, ``[C]`` int64 each: the groups whose ends can be
    compared, and the last token of each side there (its next-token distribution is the one compared).

    ``student_labelled[i]``: the student's position i has a label (a next token in the block, label != -100);
    ``teacher_scored[j]``: the teacher's answer has a top-k at its position j. Default (for a text both sides read
    to its end): every position but each side's last aligned one, whose next token lies beyond the text.
    """
    s_last = groups.student_end - 1
    t_last = groups.teacher_end - 1
    keep = np.ones(len(groups), dtype=bool)
    if len(groups):
        n_s = int(groups.student_end.max())
        n_t = int(groups.teacher_end.max())
        s_ok = np.arange(n_s) < n_s - 1 if student_labelled is None else np.asarray(student_labelled, dtype=bool)
        t_ok = np.arange(n_t) < n_t - 1 if teacher_scored is None else np.asarray(teacher_scored, dtype=bool)
        if s_ok.shape[0] < n_s or t_ok.shape[0] < n_t:
            raise ValueError("the masks are shorter than the aligned token sequences")
        keep = s_ok[s_last] & t_ok[t_last]
    idx = np.flatnonzero(keep)
    return idx.astype(np.int64), s_last[idx].astype(np.int64), t_last[idx].astype(np.int64)


# ---------------------------------------------------------------------------------------------------------
# the shared vocabulary

def vocab_bytes(vocab: dict[str, int], scheme: str, special: Iterable[str] = ()) -> dict[int, bytes]:
    """``{id: bytes}`` of a vocabulary (``get_vocab()``, piece -> id) under ``scheme``; the ``special`` pieces and
    pieces that stand for no bytes (or for the empty string) are left out."""
    special = set(special)
    out = {}
    for piece, i in vocab.items():
        if piece in special:
            continue
        b = piece_bytes(piece, scheme)
        if b:
            out[int(i)] = b
    return out


def _canonical(by_id: dict[int, bytes], fallback_ids: set[int]) -> dict[bytes, int]:
    """bytes -> the one id that stands for them: a regular piece before a byte-fallback one, then the lowest id."""
    best: dict[bytes, int] = {}
    for i in sorted(by_id, key=lambda i: (i in fallback_ids, i)):
        best.setdefault(by_id[i], i)
    return best


def _fallback_ids(vocab: dict[str, int], scheme: str) -> set[int]:
    if scheme != "sentencepiece":
        return set()
    return {int(i) for p, i in vocab.items() if len(p) == 6 and p.startswith("<0x") and p.endswith(">")}


class SharedVocab(NamedTuple):
    """Token pairs that stand for the same thing in both vocabularies, sorted by teacher id: ``teacher_ids[i]``
    and ``student_ids[i]`` (int64 ``[n]``); a one-to-one map (each id at most once on each side)."""

    teacher_ids: np.ndarray
    student_ids: np.ndarray

    def teacher_to_student(self, teacher_vocab_size: int) -> np.ndarray:
        """``[teacher_vocab_size]`` int64: the student id of each teacher id, -1 where it has none."""
        out = np.full(int(teacher_vocab_size), -1, dtype=np.int64)
        out[self.teacher_ids] = self.student_ids
        return out

    def student_mask(self, student_vocab_size: int) -> np.ndarray:
        """``[student_vocab_size]`` bool: the student ids that have a teacher counterpart."""
        out = np.zeros(int(student_vocab_size), dtype=bool)
        out[self.student_ids] = True
        return out


def shared_vocab(student_vocab: dict[str, int], student_scheme: str, teacher_vocab: dict[str, int],
                 teacher_scheme: str, student_special: Iterable[str] = (),
                 teacher_special: Iterable[str] = ()) -> SharedVocab:
    """The shared vocabulary of two tokenizers: pieces that decode to the same bytes (:func:`piece_bytes`, so
    byte-level 'Ġcat' meets SentencePiece '▁cat'), plus special tokens with the same literal text on both sides
    (as GOLD matches token strings; '<s>' meets '<s>', never the text "<s>").

    Within one vocabulary several pieces can stand for the same bytes (SentencePiece 'A' and its byte fallback
    '<0x41>'): the pair uses the one the tokenizer emits for them (the regular piece, then the lowest id), so the
    map is one-to-one.
    """
    s_special, t_special = set(student_special), set(teacher_special)
    s_bytes = _canonical(vocab_bytes(student_vocab, student_scheme, s_special),
                         _fallback_ids(student_vocab, student_scheme))
    t_bytes = _canonical(vocab_bytes(teacher_vocab, teacher_scheme, t_special),
                         _fallback_ids(teacher_vocab, teacher_scheme))
    pairs = {t_bytes[b]: s_bytes[b] for b in t_bytes.keys() & s_bytes.keys()}
    for piece in s_special & t_special:
        if piece in student_vocab and piece in teacher_vocab:
            pairs[int(teacher_vocab[piece])] = int(student_vocab[piece])
    t_ids = np.array(sorted(pairs), dtype=np.int64)
    s_ids = np.array([pairs[i] for i in t_ids.tolist()], dtype=np.int64)
    return SharedVocab(t_ids, s_ids)


# ---------------------------------------------------------------------------------------------------------
# the fair gap across tokenizers (issue 29 item 3)

def bits_per_byte(nll_nats_sum: float, n_bytes: int) -> float:
    """Bits per byte of a text: the summed token negative log-likelihood (nats) over its UTF-8 byte count / ln 2.

    Tokenizer-free: two models' values on the same text compare whatever their tokenizers."""
    if n_bytes <= 0:
        raise ValueError(f"n_bytes must be > 0, got {n_bytes}")
    return float(nll_nats_sum) / (n_bytes * math.log(2))


def log_ratio_per_byte(student_nll_sum: float, teacher_nll_sum: float, n_bytes: int) -> float:
    """The per-byte gap in nats per byte: ``ln 2 * (bpb_student - bpb_teacher)``; its exp is the per-byte ratio."""
    return (bits_per_byte(student_nll_sum, n_bytes) - bits_per_byte(teacher_nll_sum, n_bytes)) * math.log(2)


def log_ratio_per_student_token(student_nll_sum: float, teacher_nll_sum: float, n_student_tokens: int) -> float:
    """The per-byte gap rescaled to the student's tokens of the same text: ``(NLL_S - NLL_T) / n_student_tokens``.

    Both sums are over the same text (each model through its own tokens), so the gap is tokenizer-fair; with one
    tokenizer on both sides it *is* today's per-token log-ratio ``loss_S - loss_T`` (DDK's ``ln q``), so every
    domain's ratio, ranking and weight stays as it is. The plain per-byte gap (:func:`log_ratio_per_byte`) is
    today's times the domain's tokens per byte, which differs between domains and can reorder them.
    """
    if n_student_tokens <= 0:
        raise ValueError(f"n_student_tokens must be > 0, got {n_student_tokens}")
    return (float(student_nll_sum) - float(teacher_nll_sum)) / n_student_tokens
