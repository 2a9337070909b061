"""The token cache of a conversation domain (``ddk data prepare``; docs/data.md, "Conversation domains").

A domain is a *conversation domain* when its files hold conversation rows (:func:`domain_form`: the first row of
each JSONL / JSONL.gz / JSONL.zst / Parquet file has ``messages`` or ``prompt``; all files of a domain must agree).
Its rows are read whole (conversation datasets are small next to pre-training text), checked
(:mod:`ddk.data.chat`: a bad row is exit 2 naming the file, line and field), rendered with the tokenizer's chat
template, fitted to ``seq_len + 1`` tokens (``overflow``: truncate_left or drop) and written as one conversation
per row, padded (the layout ``pad``):

  train.npy / val.npy             [n, seq_len + 1] token ids (uint16 / uint32), padded after the conversation
  train-mask.npy / val-mask.npy   [n, seq_len + 1] uint8: 1 on the tokens that are labels (assistant tokens)
  train-len.npy / val-len.npy     [n] int32: the conversation's tokens (the rest of the row is padding)
  val-keys.npy                    [n] uint64: each validation conversation's content hash (evaluation sets)
  meta.json                       written last: the counts (:class:`ddk.data.chat.FitStats`), every file's size
                                  and crc32, ``"kind": "conversations"``

A row is exactly a training block, so the teacher's ``/v1/topk``, the top-k store and the feed take it unchanged,
and no token attends across two conversations (in the student or the teacher). Position ``j`` of a row is trained
to predict token ``j + 1`` only where that token is a label: :meth:`ddk.data.domains.PackedDomain.targets`.

Every row is checked and rendered before anything is written: a bad row leaves no file in the cache. Validation:
the domain's ``val_files``, else the conversations whose content hash falls below ``val_fraction`` (at least one:
the lowest hash), in hash order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ddk.data.cache import META, _atomic_write, _file_ok, _locked, _save_npy
from ddk.data.chat import FitStats, Tokenised, fit_length, require_chat_template, row_form, special_ids
from ddk.data.chat import tokenise_conversation
from ddk.data.chat_files import CHAT_FILE_KINDS, read_conversations, read_rows
from ddk.data.domains import CACHE_FORMAT, DomainSpec, PackedDomain, cache_key, file_kind, safe_dirname
from ddk.errors import UsageError

log = logging.getLogger(__name__)

KIND = "conversations"
TEXT = "text"


# ---------------------------------------------------------------------------------------------------------
# which domains hold conversations

def file_form(path: str) -> str:
    """``"conversations"`` when the file's first row has ``messages`` or ``prompt`` (a Parquet file: such a
    column), else ``"text"`` (what the text reader then reads, and reports on)."""
    kind = file_kind(path)
    if kind not in CHAT_FILE_KINDS:
        return TEXT
    if kind == ".parquet":
        import pyarrow.parquet as pq

        try:
            names = pq.ParquetFile(path).schema_arrow.names
        except (OSError, ValueError):
            return TEXT
        return KIND if ("messages" in names or "prompt" in names) else TEXT
    try:
        with contextlib.closing(read_rows(path)) as rows:  # the first row only; the file closed right after
            for _, row in rows:
                return KIND if row_form(row) is not None else TEXT
    except UsageError:  # not JSON: the text reader names the line
        return TEXT
    return TEXT


def domain_form(spec: DomainSpec) -> str:
    """The domain's form, ``"conversations"`` or ``"text"``; exit 2 naming two files that disagree."""
    forms = [(f, file_form(f)) for f in spec.files + spec.val_files]
    first_file, first = forms[0]
    for f, form in forms[1:]:
        if form != first:
            raise UsageError(f"domain {spec.name}: {first_file} holds {first} but {f} holds {form}; "
                             "a domain's files must all be text or all conversations")
    if first == KIND and spec.select is not None:
        raise UsageError(f"domain {spec.name}: {first_file}: conversations need a data.yaml domain entry, not the "
                         "single-file form with a 'domain' field")
    return first


# ---------------------------------------------------------------------------------------------------------
# rows -> fitted conversations (everything checked before anything is written)

def conversation_key(messages) -> int:
    """A 64-bit content hash of a conversation (its turns as JSON): the held-out choice and the evaluation set's
    key depend on the conversation alone, not on file order."""
    blob = json.dumps(list(messages), sort_keys=True, ensure_ascii=False).encode("utf-8")
    return int.from_bytes(hashlib.sha1(blob).digest()[:8], "big")


@dataclass
class Split:
    """One split's fitted conversations, their content keys, and what fitting did."""

    items: list[Tokenised]
    keys: list[int]
    stats: FitStats


def _tokenise_files(tokenizer: Any, files: list[str]) -> list[tuple[int, Tokenised]]:
    """Every conversation of ``files`` (file order) checked and rendered: ``[(content key, Tokenised)]``."""
    eot = special_ids(tokenizer)
    return [(conversation_key(conv.messages), tokenise_conversation(tokenizer, conv, eot))
            for f in files for conv in read_conversations(f)]


def _fit(convs: list[tuple[int, Tokenised]], block_len: int, overflow: str) -> Split:
    stats = FitStats()
    items, keys = [], []
    for key, t in convs:
        fitted = fit_length(t, block_len, overflow, stats)
        if fitted is not None:
            items.append(fitted)
            keys.append(key)
    return Split(items, keys, stats)


def fit_domain(spec: DomainSpec, tokenizer: Any, seq_len: int) -> tuple[Split, Split]:
    """The domain's train and validation conversations, fitted to ``seq_len + 1`` tokens (module docstring)."""
    require_chat_template(tokenizer)
    block_len = seq_len + 1
    train = _tokenise_files(tokenizer, spec.files)
    if spec.val_files:
        return _fit(train, block_len, spec.overflow), _fit(_tokenise_files(tokenizer, spec.val_files), block_len,
                                                           spec.overflow)
    # held out by content hash: key / 2^64 < val_fraction; at least the lowest-hash conversation that fits
    held = {i for i, (k, _) in enumerate(train) if k / 2.0**64 < spec.val_fraction}
    fits = [i for i, (_, t) in enumerate(train)
            if fit_length(t, block_len, spec.overflow) is not None]
    if not held & set(fits) and fits:
        held.add(min(fits, key=lambda i: (train[i][0], i)))
    order = sorted(held, key=lambda i: (train[i][0], i))
    return (_fit([c for i, c in enumerate(train) if i not in held], block_len, spec.overflow),
            _fit([train[i] for i in order], block_len, spec.overflow))


# ---------------------------------------------------------------------------------------------------------
# the cache folder

def template_hash(tokenizer: Any) -> str:
    return hashlib.sha256(str(getattr(tokenizer, "chat_template", "") or "").encode()).hexdigest()[:16]


def chat_domain_dir(cache: Path, spec: DomainSpec, fingerprint: str, pad: int, seq_len: int, dtype: np.dtype,
                    tokenizer: Any) -> Path:
    """``cache/<domain>-<key>``: the text key (files, tokenizer, seq_len, dtype, format) plus the chat template,
    the overflow setting and the layout."""
    base = cache_key(spec, fingerprint, pad, seq_len, dtype)
    key = hashlib.sha256(json.dumps([base, KIND, "pad", spec.overflow, template_hash(tokenizer)]).encode())
    return cache / f"{safe_dirname(spec.name)}-{key.hexdigest()[:16]}"


def _rows(items: list[Tokenised], block_len: int, pad: int, dtype: np.dtype) -> tuple[np.ndarray, ...]:
    ids = np.full((len(items), block_len), pad, dtype=dtype)
    mask = np.zeros((len(items), block_len), dtype=np.uint8)
    lengths = np.zeros(len(items), dtype=np.int32)
    for r, t in enumerate(items):
        n = len(t)
        ids[r, :n] = t.input_ids
        mask[r, :n] = t.assistant_mask
        lengths[r] = n
    return ids, mask, lengths


def write_domain(spec: DomainSpec, d: Path, train: Split, val: Split, seq_len: int, pad: int, dtype: np.dtype,
                 fingerprint: str, template: str) -> dict:
    """The arrays, then ``meta.json`` (last: its presence marks a complete cache)."""
    block_len = seq_len + 1
    if not train.items:
        raise UsageError(f"domain {spec.name}: no conversation to train on in {spec.files} "
                         f"({train.stats.dropped} dropped)")
    if not val.items:
        raise UsageError(f"domain {spec.name}: no validation conversation "
                         f"({'in ' + str(spec.val_files) if spec.val_files else 'held out'})")
    shards: dict[str, dict] = {}
    for name, split in (("train", train), ("val", val)):
        ids, mask, lengths = _rows(split.items, block_len, pad, dtype)
        for suffix, arr in (("", ids), ("-mask", mask), ("-len", lengths)):
            e = _save_npy(d / f"{name}{suffix}.npy", arr)
            shards[e["file"]] = {k: e[k] for k in ("bytes", "crc32")} | {"rows": int(len(arr))}
    e = _save_npy(d / "val-keys.npy", np.array(val.keys, dtype=np.uint64))
    shards[e["file"]] = {k: e[k] for k in ("bytes", "crc32")} | {"rows": len(val.keys)}
    meta = {"format": CACHE_FORMAT, "kind": KIND, "layout": "pad", "name": spec.name, "seq_len": seq_len,
            "dtype": dtype.name, "tokenizer_fingerprint": fingerprint, "chat_template": template, "eos": pad,
            "pad": pad, "files": spec.files, "val_files": spec.val_files, "overflow": spec.overflow,
            "val_fraction": None if spec.val_files else spec.val_fraction}
    for name, split in (("train", train), ("val", val)):
        n = len(split.items)
        meta[name] = {"documents": n, "conversations": split.stats.conversations, "truncated": split.stats.truncated,
                      "dropped": split.stats.dropped, "tokens": split.stats.tokens,
                      "assistant_tokens": split.stats.label_tokens, "blocks": n,
                      "padding_share": round(1 - split.stats.tokens / max(1, n * block_len), 6)}
    meta["shards"] = shards
    _atomic_write(d / META, json.dumps(meta, indent=1).encode())
    return meta


def load_chat_meta(d: Path, verify: bool = False) -> dict | None:
    """The complete conversation cache's ``meta.json``, or None (missing, another format, a damaged file)."""
    try:
        meta = json.loads((d / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT or meta.get("kind") != KIND:
        return None
    shards = meta.get("shards")
    if not isinstance(shards, dict) or not all(_file_ok(d / f, e, verify) for f, e in shards.items()):
        return None
    return meta


def open_chat_domain(d: Path, meta: dict) -> PackedDomain:
    """Memory-map the arrays; ValueError when one is not what ``meta`` says."""
    dtype, block_len = np.dtype(meta["dtype"]), int(meta["seq_len"]) + 1
    arrays = {}
    for f, e in meta["shards"].items():
        arr = np.load(d / f, mmap_mode="r")
        if len(arr) != e["rows"]:
            raise ValueError(f"{d / f}: {len(arr)} rows, expected {e['rows']}")
        arrays[f] = arr
    for split in ("train", "val"):
        ids, mask = arrays[f"{split}.npy"], arrays[f"{split}-mask.npy"]
        if ids.dtype != dtype or ids.shape != (len(ids), block_len) or mask.shape != ids.shape:
            raise ValueError(f"{d / (split + '.npy')}: {ids.dtype} {ids.shape}, expected {dtype} [n, {block_len}]")
    docs = {"lengths": np.asarray(arrays["val-len.npy"], dtype=np.int64),
            "keys": np.asarray(arrays["val-keys.npy"], dtype=np.uint64)}
    return PackedDomain(name=meta["name"], train=arrays["train.npy"], val=arrays["val.npy"], info=meta,
                        val_docs=docs, train_mask=arrays["train-mask.npy"], val_mask=arrays["val-mask.npy"])


def ensure_chat_domain(spec: DomainSpec, cache: Path, tokenizer: Any, seq_len: int, dtype: np.dtype,
                       fingerprint: str, verify: bool = False) -> PackedDomain:
    """The conversation domain's cache: opened when complete, else every row checked and rendered (exit 2 on a
    bad one, nothing written), then written under the folder's lock."""
    require_chat_template(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise UsageError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')}: has neither a pad nor an eos token "
                         "to pad conversations with")
    d = chat_domain_dir(cache, spec, fingerprint, int(pad), seq_len, dtype, tokenizer)
    packed = _try_open(d, verify)
    if packed is not None:
        return packed
    t0 = time.perf_counter()
    train, val = fit_domain(spec, tokenizer, seq_len)  # every row checked before the folder exists
    with _locked(d):
        packed = _try_open(d, verify)
        if packed is not None:
            return packed
        meta = write_domain(spec, d, train, val, seq_len, int(pad), dtype, fingerprint, template_hash(tokenizer))
    seconds = round(time.perf_counter() - t0, 3)
    tokens = meta["train"]["tokens"] + meta["val"]["tokens"]
    log.info("domain %s: %d train + %d val conversations (%d truncated, %d dropped) of %d tokens -> %s",
             spec.name, meta["train"]["blocks"], meta["val"]["blocks"],
             meta["train"]["truncated"] + meta["val"]["truncated"], meta["train"]["dropped"] + meta["val"]["dropped"],
             seq_len + 1, d)
    packed = open_chat_domain(d, meta)
    packed.build = {"tokenised": 1, "reused": 0, "tokens": tokens, "seconds": seconds,
                    "tokens_per_s": round(tokens / max(seconds, 1e-9), 1)}
    return packed


def _try_open(d: Path, verify: bool) -> PackedDomain | None:
    meta = load_chat_meta(d, verify)
    if meta is None:
        return None
    try:
        return open_chat_domain(d, meta)
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("cache %s: %s; rebuilding", d, e)
        return None
