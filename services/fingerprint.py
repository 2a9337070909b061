"""Tokenizer fingerprint: one hash of a tokenizer's vocabulary, shared by teacher and trainer.

The teacher publishes it at ``GET /v1/info``; the trainer computes it for the student's tokenizer and
refuses to start when the two differ. Pure function, no I/O.
"""

from __future__ import annotations

import hashlib
import json
from typing import Mapping


def vocab_fingerprint(vocab: Mapping[str, int]) -> str:
    """sha256 (first 16 hex digits) of the token -> id mapping, independent of dict order."""
    items = sorted((str(tok), int(idx)) for tok, idx in vocab.items())
    blob = json.dumps(items, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """Fingerprint of a Hugging Face tokenizer (fast or slow): its full vocabulary, added tokens included."""
    return vocab_fingerprint(tokenizer.get_vocab())
