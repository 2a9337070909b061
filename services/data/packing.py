"""Packing conversations into ``seq_len`` blocks without leaks (pure: numpy; torch only inside
:func:`attention_mask_4d`).

:func:`pack` places tokenised conversations (each at most ``seq_len`` tokens, :func:`ddk.data.chat.fit_length`)
into blocks of exactly ``seq_len`` positions, first fit over a window of open blocks (conversation order otherwise
kept; deterministic), the rest of a block padded. Per block it returns the tokens, the next-token ``targets``
(computed inside each conversation: a conversation never predicts the next one's first token), ``position_ids``
that restart at 0 for every conversation (and for the padding), ``segment_ids`` (1, 2, ... per conversation, 0 for
the padding) and the segments ``(start, stop, conversation index)``.

No token may attend to another conversation's tokens. With transformers 5 (5.19 read) that holds three ways:

- ``position_ids`` alone, ``attention_mask=None``: ``masking_utils.find_packed_sequence_indices`` starts a new
  sequence wherever a position id is not the previous one plus 1, and ``create_causal_mask`` ANDs the causal mask
  with "same sequence" (eager, sdpa, flex). flash-attention 2/3 read the same ``position_ids``
  (``prepare_fa_kwargs_from_position_ids``: a sequence starts at every position 0) and run varlen kernels. The
  padding restarts at 0, so it is a sequence of its own. Only without a KV cache: the detection is skipped when
  ``past_key_values`` is set, and Llama's forward makes a ``DynamicCache`` when ``use_cache`` is true, the config's
  default, so a training forward must pass ``use_cache=False`` (ddk's trainer does) or the conversations see each
  other.
- a 4-D mask ``[B, 1, T, T]`` from :func:`attention_mask_4d`: ``_preprocess_mask_arguments`` returns a 4-D tensor
  as it is. sdpa takes a bool mask (True: attend) or an additive float one; eager *adds* the mask to the scores, so
  it needs the float form (0 where allowed, the dtype's minimum elsewhere). flash-attention takes no 4-D mask.
- both: the 4-D mask wins (the position ids then only place RoPE).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ddk.data.chat import IGNORE_INDEX


@dataclass
class PackedBlock:
    """One block of ``seq_len`` positions: int64 arrays ``input_ids``, ``targets``, ``position_ids``, ``segment_ids``
    and the ``segments`` ``[(start, stop, conversation index), ...]`` in block order."""

    input_ids: np.ndarray
    targets: np.ndarray
    position_ids: np.ndarray
    segment_ids: np.ndarray
    segments: list[tuple[int, int, int]] = field(default_factory=list)


def conversation_targets(input_ids: Sequence[int], labels: Sequence[bool]) -> np.ndarray:
    """Next-token targets of one conversation: position ``j`` predicts ``input_ids[j + 1]`` where that token is a
    label, else :data:`IGNORE_INDEX`; the last position predicts nothing."""
    ids = np.asarray(input_ids, dtype=np.int64)
    lab = np.asarray(labels, dtype=bool)
    if ids.shape != lab.shape:
        raise ValueError(f"input_ids ({ids.size}) and labels ({lab.size}) differ in length")
    out = np.full(ids.shape, IGNORE_INDEX, dtype=np.int64)
    if ids.size > 1:
        out[:-1] = np.where(lab[1:], ids[1:], IGNORE_INDEX)
    return out


def pack(conversations: Sequence[tuple[Sequence[int], Sequence[bool]]], seq_len: int, pad_id: int = 0,
         window: int = 64) -> list[PackedBlock]:
    """Pack ``(input_ids, labels)`` conversations into blocks of ``seq_len`` positions: each goes into the first of
    the last ``window`` open blocks it fits in (a new block when none has room). A conversation longer than
    ``seq_len`` or empty is a ValueError (fit it first)."""
    if seq_len < 1 or window < 1:
        raise ValueError("seq_len and window must be positive")
    fills: list[list[int]] = []  # conversation indices per block
    used: list[int] = []
    open_: list[int] = []  # block indices that may still take a conversation, oldest first
    lengths = []
    for k, (ids, labels) in enumerate(conversations):
        n = len(ids)
        if n != len(labels):
            raise ValueError(f"conversation {k}: input_ids ({n}) and labels ({len(labels)}) differ in length")
        if not 0 < n <= seq_len:
            raise ValueError(f"conversation {k}: {n} tokens does not fit a block of {seq_len} (empty or too long)")
        lengths.append(n)
        b = next((b for b in open_ if used[b] + n <= seq_len), None)
        if b is None:
            b = len(fills)
            fills.append([])
            used.append(0)
            open_.append(b)
            if len(open_) > window:
                open_.pop(0)
        fills[b].append(k)
        used[b] += n
        if used[b] == seq_len:
            open_.remove(b)
    blocks = []
    for members in fills:
        ids = np.full(seq_len, pad_id, dtype=np.int64)
        tgt = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
        pos = np.zeros(seq_len, dtype=np.int64)
        seg = np.zeros(seq_len, dtype=np.int64)
        segments = []
        at = 0
        for s, k in enumerate(members, 1):
            c_ids, c_lab = conversations[k]
            n = lengths[k]
            ids[at:at + n] = np.asarray(c_ids, dtype=np.int64)
            tgt[at:at + n] = conversation_targets(c_ids, c_lab)
            pos[at:at + n] = np.arange(n)
            seg[at:at + n] = s
            segments.append((at, at + n, k))
            at += n
        pos[at:] = np.arange(seq_len - at)  # the padding: a sequence of its own, never a target
        blocks.append(PackedBlock(ids, tgt, pos, seg, segments))
    return blocks


def packing_efficiency(blocks: Sequence[PackedBlock]) -> float:
    """The share of the blocks' positions that hold conversation tokens (1 - padding share)."""
    total = sum(b.input_ids.size for b in blocks)
    return sum(int((b.segment_ids > 0).sum()) for b in blocks) / total if total else 0.0


def block_causal(segment_ids: Any) -> np.ndarray:
    """``[B, T]`` (or ``[T]``) segment ids -> bool ``[B, 1, T, T]``: query ``q`` may attend key ``k`` iff
    ``k <= q`` and both lie in the same segment. The padding (segment 0) attends within the padding."""
    seg = np.asarray(segment_ids)
    if seg.ndim == 1:
        seg = seg[None]
    if seg.ndim != 2:
        raise ValueError(f"segment_ids must be [B, T] or [T], not shape {seg.shape}")
    t = seg.shape[1]
    causal = np.tril(np.ones((t, t), dtype=bool))
    same = seg[:, :, None] == seg[:, None, :]
    return (same & causal)[:, None]


def attention_mask_4d(segment_ids: Any, dtype: Any = None):
    """:func:`block_causal` as a torch tensor for a transformers model's ``attention_mask``: bool (True: attend;
    sdpa) when ``dtype`` is None, else additive in that float dtype (0 where allowed, ``finfo(dtype).min``
    elsewhere; eager and sdpa). ``segment_ids`` may be a numpy array or a torch tensor."""
    import torch

    if isinstance(segment_ids, torch.Tensor):
        seg = segment_ids if segment_ids.dim() == 2 else segment_ids[None]
        t = seg.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=seg.device).tril()
        allowed = ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]
    else:
        allowed = torch.from_numpy(block_causal(segment_ids))
    if dtype is None:
        return allowed
    out = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return out.masked_fill(~allowed, torch.finfo(dtype).min)
