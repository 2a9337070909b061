"""Fingerprints shared by teacher and trainer: the tokenizer's vocabulary and the teacher model's identity.

- :func:`tokenizer_fingerprint` / :func:`vocab_fingerprint`: one hash of a tokenizer's vocabulary. The teacher
  publishes it at ``GET /v1/info``; the trainer computes it for the student's tokenizer and refuses to start
  when the two differ. Pure functions, no I/O.
- :func:`model_fingerprint`: one hash of a model folder (weights, config, tokenizer), published as
  ``model_fingerprint`` at ``GET /v1/info`` and used as the teacher's key in the top-k store, so a store
  never serves one teacher's numbers for another. It reads files (a bounded amount of each).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Mapping


def vocab_fingerprint(vocab: Mapping[str, int]) -> str:
    """sha256 (first 16 hex digits) of the token -> id mapping, independent of dict order."""
    items = sorted((str(tok), int(idx)) for tok, idx in vocab.items())
    blob = json.dumps(items, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """Fingerprint of a Hugging Face tokenizer (fast or slow): its full vocabulary, added tokens included."""
    return vocab_fingerprint(tokenizer.get_vocab())


# -- the model's identity -----------------------------------------------------------------------------------

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# small files hashed whole: what decides the numbers besides the weights
META_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "vocab.txt",
              "merges.txt", "chat_template.jinja", "chat_template.json", "preprocessor_config.json")
FULL_HASH_BYTES = 64 << 20  # weight files up to this size are hashed whole
EDGE_BYTES = 64 << 10  # of a larger file: its first and last 64 KiB ...
SAMPLE_BYTES = 4 << 10  # ... and SAMPLES windows of 4 KiB centred at i / (SAMPLES + 1) of the file, i = 1..SAMPLES
SAMPLES = 15  # odd, so one window sits on the middle byte


def _sample_offsets(size: int) -> list[tuple[int, int]]:
    spans = [(0, EDGE_BYTES), (max(0, size - EDGE_BYTES), EDGE_BYTES)]
    for i in range(1, SAMPLES + 1):
        centre = size * i // (SAMPLES + 1)
        spans.append((max(0, centre - SAMPLE_BYTES // 2), SAMPLE_BYTES))
    return spans


def _hash_weights(h, path: Path, size: int, full_hash_bytes: int) -> None:
    with open(path, "rb") as f:
        if path.suffix == ".safetensors" and size >= 8:
            (n,) = struct.unpack("<Q", f.read(8))
            if 0 < n <= min(size - 8, 100 << 20):  # the JSON header: every tensor's name, dtype, shape, offsets
                h.update(b"header\0" + f.read(n))
            f.seek(0)
        if size <= full_hash_bytes:
            h.update(b"all\0")
            while chunk := f.read(1 << 20):
                h.update(chunk)
            return
        h.update(b"sampled\0")
        for off, length in _sample_offsets(size):
            f.seek(off)
            h.update(struct.pack("<Q", off) + f.read(length))


def model_fingerprint(model_dir: str | os.PathLike, *, full_hash_bytes: int = FULL_HASH_BYTES) -> str:
    """sha256 (first 32 hex digits) of a model folder: what its numbers depend on, read in seconds at any size.

    Hashed, file by file in name order (the folder's own path is not, so copies on two nodes agree): each
    weight file's name and size; for ``*.safetensors`` its JSON header (every tensor's name, dtype, shape and
    byte range); the weight bytes themselves, **whole** for a file of at most ``full_hash_bytes`` (64 MiB) and
    **sampled** for a larger one (its first and last 64 KiB and 15 windows of 4 KiB spread evenly, the middle
    byte among them: about 190 KiB per file, 6 MB for a 70B checkpoint in 30 shards); and the whole of
    ``config.json``, ``generation_config.json``, the tokenizer files (:data:`META_FILES`) and
    ``*.safetensors.index.json``.

    Why sampled: hashing 140 GB takes minutes, and the header and sizes alone do not change when the weights are
    retrained (same shapes, same sizes). New weights (another fine-tune, another step's checkpoint, another
    quantisation) change essentially every byte, so the samples catch them. The limit: an edit of a few bytes
    of a large file outside the sampled windows goes unnoticed; change the config (or any small file) or rename
    a shard to give such a model a new identity.
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no such model directory: {root}")
    h = hashlib.sha256(b"ddk-model-fingerprint-v1\0")
    names = sorted(p.name for p in root.iterdir() if p.is_file())
    for name in names:
        path = root / name
        is_weights = name.endswith(WEIGHT_SUFFIXES)
        if not (is_weights or name in META_FILES or name.endswith(".index.json")):
            continue
        size = path.stat().st_size
        h.update(b"file\0" + name.encode("utf-8") + b"\0" + struct.pack("<Q", size))
        if is_weights:
            _hash_weights(h, path, size, full_hash_bytes)
        else:
            h.update(path.read_bytes())
    return h.hexdigest()[:32]
