"""Domains: from data.yaml to packed, cached, memory-mapped token blocks.

The data contract (docs/architecture.md#data-contract): a domain is a name and one or more files -- ``.jsonl``
(field ``text``), ``.jsonl.gz`` / ``.jsonl.zst`` (the same, compressed), ``.txt`` (also ``.txt.gz`` /
``.txt.zst``), ``.parquet`` (column ``text``) or a Hugging Face ``save_to_disk`` directory (column ``text``) -- or
one file whose records carry a ``domain`` field. ``.txt`` files are split into documents at blank lines (one or
more empty lines), so a long text file still yields many documents to hold validation out from. Every reader
streams: jsonl line by line, Parquet by record batches, a saved dataset by batches of its memory-mapped table.

Packing: each document is tokenised (no special tokens) and followed by EOS; a domain's training documents, in
file order, make one token stream, cut into blocks of ``seq_len + 1`` tokens (a block gives ``seq_len`` inputs
and their ``seq_len`` next-token labels); the tail that does not fill a block is dropped. Validation is the
domain's ``val_files`` when given (file order); otherwise the documents whose stable hash (sha1 of the text)
falls below ``val_fraction`` -- the same documents whatever the file order, machine or process -- in hash order,
and then more documents in hash order until validation fills at least one block.

Conversation domains (files of ``messages`` / ``prompt`` + ``completion`` rows) have their own cache, one padded
conversation per block with a loss mask: :mod:`ddk.data.chat_cache`.

The cache (format 4) is built by :mod:`ddk.data.cache` (streamed, in bounded memory, tokenised in parallel,
resumable) under ``cache_dir/<domain>-<key>/``: the token streams as ``.npy`` shards of uint16 ids when the
vocabulary fits in 65,536 ids (uint32 otherwise), and ``meta.json``, written last, listing them. The key covers
the input files (path, size, mtime), the tokenizer fingerprint, EOS, ``seq_len``, the split settings, the token
dtype and the format version, so an old or different cache is rebuilt, never misread. :class:`TokenBlocks` reads
a domain's shards as one ``[n_blocks, seq_len + 1]`` array, memory-mapped; consumers convert the rows they index
to int64 where they need tensors.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import yaml

from ddk.data.chat import IGNORE_INDEX
from ddk.data.tasks import TaskSpec, parse_task
from ddk.errors import UsageError

log = logging.getLogger(__name__)

# 4: + conversation domains (ddk.data.chat_cache: rows, loss masks, lengths); 3: + the validation documents' table
# (val-docs.npy); 2: streamed shards; 1: one int32 train.npy
CACHE_FORMAT = 4
FILE_KINDS = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".txt", ".txt.gz", ".txt.zst", ".parquet")
TEXT_SUFFIXES = FILE_KINDS  # the name older callers used


def file_kind(path: str | Path) -> str | None:
    """The reader for ``path``: one of :data:`FILE_KINDS`, ``"hf"`` (a save_to_disk directory) or None."""
    p = Path(path)
    if p.is_dir():
        return "hf"
    name = p.name.lower()
    for kind in sorted(FILE_KINDS, key=len, reverse=True):
        if name.endswith(kind):
            return kind
    return None


def _base_name(p: Path) -> str | None:
    """``train`` for ``train.jsonl.zst`` or a ``train/`` dataset folder; None for a file of no known kind."""
    kind = file_kind(p)
    if kind is None:
        return None
    return p.name if kind == "hf" else p.name[: -len(kind)]


@dataclass
class DomainSpec:
    """Where one domain's text lives. Paths are absolute after :func:`load_domain_specs`.

    ``select`` is set for the single-file form: keep only records whose ``domain`` field equals it. ``task``: the
    entry's optional ``task:`` (:func:`ddk.data.tasks.parse_task`), what ``ddk eval --tasks`` checks answers with.
    ``overflow``: what a conversation longer than ``seq_len`` becomes, ``truncate_left`` (default) or ``drop``.
    """

    name: str
    files: list[str]
    val_files: list[str] = field(default_factory=list)
    val_fraction: float = 0.05
    select: str | None = None
    task: TaskSpec | None = None
    overflow: str = "truncate_left"


class TokenBlocks:
    """``[n_blocks, block_len]`` token blocks over 1-D token streams (memory-mapped shards) read as one array.

    Block ``i`` is tokens ``[i * block_len, (i + 1) * block_len)`` of the pieces concatenated; the tail that does
    not fill a block is not part of it. Indexing gives numpy arrays of the cache's dtype (uint16 or uint32): a row
    (a view when it lies in one shard), a slice of rows, rows by a list of indices; ``np.asarray`` gives all of
    it. ``len``, ``shape``, ``size`` and ``dtype`` are those of the whole array. Pickled, it carries the shard
    paths, not the tokens.
    """

    def __init__(self, pieces: Sequence[np.ndarray], block_len: int, dtype: Any = None,
                 segments: list[tuple[str, int, int]] | None = None):
        if block_len < 1:
            raise ValueError("block_len must be positive")
        self.block_len = int(block_len)
        self._pieces = [p.reshape(-1) for p in pieces if p.size]
        self.dtype = np.dtype(dtype if dtype is not None else (self._pieces[0].dtype if self._pieces else np.uint16))
        self._ends = np.cumsum([len(p) for p in self._pieces], dtype=np.int64)
        total = int(self._ends[-1]) if len(self._ends) else 0
        self._n = total // self.block_len
        self._segments = segments
        # one shard: a plain (memory-mapped) 2-D view, numpy's own indexing
        self._whole = (self._pieces[0][: self._n * self.block_len].reshape(self._n, self.block_len)
                       if len(self._pieces) == 1 else None)

    @classmethod
    def open(cls, segments: list[tuple[str, int, int]], block_len: int, dtype: Any) -> "TokenBlocks":
        """Memory-map ``(path, start, stop)`` token ranges of 1-D ``.npy`` shards, in order."""
        maps: dict[str, np.ndarray] = {}
        pieces = []
        for path, a, b in segments:
            if path not in maps:
                maps[path] = np.load(path, mmap_mode="r")
            pieces.append(maps[path][a:b])
        return cls(pieces, block_len, dtype, segments=[(str(p), int(a), int(b)) for p, a, b in segments])

    def __reduce__(self):
        if self._segments is not None:
            return (TokenBlocks.open, (self._segments, self.block_len, self.dtype.str))
        return (TokenBlocks, ([np.asarray(p) for p in self._pieces], self.block_len, self.dtype.str))

    # -- the array's shape ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    @property
    def shape(self) -> tuple[int, int]:
        return (self._n, self.block_len)

    @property
    def size(self) -> int:
        return self._n * self.block_len

    ndim = 2

    def __repr__(self) -> str:
        return f"TokenBlocks(shape={self.shape}, dtype={self.dtype}, shards={len(self._pieces)})"

    # -- reading ----------------------------------------------------------------------------------------------
    def tokens(self, a: int, b: int) -> np.ndarray:
        """Tokens ``[a, b)`` of the concatenated stream (a view when they lie in one shard)."""
        if b <= a:
            return np.zeros(0, self.dtype)
        k = int(np.searchsorted(self._ends, a, side="right"))
        base = int(self._ends[k - 1]) if k else 0
        p = self._pieces[k]
        if b <= int(self._ends[k]):
            return p[a - base: b - base]
        out, got = [p[a - base:]], int(self._ends[k]) - a
        while got < b - a:
            k += 1
            p = self._pieces[k]
            take = min(len(p), b - a - got)
            out.append(p[:take])
            got += take
        return np.concatenate(out)

    def _row(self, i: int) -> np.ndarray:
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"block {i} out of range for {self._n} blocks")
        return self.tokens(i * self.block_len, (i + 1) * self.block_len)

    def __getitem__(self, idx):
        if self._whole is not None:
            return self._whole[idx]
        if isinstance(idx, tuple):
            if not idx:
                return np.asarray(self)
            head, rest = idx[0], idx[1:]
            rows = self[head]
            return rows[rest] if rows.ndim == 1 else rows[(slice(None),) + rest]
        if isinstance(idx, slice):
            start, stop, step = idx.indices(self._n)
            if step == 1:
                stop = max(start, stop)
                return self.tokens(start * self.block_len, stop * self.block_len).reshape(-1, self.block_len)
            return self._rows(range(start, stop, step))
        try:
            return self._row(operator.index(idx))
        except TypeError:
            pass
        ix = np.asarray(idx)
        if ix.dtype == bool:
            ix = np.flatnonzero(ix)
        return self._rows(ix.reshape(-1).tolist()).reshape(ix.shape + (self.block_len,))

    def _rows(self, ids) -> np.ndarray:
        rows = [self._row(int(i)) for i in ids]
        return np.stack(rows) if rows else np.zeros((0, self.block_len), self.dtype)

    def __iter__(self):
        for i in range(self._n):
            yield self._row(i)

    def __array__(self, dtype=None, copy=None):
        arr = self[:]
        return arr.astype(dtype) if dtype is not None else arr

    def astype(self, dtype) -> np.ndarray:
        return np.asarray(self[:], dtype=dtype)


@dataclass
class PackedDomain:
    """A domain's token blocks, ``[n_blocks, seq_len + 1]`` (memory-mapped from the cache: :class:`TokenBlocks` of
    uint16 or uint32 ids; tests may pass plain arrays). ``info`` is the cache's ``meta.json`` (documents, tokens,
    shards); ``build`` says what the call that built it did (None when it was already cached). ``val_docs``: the
    validation stream's documents in order, ``{"lengths": int64 [D] (tokens, EOS included), "keys": uint64 [D]
    (from the text's hash)}``, what evaluation sets are drawn from (ddk.data.evalset); None for plain arrays."""

    name: str
    train: Any
    val: Any
    info: dict = field(default_factory=dict)
    build: dict | None = None
    val_docs: dict | None = None
    train_mask: Any = None  # conversation domains: uint8 [n, seq_len + 1], 1 on label (assistant) tokens
    val_mask: Any = None

    @property
    def seq_len(self) -> int:
        return int(self.train.shape[1]) - 1

    @property
    def conversations(self) -> bool:
        """A conversation domain: only its assistant tokens are labels (``train_mask`` / ``val_mask``)."""
        return self.train_mask is not None

    def targets(self, rows: Sequence[int], split: str = "train") -> np.ndarray:
        """int64 ``[len(rows), seq_len]`` next-token targets of ``rows``: ``block[1:]``, with
        ``IGNORE_INDEX`` (-100) where the token is not a label (a conversation's non-assistant tokens, padding)."""
        blocks = self.train if split == "train" else self.val
        ids = np.stack([np.asarray(blocks[int(i)], dtype=np.int64) for i in rows]) if len(rows) else \
            np.zeros((0, self.seq_len + 1), np.int64)
        out = ids[:, 1:].copy()
        mask = self.train_mask if split == "train" else self.val_mask
        if mask is not None and len(rows):
            m = np.stack([np.asarray(mask[int(i)], dtype=bool) for i in rows])
            out[~m[:, 1:]] = IGNORE_INDEX
        return out


# ---------------------------------------------------------------------------------------------------------
# specs: data.yaml / directory / inline list -> [DomainSpec]

def default_cache_dir() -> Path:
    """``$DDK_CACHE_DIR``, else ``$XDG_CACHE_HOME/ddk/tokens``, else ``~/.cache/ddk/tokens``."""
    if os.environ.get("DDK_CACHE_DIR"):
        return Path(os.environ["DDK_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ddk" / "tokens"


def load_domain_specs(source: Any, base_dir: str | Path | None = None, origin: str | None = None) -> list[DomainSpec]:
    """Domain specs from any of the accepted forms.

    ``source`` is one of: a data.yaml path; a directory holding ``data.yaml``; a directory of per-domain
    subdirectories (``data/<domain>/train.*`` and optional ``val.*``, the kit's ``data/``); a train config YAML
    (its ``data`` section is used); the parsed data.yaml mapping; or the inline list of domain entries.
    Relative paths resolve against the YAML file's directory (``base_dir`` for in-memory forms, default cwd).
    ``origin`` names the file the entries came from in error messages (set when ``source`` is a path).
    """
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if path.is_dir():
            if (path / "data.yaml").is_file():
                return load_domain_specs(path / "data.yaml")
            return _specs_from_directory(path)
        if not path.is_file():
            raise UsageError(f"data: no such file or directory: {path}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise UsageError(f"data: cannot read {path} ({str(e).splitlines()[0]})") from None
        if is_train_config(raw):  # its data section: data.file (a data.yaml) or the inline data.domains
            return load_domain_specs(train_data_source(raw["data"], path.resolve().parent),
                                     base_dir=path.resolve().parent, origin=str(path))
        return load_domain_specs(raw, base_dir=path.resolve().parent, origin=str(path))

    base = Path(base_dir) if base_dir is not None else Path.cwd()
    where = f"{origin}: data.domains" if origin else "data.domains"
    if isinstance(source, list):
        return _specs_from_entries(source, base, 0.05, where)
    if isinstance(source, dict):
        extra = set(source) - {"domains", "file", "val_file", "val_fraction"}
        if extra:
            raise UsageError(f"data: unknown key {sorted(extra)[0]!r} (known: domains, file, val_file, val_fraction)")
        frac = _val_fraction(source.get("val_fraction", 0.05))
        if ("domains" in source) == ("file" in source):
            raise UsageError("data: give exactly one of 'domains' (a list) or 'file' (records with a domain field)")
        if "domains" in source:
            return _specs_from_entries(source["domains"], base, frac, where)
        return _specs_from_single_file(source["file"], source.get("val_file"), base, frac)
    raise UsageError(f"data: expected a data.yaml path, a directory or a list of domains, got {type(source).__name__}")


def is_train_config(raw: Any) -> bool:
    """A parsed YAML that is a train config (a ``data`` section), not a data.yaml (``domains`` at the top)."""
    return isinstance(raw, dict) and isinstance(raw.get("data"), dict) and "domains" not in raw


TRAIN_DATA_KEYS = ("file", "domains", "seq_len", "val_fraction", "cache_dir")  # a train config's data section


def train_data_source(section: dict, base: Path) -> str | dict:
    """The domains a train config's ``data`` section names, as :func:`load_domain_specs` reads them:
    ``data.file`` (a data.yaml or data folder, against ``base``, the config's folder) or the inline
    ``data.domains`` with ``data.val_fraction``. (The full config is parsed by ``ddk.trainer.config``.)"""
    extra = sorted(set(section) - set(TRAIN_DATA_KEYS))
    if extra:
        raise UsageError(f"data.{extra[0]}: unknown key (known: {', '.join(TRAIN_DATA_KEYS)})")
    if section.get("file") is None and section.get("domains") is None:
        raise UsageError("data: the train config has neither data.file nor data.domains")
    if section.get("file") is not None:
        if not isinstance(section["file"], str) or not section["file"]:
            raise UsageError("data.file: must be a path (a data.yaml or a data folder)")
        return str(base / Path(section["file"]).expanduser())
    return {"domains": section["domains"], "val_fraction": section.get("val_fraction", 0.05)}


def _val_fraction(v: Any) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < 1:
        raise UsageError(f"val_fraction: must be a number between 0 and 1, got {v!r}")
    return float(v)


def _abs(p: Any, base: Path, label: str) -> str:
    if not isinstance(p, str) or not p:
        raise UsageError(f"{label}: file names must be strings, got {p!r}")
    q = Path(p).expanduser()
    q = q if q.is_absolute() else base / q
    if not q.exists():
        raise UsageError(f"{label}: no such file: {q}")
    if not (q.is_dir() or file_kind(q)):
        raise UsageError(f"{label}: unknown file type {q.suffix or '(none)'} for {q} "
                         f"(use .jsonl, .jsonl.gz, .jsonl.zst, .txt, .parquet or a save_to_disk directory)")
    return str(q.resolve())


OVERFLOWS = ("truncate_left", "drop")  # a conversation longer than seq_len: keep its end, or leave it out


def _entry_extras(e: dict, where: str) -> dict:
    """An entry's optional ``task`` and ``overflow``, checked (``where`` names the file and the entry)."""
    task = parse_task(e["task"], f"{where}.task") if e.get("task") is not None else None
    overflow = e.get("overflow") or "truncate_left"
    if overflow not in OVERFLOWS:
        raise UsageError(f"{where}.overflow: {overflow!r} is not one of {', '.join(OVERFLOWS)}")
    return {"task": task, "overflow": overflow}


def _specs_from_entries(entries: Any, base: Path, frac: float, where: str = "data.domains") -> list[DomainSpec]:
    if not isinstance(entries, list) or not entries:
        raise UsageError("data.domains: must be a non-empty list of {name, files, val_files?}")
    specs: list[DomainSpec] = []
    for i, e in enumerate(entries):
        if hasattr(e, "model_dump"):  # a config.DomainEntry
            e = e.model_dump()
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not e["name"]:
            raise UsageError(f"data.domains[{i}]: each domain needs a 'name'")
        name = e["name"]
        extra = set(e) - {"name", "files", "val_files", "val_fraction", "task", "overflow"}
        if extra:
            raise UsageError(f"domain {name}: unknown key {sorted(extra)[0]!r}")
        files = e.get("files") or []
        files = [files] if isinstance(files, str) else files
        vals = e.get("val_files") or []
        vals = [vals] if isinstance(vals, str) else vals
        if not files:
            raise UsageError(f"domain {name}: no files")
        specs.append(DomainSpec(name=name, files=[_abs(f, base, f"domain {name}") for f in files],
                                val_files=[_abs(f, base, f"domain {name}") for f in vals],
                                val_fraction=_val_fraction(e.get("val_fraction", frac)),
                                **_entry_extras(e, f"{where}[{i}] ({name})")))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise UsageError(f"data.domains: duplicate domain name in {names}")
    return specs


def _specs_from_single_file(file: Any, val_file: Any, base: Path, frac: float) -> list[DomainSpec]:
    path = _abs(file, base, "data file")
    val = _abs(val_file, base, "data val_file") if val_file else None
    names: list[str] = []
    for rec in _records(path, "(all)", columns=("domain",)):
        d = rec.get("domain")
        if not isinstance(d, str) or not d:
            raise UsageError(f"data.file {path}: every record needs a string 'domain' field")
        if d not in names:
            names.append(d)
    if not names:
        raise UsageError(f"data.file {path}: no records")
    return [DomainSpec(name=n, files=[path], val_files=[val] if val else [], val_fraction=frac, select=n)
            for n in names]


def _specs_from_directory(path: Path) -> list[DomainSpec]:
    """``DIR/<domain>/train.*`` (+ ``val.*``): the kit's data/ layout, without a data.yaml."""
    specs = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        train = sorted(f for f in sub.iterdir() if _base_name(f) == "train")
        val = sorted(f for f in sub.iterdir() if _base_name(f) in ("val", "validation"))
        if train:
            specs.append(DomainSpec(name=sub.name, files=[str(f.resolve()) for f in train],
                                    val_files=[str(f.resolve()) for f in val]))
    if not specs:
        raise UsageError(f"data: {path} has no data.yaml and no <domain>/train.* subdirectories")
    return specs


# ---------------------------------------------------------------------------------------------------------
# reading documents (streamed: one record at a time, whatever the file's size)

def _is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any((path / n).exists() for n in ("dataset_info.json", "dataset_dict.json", "state.json"))


def open_text(path: Path, kind: str) -> io.TextIOBase:
    """``path`` as UTF-8 text (universal newlines), decompressed on the fly for ``.gz`` and ``.zst``."""
    if kind.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if kind.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise UsageError(f"{path}: reading .zst needs the zstandard package (pip install zstandard)") from None
        raw = open(path, "rb")
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
        return io.TextIOWrapper(reader, encoding="utf-8")
    return open(path, encoding="utf-8")


def _records(path: str, domain: str, columns: tuple[str, ...] = ("text",)) -> Iterator[dict]:
    """Yield records (dicts holding at least ``columns``) from one file of any supported type, streamed."""
    p = Path(path)
    kind = file_kind(p)
    if kind == "hf":
        if not _is_hf_dataset_dir(p):
            raise UsageError(f"domain {domain}: {p} is a directory but not a save_to_disk dataset")
        from datasets import Dataset, DatasetDict, load_from_disk

        ds = load_from_disk(str(p))  # memory-mapped Arrow files: read batch by batch below
        if isinstance(ds, DatasetDict):  # a saved DatasetDict: its train split (or its only split)
            if "train" in ds:
                ds = ds["train"]
            elif len(ds) == 1:
                ds = next(iter(ds.values()))
            else:
                raise UsageError(f"domain {domain}: {p} holds splits {list(ds)}; save one split or a 'train' split")
        assert isinstance(ds, Dataset)
        missing = [c for c in columns if c not in ds.column_names]
        if missing:
            raise UsageError(f"domain {domain}: {p} has no column {missing[0]!r}")
        for batch in ds.select_columns(list(columns)).iter(batch_size=1000):
            for i in range(len(batch[columns[0]])):
                yield {c: batch[c][i] for c in columns}
    elif kind in (".jsonl", ".jsonl.gz", ".jsonl.zst"):
        try:
            with open_text(p, kind) as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UsageError(f"domain {domain}: {p}:{lineno}: not JSON ({e.msg})") from None
                    if not isinstance(rec, dict) or any(c not in rec for c in columns):
                        missing = next(c for c in columns if not isinstance(rec, dict) or c not in rec)
                        raise UsageError(f"domain {domain}: {p}:{lineno}: record has no {missing!r} field")
                    yield rec
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise UsageError(f"domain {domain}: {p}: cannot read ({e})") from None
    elif kind in (".txt", ".txt.gz", ".txt.zst"):
        if columns != ("text",):
            raise UsageError(f"domain {domain}: {p}: a .txt file has no 'domain' field")
        paragraph: list[str] = []
        try:
            with open_text(p, kind) as fh:
                for line in fh:
                    if line.strip():
                        paragraph.append(line)
                    elif paragraph:
                        yield {"text": "".join(paragraph).rstrip("\n")}
                        paragraph = []
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise UsageError(f"domain {domain}: {p}: cannot read ({e})") from None
        if paragraph:
            yield {"text": "".join(paragraph).rstrip("\n")}
    elif kind == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(p)
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise UsageError(f"domain {domain}: {p} has no column {missing[0]!r}")
        for batch in pf.iter_batches(columns=list(columns), batch_size=1000):  # row group by row group
            cols = {c: batch.column(c).to_pylist() for c in columns}
            for i in range(batch.num_rows):
                yield {c: cols[c][i] for c in columns}
    else:
        raise UsageError(f"domain {domain}: unknown file type {p.suffix or '(none)'} for {p}")


def read_documents(spec: DomainSpec, files: Iterable[str]) -> Iterator[str]:
    """The domain's documents (non-empty texts) from ``files``, in file order, streamed."""
    columns = ("text", "domain") if spec.select is not None else ("text",)
    for f in files:
        for rec in _records(f, spec.name, columns):
            if spec.select is not None and rec.get("domain") != spec.select:
                continue
            text = rec.get("text")
            if not isinstance(text, str):
                raise UsageError(f"domain {spec.name}: {f}: 'text' must be a string")
            if text:
                yield text


def doc_hash_fraction(text: str) -> float:
    """A stable number in [0, 1) for a document: the held-out choice depends only on the text."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") / 2.0**64


# ---------------------------------------------------------------------------------------------------------
# cache

def token_dtype(tokenizer) -> np.dtype:
    """uint16 when every id of ``tokenizer`` fits (ids < 65,536), else uint32."""
    vocab = tokenizer.get_vocab()
    top = max(vocab.values()) + 1 if vocab else 0
    top = max(top, len(tokenizer))
    return np.dtype(np.uint16) if top <= 2**16 else np.dtype(np.uint32)


def _file_signature(path: str) -> list:
    p = Path(path)
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    return [[str(q), (st := q.stat()).st_size, st.st_mtime_ns] for q in files]


def cache_key(spec: DomainSpec, fingerprint: str, eos_id: int, seq_len: int, dtype: Any = np.uint16) -> str:
    blob = json.dumps({
        "format": CACHE_FORMAT, "name": spec.name, "select": spec.select, "seq_len": seq_len,
        "tokenizer": fingerprint, "eos": eos_id, "dtype": np.dtype(dtype).name,
        "val_fraction": None if spec.val_files else spec.val_fraction,
        "files": [_file_signature(f) for f in spec.files],
        "val_files": [_file_signature(f) for f in spec.val_files],
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def safe_dirname(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[:64]


def natural_proportions(domains: dict[str, PackedDomain]) -> dict[str, float]:
    """Each domain's share of the training tokens (the KD baseline's fixed mixture)."""
    sizes = {name: float(d.train.size) for name, d in domains.items()}
    total = sum(sizes.values())
    return {name: s / total for name, s in sizes.items()}
