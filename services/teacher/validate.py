"""Parse and check a ``POST /v1/topk`` body (pure: bytes in, arrays out, no I/O).

Every problem raises :class:`RequestError` with the HTTP status the contract asks for (422 for
malformed input, 413 for too much of it) and a one-line detail that names the field, so a client
can tell what to fix and the server never answers 500 for bad input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from .wire import DTYPES


class RequestError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass
class TopKRequest:
    input_ids: list[np.ndarray]  # B sequences, int64 [L_i] each; lengths may differ (ragged), each 2..max_seq_len
    top_k: int
    dtype: str  # logprob type of binary frames: "float16" | "float32"

    @property
    def lengths(self) -> list[int]:
        return [len(s) for s in self.input_ids]

    @property
    def tokens(self) -> int:
        """Sum of the sequence lengths (what ``max_batch_tokens`` bounds)."""
        return sum(len(s) for s in self.input_ids)


def _strict_int(v) -> bool:
    return type(v) is int  # bool is a subclass of int; JSON true/false are not token ids


def parse_topk_request(body: bytes, *, vocab_size: int, max_seq_len: int, max_top_k: int,
                       max_batch_tokens: int) -> TopKRequest:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deeply
        raise RequestError(422, f"body: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise RequestError(422, "body: expected a JSON object with input_ids and top_k")
    unknown = set(doc) - {"input_ids", "top_k", "dtype"}
    if unknown:
        raise RequestError(422, f"body: unknown field(s) {sorted(unknown)}")

    top_k = doc.get("top_k")
    if "top_k" not in doc:
        raise RequestError(422, "top_k: required")
    if not _strict_int(top_k) or not 1 <= top_k <= max_top_k:
        raise RequestError(422, f"top_k: must be an integer in 1..{max_top_k}, got {top_k!r}")

    dtype = doc.get("dtype", "float32")
    if not isinstance(dtype, str) or dtype not in DTYPES:  # a list or object here is not hashable: 422, not 500
        raise RequestError(422, f"dtype: must be one of {sorted(DTYPES)}, got {dtype!r}")

    rows = doc.get("input_ids")
    if "input_ids" not in doc:
        raise RequestError(422, "input_ids: required")
    if not isinstance(rows, list) or not rows:
        raise RequestError(422, "input_ids: must be a non-empty list of token-id lists")
    for i, row in enumerate(rows):
        if not isinstance(row, list):
            raise RequestError(422, f"input_ids[{i}]: must be a list of token ids")
    lengths = [len(row) for row in rows]
    for i, n in enumerate(lengths):  # sequences may differ in length (ragged); each is checked on its own
        if n < 2:
            raise RequestError(422, f"input_ids[{i}]: sequences must have at least 2 ids, got {n}")
        if n > max_seq_len:
            raise RequestError(413, f"input_ids[{i}]: sequence length {n} exceeds max_seq_len {max_seq_len}")
    total = sum(lengths)
    if total > max_batch_tokens:
        raise RequestError(413, f"input_ids: {len(rows)} sequences of {total} tokens in all exceed the limit of "
                                f"{max_batch_tokens} per request")
    flat = [v for row in rows for v in row]
    if {type(v) for v in flat} != {int}:
        for i, row in enumerate(rows):
            for j, v in enumerate(row):
                if not _strict_int(v):
                    raise RequestError(422, f"input_ids[{i}][{j}]: must be an integer token id, got {v!r}")
    try:
        ids = np.array(flat, dtype=np.int64)
    except OverflowError:
        raise RequestError(422, "input_ids: token id out of the 64-bit integer range") from None
    bad = (ids < 0) | (ids >= vocab_size)
    starts = np.cumsum([0] + lengths[:-1])
    if bad.any():
        pos = int(np.argmax(bad))
        i = int(np.searchsorted(starts, pos, side="right")) - 1
        raise RequestError(422, f"input_ids[{i}][{pos - int(starts[i])}]: token id {int(ids[pos])} outside the "
                                f"vocabulary 0..{vocab_size - 1}")
    return TopKRequest(input_ids=[ids[a:a + n] for a, n in zip(starts.tolist(), lengths)], top_k=top_k, dtype=dtype)
