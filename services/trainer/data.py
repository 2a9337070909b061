"""Domains: from data.yaml to packed, cached, memory-mapped token blocks.

The data contract (ARCHITECTURE.md): a domain is a name and one or more files -- ``.jsonl`` (field ``text``),
``.txt``, ``.parquet`` (column ``text``) or a Hugging Face ``save_to_disk`` directory (column ``text``) -- or one
file whose records carry a ``domain`` field. ``.txt`` files are split into documents at blank lines (one or
more empty lines), so a long text file still yields many documents to hold validation out from.

Each domain's documents are tokenised once (no special tokens, EOS appended after every document), concatenated
and cut into blocks of ``seq_len + 1`` tokens (a block gives ``seq_len`` inputs and their ``seq_len`` next-token
labels); the tail that does not fill a block is dropped. Validation is the domain's ``val_files`` when given;
otherwise the documents whose stable hash (sha1 of the text) falls below ``val_fraction`` -- the same documents
whatever the file order, machine or process -- and at least enough of them for one block.

The blocks are cached as ``.npy`` files under ``cache_dir/<domain>-<key>/``, the key being the input files
(path, size, mtime), the tokenizer fingerprint, ``seq_len`` and the split settings; a later call (each Ray worker,
the next run) only memory-maps them. Files are written to a temporary name and ``os.replace``-d, with
``meta.json`` last, so two processes preparing the same cache at once both end up reading complete files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import yaml
from tqdm import tqdm

from ddk.errors import UsageError
from ddk.fingerprint import tokenizer_fingerprint

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the packing changes, so old caches are not reused
TEXT_SUFFIXES = (".jsonl", ".txt", ".parquet")


@dataclass
class DomainSpec:
    """Where one domain's text lives. Paths are absolute after :func:`load_domain_specs`.

    ``select`` is set for the single-file form: keep only records whose ``domain`` field equals it.
    """

    name: str
    files: list[str]
    val_files: list[str] = field(default_factory=list)
    val_fraction: float = 0.05
    select: str | None = None


@dataclass
class PackedDomain:
    """A domain's token blocks, ``[n_blocks, seq_len + 1]`` int32 (memory-mapped from the cache)."""

    name: str
    train: np.ndarray
    val: np.ndarray

    @property
    def seq_len(self) -> int:
        return int(self.train.shape[1]) - 1


# ---------------------------------------------------------------------------------------------------------
# specs: data.yaml / directory / inline list -> [DomainSpec]

def default_cache_dir() -> Path:
    """``$DDK_CACHE_DIR``, else ``$XDG_CACHE_HOME/ddk/tokens``, else ``~/.cache/ddk/tokens``."""
    if os.environ.get("DDK_CACHE_DIR"):
        return Path(os.environ["DDK_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ddk" / "tokens"


def load_domain_specs(source: Any, base_dir: str | Path | None = None) -> list[DomainSpec]:
    """Domain specs from any of the accepted forms.

    ``source`` is one of: a data.yaml path; a directory holding ``data.yaml``; a directory of per-domain
    subdirectories (``data/<domain>/train.*`` and optional ``val.*``, the kit's ``data/``); a train config YAML
    (its ``data`` section is used); the parsed data.yaml mapping; or the inline list of domain entries.
    Relative paths resolve against the YAML file's directory (``base_dir`` for in-memory forms, default cwd).
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
        from ddk.trainer.config import is_train_config, train_sections

        if is_train_config(raw):  # its data section, read by the train config's own parser
            return load_domain_specs(train_sections(raw, path.resolve().parent).data.source())
        return load_domain_specs(raw, base_dir=path.resolve().parent)

    base = Path(base_dir) if base_dir is not None else Path.cwd()
    if isinstance(source, list):
        return _specs_from_entries(source, base, 0.05)
    if isinstance(source, dict):
        extra = set(source) - {"domains", "file", "val_file", "val_fraction"}
        if extra:
            raise UsageError(f"data: unknown key {sorted(extra)[0]!r} (known: domains, file, val_file, val_fraction)")
        frac = _val_fraction(source.get("val_fraction", 0.05))
        if ("domains" in source) == ("file" in source):
            raise UsageError("data: give exactly one of 'domains' (a list) or 'file' (records with a domain field)")
        if "domains" in source:
            return _specs_from_entries(source["domains"], base, frac)
        return _specs_from_single_file(source["file"], source.get("val_file"), base, frac)
    raise UsageError(f"data: expected a data.yaml path, a directory or a list of domains, got {type(source).__name__}")


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
    if not (q.is_dir() or q.suffix in TEXT_SUFFIXES):
        raise UsageError(f"{label}: unknown file type {q.suffix or '(none)'} for {q} "
                         f"(use .jsonl, .txt, .parquet or a save_to_disk directory)")
    return str(q.resolve())


def _specs_from_entries(entries: Any, base: Path, frac: float) -> list[DomainSpec]:
    if not isinstance(entries, list) or not entries:
        raise UsageError("data.domains: must be a non-empty list of {name, files, val_files?}")
    specs: list[DomainSpec] = []
    for i, e in enumerate(entries):
        if hasattr(e, "model_dump"):  # a config.DomainEntry
            e = e.model_dump()
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not e["name"]:
            raise UsageError(f"data.domains[{i}]: each domain needs a 'name'")
        name = e["name"]
        extra = set(e) - {"name", "files", "val_files", "val_fraction"}
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
                                val_fraction=_val_fraction(e.get("val_fraction", frac))))
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
        train = sorted(f for f in sub.iterdir() if f.stem == "train" and (f.suffix in TEXT_SUFFIXES or f.is_dir()))
        val = sorted(f for f in sub.iterdir() if f.stem in ("val", "validation")
                     and (f.suffix in TEXT_SUFFIXES or f.is_dir()))
        if train:
            specs.append(DomainSpec(name=sub.name, files=[str(f.resolve()) for f in train],
                                    val_files=[str(f.resolve()) for f in val]))
    if not specs:
        raise UsageError(f"data: {path} has no data.yaml and no <domain>/train.* subdirectories")
    return specs


# ---------------------------------------------------------------------------------------------------------
# reading documents

def _is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any((path / n).exists() for n in ("dataset_info.json", "dataset_dict.json", "state.json"))


def _records(path: str, domain: str, columns: tuple[str, ...] = ("text",)) -> Iterator[dict]:
    """Yield records (dicts holding at least ``columns``) from one file of any supported type."""
    p = Path(path)
    if p.is_dir():
        if not _is_hf_dataset_dir(p):
            raise UsageError(f"domain {domain}: {p} is a directory but not a save_to_disk dataset")
        from datasets import Dataset, DatasetDict, load_from_disk

        ds = load_from_disk(str(p))
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
    elif p.suffix == ".jsonl":
        with open(p, encoding="utf-8") as fh:
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
    elif p.suffix == ".txt":
        if columns != ("text",):
            raise UsageError(f"domain {domain}: {p}: a .txt file has no 'domain' field")
        paragraph: list[str] = []
        with open(p, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    paragraph.append(line)
                elif paragraph:
                    yield {"text": "".join(paragraph).rstrip("\n")}
                    paragraph = []
        if paragraph:
            yield {"text": "".join(paragraph).rstrip("\n")}
    elif p.suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(p)
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise UsageError(f"domain {domain}: {p} has no column {missing[0]!r}")
        for batch in pf.iter_batches(columns=list(columns), batch_size=1000):
            cols = {c: batch.column(c).to_pylist() for c in columns}
            for i in range(batch.num_rows):
                yield {c: cols[c][i] for c in columns}
    else:
        raise UsageError(f"domain {domain}: unknown file type {p.suffix or '(none)'} for {p}")


def read_documents(spec: DomainSpec, files: Iterable[str]) -> Iterator[str]:
    """The domain's documents (non-empty texts) from ``files``, in file order."""
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


# ---------------------------------------------------------------------------------------------------------
# tokenising and packing (pure functions of their inputs)

def doc_hash_fraction(text: str) -> float:
    """A stable number in [0, 1) for a document: the held-out choice depends only on the text."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") / 2.0**64


def pack(token_lists: Iterable[list[int]], eos_id: int, seq_len: int) -> np.ndarray:
    """Concatenate documents (EOS after each) and cut into ``[n, seq_len + 1]`` int32 blocks."""
    chunks = [np.asarray(t + [eos_id], dtype=np.int32) for t in token_lists]
    stream = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
    n = len(stream) // (seq_len + 1)
    return stream[: n * (seq_len + 1)].reshape(n, seq_len + 1)


def _tokenize(tokenizer, texts: list[str], desc: str) -> list[list[int]]:
    """Token ids of each text, without special tokens, in chunks (with a progress bar)."""
    out: list[list[int]] = []
    step = 512
    for i in tqdm(range(0, len(texts), step), desc=desc, unit="chunk", disable=len(texts) <= step,
                  leave=False):
        out.extend(tokenizer(texts[i:i + step], add_special_tokens=False)["input_ids"])
    return out


def split_and_pack(spec: DomainSpec, tokenizer, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Read, hold out validation, tokenise and pack one domain -> (train, val) blocks."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UsageError("tokenizer: has no eos_token; documents need a separator")
    docs = list(read_documents(spec, spec.files))
    if not docs:
        raise UsageError(f"domain {spec.name}: no documents in {spec.files}")
    if spec.val_files:
        val_docs = list(read_documents(spec, spec.val_files))
        if not val_docs:
            raise UsageError(f"domain {spec.name}: no documents in val_files {spec.val_files}")
        train = pack(_tokenize(tokenizer, docs, f"tokenise {spec.name}"), eos, seq_len)
        val = pack(_tokenize(tokenizer, val_docs, f"tokenise {spec.name} val"), eos, seq_len)
    else:
        toks = _tokenize(tokenizer, docs, f"tokenise {spec.name}")
        # Hold out by hash: first every document under val_fraction, then (in hash order) more until
        # validation fills at least one block. Train keeps file order.
        order = sorted(range(len(docs)), key=lambda i: doc_hash_fraction(docs[i]))
        held, n_tokens = set(), 0
        for i in order:
            if doc_hash_fraction(docs[i]) >= spec.val_fraction and n_tokens >= seq_len + 1:
                break
            held.add(i)
            n_tokens += len(toks[i]) + 1
        train = pack((toks[i] for i in range(len(docs)) if i not in held), eos, seq_len)
        val = pack((toks[i] for i in order if i in held), eos, seq_len)
    if len(train) == 0:
        raise UsageError(f"domain {spec.name}: too little training text for one block of {seq_len + 1} tokens")
    if len(val) == 0:
        raise UsageError(f"domain {spec.name}: too little validation text for one block of {seq_len + 1} tokens")
    return train, val


# ---------------------------------------------------------------------------------------------------------
# cache

def _file_signature(path: str) -> list:
    p = Path(path)
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    return [[str(q), (st := q.stat()).st_size, st.st_mtime_ns] for q in files]


def cache_key(spec: DomainSpec, fingerprint: str, eos_id: int, seq_len: int) -> str:
    blob = json.dumps({
        "format": CACHE_FORMAT, "name": spec.name, "select": spec.select, "seq_len": seq_len,
        "tokenizer": fingerprint, "eos": eos_id,
        "val_fraction": None if spec.val_files else spec.val_fraction,
        "files": [_file_signature(f) for f in spec.files],
        "val_files": [_file_signature(f) for f in spec.val_files],
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _atomic_write(path: Path, write) -> None:
    """Write via a unique temporary file in the same directory, then os.replace (readers never see half)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _safe_dirname(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[:64]


def prepare_domains(specs: list[DomainSpec], tokenizer, seq_len: int,
                    cache_dir: str | Path | None = None) -> dict[str, PackedDomain]:
    """Tokenised, packed, cached blocks for every domain (memory-mapped; cheap after the first call)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    fingerprint = tokenizer_fingerprint(tokenizer)
    eos = tokenizer.eos_token_id
    out: dict[str, PackedDomain] = {}
    for spec in specs:
        d = cache / f"{_safe_dirname(spec.name)}-{cache_key(spec, fingerprint, eos, seq_len)}"
        if not (d / "meta.json").is_file():
            train, val = split_and_pack(spec, tokenizer, seq_len)
            d.mkdir(parents=True, exist_ok=True)
            _atomic_write(d / "train.npy", lambda fh: np.save(fh, train))
            _atomic_write(d / "val.npy", lambda fh: np.save(fh, val))
            meta = {"name": spec.name, "seq_len": seq_len, "tokenizer_fingerprint": fingerprint,
                    "train_blocks": len(train), "val_blocks": len(val), "files": spec.files,
                    "val_files": spec.val_files}
            _atomic_write(d / "meta.json", lambda fh: fh.write(json.dumps(meta, indent=1).encode()))
            log.info("domain %s: %d train + %d val blocks of %d tokens -> %s",
                     spec.name, len(train), len(val), seq_len + 1, d)
        out[spec.name] = PackedDomain(name=spec.name, train=np.load(d / "train.npy", mmap_mode="r"),
                                      val=np.load(d / "val.npy", mmap_mode="r"))
    return out


def natural_proportions(domains: dict[str, PackedDomain]) -> dict[str, float]:
    """Each domain's share of the training tokens (the KD baseline's fixed mixture)."""
    sizes = {name: float(d.train.size) for name, d in domains.items()}
    total = sum(sizes.values())
    return {name: s / total for name, s in sizes.items()}
