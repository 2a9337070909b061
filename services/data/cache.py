"""Preparing the token cache: streamed, parallel, bounded in memory, resumable (``ddk data prepare``).

A domain is read document by document (:func:`ddk.data.domains.read_documents`) and cut into *chunks* of whole
documents (``shard_chars`` characters of text, at most ``SHARD_DOCS`` documents). Each chunk is tokenised by a
worker -- this process (1 worker), worker processes running the fast tokenizer (``workers``), or Ray Data's
``map_batches`` across a cluster (``use_ray``) -- and becomes one *part* in the domain's cache folder:

  t00007.train.npy   the chunk's training documents in file order, each followed by EOS (1-D uint16 / uint32)
  t00007.held.npy    the chunk's documents held out for validation (hash < val_fraction), in file order
  t00007.json        written last: the chunk's place (first document, documents, characters), its files' sizes
                     and crc32, the held documents' hashes and lengths, and its top-up candidates
  v00000.val.npy     a chunk of the domain's val_files (all of it validation), with v00000.json

A part whose ``.json`` is there and whose files match their checksums is complete: the next call (after a kill,
an error, a reboot) reuses it and tokenises only the chunks still missing. When every chunk is done the domain
is *finalised*: the held-out documents sorted by hash (ties in file order), then the top-up documents that the
"at least one validation block" rule takes (the lowest hashes at or above val_fraction: each part keeps the
bounded list of its own that could be needed), are copied into ``val-holdout.npy``, and ``meta.json``, written
last, lists the token ranges that make the train and validation streams and every shard's size and crc32.
:class:`ddk.data.domains.TokenBlocks` reads those ranges as one ``[n_blocks, seq_len + 1]`` array.

Memory is bounded by the chunks in flight (two per worker, at most ``MAX_INFLIGHT_CHARS`` characters), never by
the corpus: each chunk's tokens go to disk as soon as it is done, and finalising copies through memory maps.
The blocks are the same whatever the number of workers or shards: a shard boundary is not a block boundary.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import io
import json
import logging
import os
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ddk.data.domains import (CACHE_FORMAT, DomainSpec, PackedDomain, TokenBlocks, cache_key, default_cache_dir,
                              file_kind, load_domain_specs, read_documents, safe_dirname, token_dtype)
from ddk.data.executors import Executors
from ddk.errors import UsageError
from ddk.fingerprint import tokenizer_fingerprint

log = logging.getLogger(__name__)

SHARD_CHARS = 4_000_000          # characters of text per chunk (one part; ~1.5M tokens of code) ...
MAX_SHARD_CHARS = 64_000_000     # ... growing up to this for a big domain, so it has at most ~2,048 shards
SHARD_DOCS = 100_000             # and at most this many documents
META = "meta.json"
BUILD = "build.json"
HOLDOUT = "val-holdout.npy"
VAL_DOCS = "val-docs.npy"  # the validation documents in stream order: float64 [D, 2] = (text hash in [0, 1), tokens)


# ---------------------------------------------------------------------------------------------------------
# chunks of documents

@dataclass
class Chunk:
    """Whole documents of one source, in file order. ``kind`` "t": the train files, "v": the val_files."""

    kind: str
    index: int
    first_doc: int
    texts: list[str]
    chars: int

    @property
    def name(self) -> str:
        return f"{self.kind}{self.index:05d}"


def iter_chunks(spec: DomainSpec, files: list[str], kind: str, shard_chars: int,
                shard_docs: int = SHARD_DOCS) -> Iterator[Chunk]:
    """The documents of ``files`` cut into chunks: a chunk closes at ``shard_chars`` characters or ``shard_docs``
    documents. Deterministic: the same files give the same chunks (what resuming relies on)."""
    texts: list[str] = []
    chars = index = first = 0
    for text in read_documents(spec, files):
        texts.append(text)
        chars += len(text)
        if chars >= shard_chars or len(texts) >= shard_docs:
            yield Chunk(kind, index, first, texts, chars)
            index, first, texts, chars = index + 1, first + len(texts), [], 0
    if texts:
        yield Chunk(kind, index, first, texts, chars)


# ---------------------------------------------------------------------------------------------------------
# files

def _atomic_write(path: Path, data: bytes | memoryview) -> None:
    """Write via a unique temporary file in the same directory, then os.replace (readers never see half)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _save_npy(path: Path, arr: np.ndarray) -> dict:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    data = buf.getbuffer()
    _atomic_write(path, data)
    return {"file": path.name, "tokens": int(len(arr)), "bytes": len(data), "crc32": zlib.crc32(data)}


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return crc


def _file_ok(path: Path, entry: dict, verify: bool) -> bool:
    """The shard is there with its recorded size (and, with ``verify``, its recorded crc32)."""
    try:
        if path.stat().st_size != entry["bytes"]:
            return False
        return not verify or _crc32(path) == entry["crc32"]
    except (OSError, KeyError, TypeError):
        return False


@contextlib.contextmanager
def _locked(d: Path):
    """One builder per cache folder at a time (others wait, then find it done). Best effort: where the file
    system has no flock the writes are still atomic and identical, so two builders both end up correct."""
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "a+b") as fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass
        yield


def _remove_stale(d: Path) -> None:
    """Files of an older format (format 1: train.npy, val.npy) and temporaries left by a killed writer (an hour
    old: a builder on a file system without flock may still be writing a newer one)."""
    for p in d.iterdir():
        with contextlib.suppress(OSError):
            if p.name in ("train.npy", "val.npy") or (p.name.startswith(".") and p.name.endswith(".tmp")
                                                      and time.time() - p.stat().st_mtime > 3600):
                p.unlink()


# ---------------------------------------------------------------------------------------------------------
# one domain: load, or build (resuming), then finalise

def load_meta(d: Path, verify: bool = False) -> dict | None:
    """The complete cache's ``meta.json``, or None when it is missing, of another format or a shard is damaged."""
    try:
        meta = json.loads((d / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        return None
    shards = meta.get("shards")
    if not isinstance(shards, dict) or not all(_file_ok(d / f, e, verify) for f, e in shards.items()):
        return None
    table = (meta.get("val") or {}).get("doc_table")
    if not isinstance(table, dict) or not _file_ok(d / str(table.get("file")), table, verify):
        return None
    return meta


def open_domain(d: Path, meta: dict) -> PackedDomain:
    """Memory-map the shards that ``meta`` lists; ValueError when one is not what it says."""
    dtype, block_len = np.dtype(meta["dtype"]), int(meta["seq_len"]) + 1
    for f, e in meta["shards"].items():
        arr = np.load(d / f, mmap_mode="r")
        if arr.dtype != dtype or arr.ndim != 1 or len(arr) != e["tokens"]:
            raise ValueError(f"{d / f}: {arr.dtype} {arr.shape}, expected {dtype} ({e['tokens']},)")

    def blocks(split: str) -> TokenBlocks:
        segs = [(str(d / f), a, b) for f, a, b in meta[split]["segments"]]
        return TokenBlocks.open(segs, block_len, dtype)

    table_path = d / meta["val"]["doc_table"]["file"]
    table = np.load(table_path, allow_pickle=False)
    if table.ndim != 2 or table.shape[1] != 2 or int(table[:, 1].sum()) != int(meta["val"]["tokens"]):
        raise ValueError(f"{table_path}: not the validation document table of {meta['val']['tokens']} tokens")
    docs = {"lengths": table[:, 1].astype(np.int64), "keys": (table[:, 0] * 2.0**53).astype(np.uint64)}
    return PackedDomain(name=meta["name"], train=blocks("train"), val=blocks("val"), info=meta, val_docs=docs)


def _part_ok(d: Path, chunk: Chunk, dtype: np.dtype) -> dict | None:
    """The complete part of ``chunk`` (its checksums verified), or None."""
    try:
        part = json.loads((d / f"{chunk.name}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(part, dict) or part.get("format") != CACHE_FORMAT or part.get("dtype") != dtype.name:
        return None
    if (part.get("first_doc"), part.get("docs"), part.get("chars")) != (chunk.first_doc, len(chunk.texts),
                                                                         chunk.chars):
        return None
    if not all(_file_ok(d / e["file"], e, verify=True) for e in part.get("files", {}).values()):
        return None
    return part


def _write_part(d: Path, kind: str, index: int, first_doc: int, chars: int, dtype: np.dtype, result: dict) -> dict:
    """The chunk's shards, then its ``.json`` (the mark that the part is complete)."""
    name = f"{kind}{index:05d}"
    streams = {"train": result["train"], "held": result["held"]} if kind == "t" else {"val": result["train"]}
    files = {s: _save_npy(d / f"{name}.{s}.npy", arr) for s, arr in streams.items() if len(arr)}
    part = {"format": CACHE_FORMAT, "kind": kind, "index": index, "first_doc": first_doc, "docs": result["docs"],
            "chars": chars, "tokens": result["tokens"], "dtype": dtype.name, "files": files,
            "held_docs": result["held_docs"] if kind == "t" else [],
            "candidates": result["candidates"] if kind == "t" else [],
            # a val_files chunk's documents in order, [hash, tokens] (the validation document table)
            "val_docs": [[float(f), int(n)] for f, n in zip(result["doc_hash"], result["doc_tokens"])]
            if kind == "v" else []}
    _atomic_write(d / f"{name}.json", json.dumps(part).encode())
    return part


def default_shard_chars(input_chars: int) -> int:
    """SHARD_CHARS, or more for a domain of over ~8 GB of text (at most MAX_SHARD_CHARS): every shard is one more
    memory map in every process that reads the cache, and the kernel allows some 65,000 per process."""
    return int(min(MAX_SHARD_CHARS, max(SHARD_CHARS, input_chars // 2048)))


def _settings(d: Path, shard_chars: int | None, input_chars: int) -> dict:
    """The chunking of this folder's build (kept from its first attempt, so a resumed build cuts the same)."""
    try:
        s = json.loads((d / BUILD).read_text(encoding="utf-8"))
        if isinstance(s.get("shard_chars"), int) and isinstance(s.get("shard_docs"), int):
            return s
    except (OSError, ValueError, AttributeError):
        pass
    s = {"shard_chars": int(shard_chars or default_shard_chars(input_chars)), "shard_docs": SHARD_DOCS}
    _atomic_write(d / BUILD, json.dumps(s).encode())
    return s


def _input_chars(files: list[str]) -> int:
    """A rough size of the text (compressed files count four times their bytes)."""
    total = 0
    for f in files:
        p = Path(f)
        paths = [q for q in p.rglob("*") if q.is_file()] if p.is_dir() else [p]
        kind = file_kind(p) or ""
        scale = 4 if kind.endswith((".gz", ".zst")) else 1
        total += scale * sum(q.stat().st_size for q in paths)
    return total


def build_domain(spec: DomainSpec, d: Path, executors: Executors, eos: int, seq_len: int, dtype: np.dtype,
                 fingerprint: str, shard_chars: int | None, progress: bool) -> dict:
    """Tokenise the chunks not yet complete in ``d``, then finalise; returns the new ``meta.json``'s dict with
    ``build`` stats (shards tokenised and reused, tokens, seconds)."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    block_len = seq_len + 1
    _remove_stale(d)
    input_chars = _input_chars(spec.files + spec.val_files)
    settings = _settings(d, shard_chars, input_chars)
    holdout = None if spec.val_files else spec.val_fraction
    parts: dict[str, dict[int, dict]] = {"t": {}, "v": {}}
    stats = {"tokenised": 0, "reused": 0, "tokens": 0, "shard_chars": settings["shard_chars"]}
    pending: dict[cf.Future, tuple] = {}
    parallel = input_chars > 1.5 * settings["shard_chars"]
    bar = tqdm(desc=f"prepare {spec.name}", unit="tok", unit_scale=True, disable=not progress, leave=progress,
               dynamic_ncols=True)

    def collect(done) -> None:
        for fut in done:
            kind, index, first, chars = pending.pop(fut)
            part = _write_part(d, kind, index, first, chars, dtype, fut.result())
            parts[kind][index] = part
            stats["tokenised"] += 1
            stats["tokens"] += part["tokens"]
            bar.update(part["tokens"])
            bar.set_postfix(shards=stats["tokenised"], reused=stats["reused"], refresh=False)

    try:
        sources = [("t", spec.files, holdout)] + ([("v", spec.val_files, None)] if spec.val_files else [])
        for kind, files, hold in sources:
            for chunk in iter_chunks(spec, files, kind, settings["shard_chars"], settings["shard_docs"]):
                part = _part_ok(d, chunk, dtype)
                if part is not None:
                    parts[kind][chunk.index] = part
                    stats["reused"] += 1
                    continue
                executor = executors.get(parallel)
                while len(pending) >= executor.slots:
                    collect(cf.wait(pending, return_when=cf.FIRST_COMPLETED).done)
                fut = executor.submit((chunk.texts, eos, dtype.str, hold, block_len))
                pending[fut] = (kind, chunk.index, chunk.first_doc, chunk.chars)
                if fut.done():
                    collect([fut])
        while pending:
            collect(cf.wait(pending, return_when=cf.FIRST_COMPLETED).done)
    finally:
        for fut in pending:
            fut.cancel()
        bar.close()
    meta = finalise(spec, d, parts, block_len, dtype, holdout, fingerprint, eos, seq_len)
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    stats["tokens_per_s"] = round(stats["tokens"] / max(stats["seconds"], 1e-9), 1)
    return {**meta, "build": stats}


def _split_around(entry: dict, holes: list[tuple[int, int]]) -> list[list]:
    """The token ranges of a train shard without the (offset, length) documents in ``holes``."""
    segs, pos = [], 0
    for off, n in sorted(holes):
        if off > pos:
            segs.append([entry["file"], pos, off])
        pos = off + n
    if entry["tokens"] > pos:
        segs.append([entry["file"], pos, entry["tokens"]])
    return segs


def finalise(spec: DomainSpec, d: Path, parts: dict[str, dict[int, dict]], block_len: int, dtype: np.dtype,
             holdout: float | None, fingerprint: str, eos: int, seq_len: int) -> dict:
    """Validation hold-out across all parts, ``val-holdout.npy``, the checks, and ``meta.json`` (last)."""
    train_parts = [parts["t"][i] for i in sorted(parts["t"])]
    val_parts = [parts["v"][i] for i in sorted(parts["v"])]
    assert [p["index"] for p in train_parts] == list(range(len(train_parts))), "a train part is missing"
    if not train_parts:
        raise UsageError(f"domain {spec.name}: no documents in {spec.files}")
    if spec.val_files and not val_parts:
        raise UsageError(f"domain {spec.name}: no documents in val_files {spec.val_files}")
    shards: dict[str, dict] = {}
    holes: dict[int, list[tuple[int, int]]] = {}
    n_docs = sum(p["docs"] for p in train_parts)
    if holdout is not None:
        # every document with hash < val_fraction, in (hash, file order); then top-ups until one block
        rows = []  # (hash, part, index in part, tokens, offset in the part's held shard)
        for p in train_parts:
            off = 0
            for f, j, n in p["held_docs"]:
                rows.append((f, p["index"], j, n, off))
                off += n
        rows.sort()
        held_tokens = sum(r[3] for r in rows)
        topups = []
        if held_tokens < block_len:
            cands = sorted((f, p["index"], j, off, n) for p in train_parts for f, j, off, n in p["candidates"])
            for f, pi, j, off, n in cands:
                if held_tokens >= block_len:
                    break
                topups.append((pi, off, n, f))
                holes.setdefault(pi, []).append((off, n))
                held_tokens += n
        val_segments = []
        if held_tokens:
            entry = _write_holdout(d, train_parts, rows, topups, held_tokens, dtype)
            shards[HOLDOUT] = entry
            val_segments = [[HOLDOUT, 0, held_tokens]]
        val_docs, train_docs = len(rows) + len(topups), n_docs - len(rows) - len(topups)
        topped_up = len(topups)
        doc_table = [(r[0], r[3]) for r in rows] + [(t[3], t[2]) for t in topups]
    else:
        topped_up = 0
        val_segments = [[p["files"]["val"]["file"], 0, p["files"]["val"]["tokens"]] for p in val_parts
                        if "val" in p["files"]]
        val_docs, train_docs = sum(p["docs"] for p in val_parts), n_docs
        doc_table = [(f, n) for p in val_parts for f, n in p["val_docs"]]
    train_segments = []
    for p in train_parts:
        for s, e in p["files"].items():
            shards[e["file"]] = {k: e[k] for k in ("tokens", "bytes", "crc32")}
        if "train" in p["files"]:
            train_segments += _split_around(p["files"]["train"], holes.get(p["index"], []))
    for p in val_parts:
        for e in p["files"].values():
            shards[e["file"]] = {k: e[k] for k in ("tokens", "bytes", "crc32")}
    if holdout is not None:  # the held shards are copied into val-holdout.npy; only it is read
        shards = {f: e for f, e in shards.items() if not f.endswith(".held.npy")}
    train_tokens = sum(b - a for _, a, b in train_segments)
    val_tokens = sum(b - a for _, a, b in val_segments)
    if train_tokens // block_len == 0:
        raise UsageError(f"domain {spec.name}: too little training text for one block of {block_len} tokens")
    if val_tokens // block_len == 0:
        raise UsageError(f"domain {spec.name}: too little validation text for one block of {block_len} tokens")
    # the validation documents in stream order, [hash, tokens]: evaluation sets sample whole documents from it
    table = np.array(doc_table, dtype=np.float64).reshape(-1, 2)
    assert int(table[:, 1].sum()) == val_tokens, "the validation document table does not add up"
    doc_entry = _save_npy(d / VAL_DOCS, table)  # not a token shard: checked beside them (load_meta)
    meta = {
        "format": CACHE_FORMAT, "name": spec.name, "seq_len": seq_len, "dtype": dtype.name,
        "tokenizer_fingerprint": fingerprint, "eos": eos, "files": spec.files, "val_files": spec.val_files,
        "select": spec.select, "val_fraction": holdout,
        "train": {"documents": train_docs, "tokens": train_tokens, "blocks": train_tokens // block_len,
                  "segments": train_segments},
        "val": {"documents": val_docs, "tokens": val_tokens, "blocks": val_tokens // block_len,
                "topped_up": topped_up, "segments": val_segments, "doc_table": doc_entry},
        "shards": shards,
    }
    _atomic_write(d / META, json.dumps(meta, indent=1).encode())
    return meta


def _write_holdout(d: Path, train_parts: list[dict], rows: list[tuple], topups: list[tuple], total: int,
                   dtype: np.dtype) -> dict:
    """Copy the held documents (in ``rows`` order), then the top-ups, into ``val-holdout.npy`` via memory maps."""
    by_index = {p["index"]: p for p in train_parts}
    maps: dict[str, np.ndarray] = {}

    def source(pi: int, stream: str) -> np.ndarray:
        f = by_index[pi]["files"][stream]["file"]
        if f not in maps:
            maps[f] = np.load(d / f, mmap_mode="r")
        return maps[f]

    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{HOLDOUT}.", suffix=".tmp")
    os.close(fd)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(total,))
        pos = 0
        for _, pi, _, n, off in rows:
            out[pos:pos + n] = source(pi, "held")[off:off + n]
            pos += n
        for pi, off, n, _ in topups:
            out[pos:pos + n] = source(pi, "train")[off:off + n]
            pos += n
        assert pos == total
        out.flush()
        del out
        entry = {"file": HOLDOUT, "tokens": total, "bytes": os.path.getsize(tmp), "crc32": _crc32(Path(tmp))}
        os.replace(tmp, d / HOLDOUT)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return entry


# ---------------------------------------------------------------------------------------------------------
# every domain

def domain_dir(cache: Path, spec: DomainSpec, fingerprint: str, eos: int, seq_len: int, dtype: np.dtype) -> Path:
    return cache / f"{safe_dirname(spec.name)}-{cache_key(spec, fingerprint, eos, seq_len, dtype)}"


def prepare_domains(specs: list[DomainSpec], tokenizer, seq_len: int, cache_dir: str | Path | None = None, *,
                    workers: int | None = None, use_ray: bool = False, ray_address: str | None = None,
                    verify: bool = False, progress: bool | None = None, dtype: Any = None,
                    shard_chars: int | None = None) -> dict[str, PackedDomain]:
    """Tokenised, packed, cached blocks for every domain (memory-mapped; cheap after the first call).

    A missing (or unfinished, or damaged) cache is built streamed, tokenised by ``workers`` processes (default:
    the machine's cores; ``use_ray``: Ray Data's ``map_batches`` across the cluster at ``ray_address``), resumed
    from its complete shards. ``verify`` also checks every shard's checksum (``ddk data prepare``); without it, a
    cached domain is checked by its files' sizes and headers. ``dtype`` forces the token dtype (default:
    :func:`ddk.data.domains.token_dtype`). A conversation domain (:func:`ddk.data.chat_cache.domain_form`) is
    built by :mod:`ddk.data.chat_cache`: rows checked and rendered with the tokenizer's chat template.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UsageError("tokenizer: has no eos_token; documents need a separator")
    fits = token_dtype(tokenizer)
    dt = np.dtype(dtype) if dtype is not None else fits
    if dt not in (np.dtype(np.uint16), np.dtype(np.uint32)):
        raise UsageError(f"dtype: the cache holds uint16 or uint32 token ids, not {dt.name}")
    if dt.itemsize < fits.itemsize:
        raise UsageError(f"dtype: the tokenizer's ids do not fit {dt.name}")
    if progress is None:
        progress = sys.stderr.isatty()
    fingerprint = tokenizer_fingerprint(tokenizer)
    executors = Executors(tokenizer, workers, use_ray, ray_address, int(shard_chars or SHARD_CHARS))
    out: dict[str, PackedDomain] = {}
    from ddk.data.chat_cache import KIND, domain_form, ensure_chat_domain

    forms = {spec.name: domain_form(spec) for spec in specs}  # before anything is built: a mismatch is exit 2
    try:
        for spec in specs:
            if forms[spec.name] == KIND:  # conversations: their own cache (one padded conversation per block)
                out[spec.name] = ensure_chat_domain(spec, cache, tokenizer, seq_len, dt, fingerprint, verify)
                continue
            d = domain_dir(cache, spec, fingerprint, eos, seq_len, dt)
            out[spec.name] = _ensure(spec, d, executors, eos, seq_len, dt, fingerprint, shard_chars, progress,
                                     verify)
    except BaseException:
        executors.close(abort=True)
        raise
    executors.close()
    return out


def prepare_data(cfg, tokenizer) -> dict[str, PackedDomain]:
    """The token cache of a train config's domains (``data.*``), in ``data.cache_dir`` (resolved here, in
    ``cfg``, so every worker uses the same folder); every domain must have a validation block. What the
    trainer's driver and ``ddk teacher precompute`` both prepare."""
    if cfg.data.cache_dir is None:
        cfg.data.cache_dir = str(default_cache_dir())  # the same folder for every worker
    domains = prepare_domains(load_domain_specs(cfg.data.source()), tokenizer, cfg.data.seq_len, cfg.data.cache_dir)
    for n in sorted(domains):
        if len(domains[n].val) < 1:
            raise UsageError(f"data: domain {n} has no validation block")
    return domains


def _ensure(spec, d, executors, eos, seq_len, dtype, fingerprint, shard_chars, progress, verify) -> PackedDomain:
    packed = _try_open(d, verify)
    if packed is not None:
        return packed
    with _locked(d):
        packed = _try_open(d, verify)  # another process may have finished it meanwhile
        if packed is not None:
            return packed
        with contextlib.suppress(FileNotFoundError):
            (d / META).unlink()
        meta = build_domain(spec, d, executors, eos, seq_len, dtype, fingerprint, shard_chars, progress)
    b = meta["build"]
    log.info("domain %s: %d train + %d val blocks of %d tokens (%s) -> %s; %d shards tokenised (%.0f tokens/s), "
             "%d reused", spec.name, meta["train"]["blocks"], meta["val"]["blocks"], seq_len + 1, dtype.name, d,
             b["tokenised"], b["tokens_per_s"], b["reused"])
    packed = open_domain(d, {k: v for k, v in meta.items() if k != "build"})
    packed.build = b
    return packed


def _try_open(d: Path, verify: bool) -> PackedDomain | None:
    meta = load_meta(d, verify)
    if meta is None:
        return None
    try:
        return open_domain(d, meta)
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("cache %s: %s; rebuilding", d, e)
        return None
