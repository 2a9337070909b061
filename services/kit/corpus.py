"""The demo kit's multi-domain corpus, built at run time from text this machine already has.

Four domains that differ in difficulty for a small model:

- ``code``:  the top-level ``.py`` modules of the running Python's standard library;
- ``prose``: the long descriptions in ``*.dist-info/METADATA`` of the installed packages;
- ``legal``: the license / copying / notice files shipped under ``*.dist-info/``;
- ``math``:  generated arithmetic with exact answers (a domain where a small student lags).

Nothing here is copied into the repository. Long files are chunked into documents of a few
thousand characters at blank lines. Documents are deduplicated by content (whitespace normalised)
*before* the train/validation split, because the same license text ships in dozens of packages and
the same badges and install instructions open many READMEs: a validation document must not be a
copy of a training one, or the validation score would measure memorisation, not generalisation.
For prose and legal the dedup also works paragraph by paragraph, so an MIT license with a different
copyright line does not slip through as "new". Selection under a size cap and the split are both
decided by a hash of (seed, content), so the corpus is a pure function of the machine's files and
the seed.

Reading the files is the only I/O (``*_documents``); the chunking, dedup and split are pure.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

log = logging.getLogger(__name__)

DOMAINS = ("code", "prose", "legal", "math")

_LICENSE_NAME = re.compile(r"licen[cs]e|copying|notice|copyright", re.IGNORECASE)
_NOT_LEGAL = re.compile(r"authors|contributors|\.(py|pyc|json)$", re.IGNORECASE)  # people lists, code
_BLANK_LINES = re.compile(r"\n[ \t]*\n")


# ----------------------------------------------------------------------------- pure helpers

def normalise(text: str) -> str:
    """Whitespace-normalised form used as the dedup key (line wrapping and indentation ignored)."""
    return " ".join(text.split())


def content_hash(text: str, seed: int = 0, salt: str = "") -> int:
    """Stable 64-bit hash of (seed, salt, normalised text): Python's hash() is salted per process."""
    blob = f"{seed}\x00{salt}\x00{normalise(text)}".encode("utf-8")
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big")


def chunk(text: str, max_chars: int) -> list[str]:
    """Split at blank lines into chunks of at most ~max_chars (a longer paragraph is split at lines).

    Paragraphs are re-joined with one blank line, so runs of blank lines collapse; each chunk is
    stripped of trailing whitespace so two copies of the same text chunk identically.
    """
    pieces: list[str] = []
    for para in _BLANK_LINES.split(text):
        para = para.rstrip()
        if not para.strip():
            continue
        pieces.extend([para] if len(para) <= max_chars else _pack(para.split("\n"), "\n", max_chars))
    return _pack(pieces, "\n\n", max_chars)


def _pack(items: list[str], sep: str, max_chars: int) -> list[str]:
    """Join consecutive items with ``sep`` into groups of at most ~max_chars (an item alone may be longer)."""
    groups, current, size = [], [], 0
    for item in items:
        if current and size + len(item) + len(sep) > max_chars:
            groups.append(sep.join(current))
            current, size = [], 0
        current.append(item)
        size += len(item) + len(sep)
    if current:
        groups.append(sep.join(current))
    return groups


def drop_seen_paragraphs(text: str, seen: set[str]) -> str:
    """Remove the paragraphs of ``text`` already in ``seen`` (normalised, lowercase); record the rest.

    Boilerplate (license clauses, badges, "pip install x") then appears once in the whole domain,
    so it can land in train or in validation but never in both.
    """
    kept = []
    for para in _BLANK_LINES.split(text):
        key = normalise(para).lower()
        if not key or key in seen:
            continue
        seen.add(key)
        kept.append(para.rstrip())
    return "\n\n".join(kept)


def dedup(docs: Iterable[str], min_chars: int = 64) -> list[str]:
    """Keep the first occurrence of each document by whitespace-normalised content; drop tiny ones."""
    seen: set[bytes] = set()
    out = []
    for doc in docs:
        key = normalise(doc)
        if len(key) < min_chars:
            continue
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        if digest in seen:
            continue
        seen.add(digest)
        out.append(doc)
    return out


def select_and_split(docs: list[str], seed: int, max_chars: int, val_fraction: float
                     ) -> tuple[list[str], list[str]]:
    """Pick documents up to ``max_chars`` and split them into (train, val), both by content hash.

    Documents are visited in the order of hash(seed, content), so the cap takes a seed-dependent
    sample spread over all sources rather than the first files alphabetically. The selected ones
    are then ordered by a second hash and the first ``val_fraction`` of them (at least one) form
    the validation set. Deduplicated input means train and validation share no document.
    """
    order = sorted(docs, key=lambda d: content_hash(d, seed, "select"))
    selected, total = [], 0
    for doc in order:
        if total >= max_chars:
            break
        selected.append(doc)
        total += len(doc)
    selected.sort(key=lambda d: content_hash(d, seed, "split"))
    n_val = max(1, round(len(selected) * val_fraction)) if len(selected) > 1 else 0
    return selected[n_val:], selected[:n_val]


# ----------------------------------------------------------------------------- sources (read files)

def site_packages() -> Path:
    """The running interpreter's site-packages (purelib), where the ``*.dist-info`` folders live."""
    return Path(sysconfig.get_paths()["purelib"])


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def code_documents(root: Path | None = None, doc_chars: int = 2000) -> list[str]:
    """Top-level stdlib modules, chunked at blank lines (functions and classes mostly stay whole)."""
    root = root or stdlib_dir()
    docs = []
    for path in sorted(root.glob("*.py")):
        text = _read(path)
        if text:
            docs.extend(chunk(text, doc_chars))
    return dedup(docs)


def _metadata_description(text: str) -> str:
    """The long description of a METADATA file: the body after the RFC 822 headers, or the
    ``Description:`` header (old metadata versions, continuation lines indented with 8 spaces)."""
    head, sep, body = text.partition("\n\n")
    if sep and body.strip():
        return body
    m = re.search(r"^Description: (.*(?:\n {8}.*)*)", head, re.MULTILINE)
    if not m:
        return ""
    return "\n".join(line[8:] if line.startswith(" " * 8) else line for line in m.group(1).split("\n"))


def prose_documents(root: Path | None = None, doc_chars: int = 2000) -> list[str]:
    """Long descriptions of installed packages (READMEs in Markdown / reST), boilerplate removed."""
    root = root or site_packages()
    seen: set[str] = set()
    docs = []
    for path in sorted(root.glob("*.dist-info/METADATA")):
        text = _read(path)
        if not text:
            continue
        body = drop_seen_paragraphs(_metadata_description(text), seen)
        docs.extend(chunk(body, doc_chars))
    return dedup(docs)


def legal_documents(root: Path | None = None, doc_chars: int = 2000) -> list[str]:
    """License, copying and notice files under ``*.dist-info/``, each clause kept once."""
    root = root or site_packages()
    paths = sorted({p for d in root.glob("*.dist-info") for p in d.rglob("*")
                    if p.is_file() and not _NOT_LEGAL.search(p.name)
                    and (_LICENSE_NAME.search(p.name) or "licenses" in p.relative_to(d).parts)})
    seen: set[str] = set()
    docs = []
    for path in paths:
        text = _read(path)
        if text:
            docs.extend(chunk(drop_seen_paragraphs(text, seen), doc_chars))
    return dedup(docs)


def _problem(rng: random.Random) -> str:
    """One arithmetic line with its exact answer; several forms so the domain is not one template."""
    kind = rng.randrange(6)
    a, b = rng.randint(2, 999), rng.randint(2, 999)
    if kind == 0:
        return f"{a} + {b} = {a + b}"
    if kind == 1:
        a, b = max(a, b), min(a, b)
        return f"{a} - {b} = {a - b}"
    if kind == 2:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        return f"{a} * {b} = {a * b}"
    if kind == 3:
        b = rng.randint(2, 40)
        q = rng.randint(2, 99)
        r = rng.randint(0, b - 1)
        return f"{q * b + r} // {b} = {q} remainder {r}"
    if kind == 4:
        c = rng.randint(2, 20)
        return f"({a} + {b}) * {c} = {(a + b) * c}"
    c = rng.randint(2, 99)
    return f"What is {a} plus {b} minus {c}? Answer: {a + b - c}."


def math_documents(seed: int = 0, total_chars: int = 400_000, doc_chars: int = 2000) -> list[str]:
    """Generated arithmetic, ``total_chars`` of it, in documents of ~doc_chars (exact answers)."""
    rng = random.Random(f"ddk-math-{seed}")
    docs, size = [], 0
    while size < total_chars:
        lines, n = [], 0
        while n < doc_chars:
            line = _problem(rng)
            lines.append(line)
            n += len(line) + 1
        doc = "\n".join(lines)
        docs.append(doc)
        size += len(doc)
    return dedup(docs)


# ----------------------------------------------------------------------------- the corpus

@dataclass
class Corpus:
    """Per-domain train and validation documents (the same domain order everywhere)."""

    train: dict[str, list[str]] = field(default_factory=dict)
    val: dict[str, list[str]] = field(default_factory=dict)

    @property
    def domains(self) -> list[str]:
        return list(self.train)

    def sizes(self) -> dict[str, dict[str, int]]:
        return {d: {"train_docs": len(self.train[d]), "val_docs": len(self.val[d]),
                    "train_chars": sum(map(len, self.train[d])), "val_chars": sum(map(len, self.val[d]))}
                for d in self.domains}


def default_sources(seed: int, max_chars: int, doc_chars: int) -> dict[str, Callable[[], list[str]]]:
    return {
        "code": lambda: code_documents(doc_chars=doc_chars),
        "prose": lambda: prose_documents(doc_chars=doc_chars),
        "legal": lambda: legal_documents(doc_chars=doc_chars),
        # generate a little more than the cap so the hash-ordered selection still has a choice
        "math": lambda: math_documents(seed, total_chars=int(max_chars * 1.2) + doc_chars, doc_chars=doc_chars),
    }


def build_corpus(seed: int = 0, max_chars: int = 300_000, val_fraction: float = 0.1,
                 doc_chars: int = 2000, sources: dict[str, Callable[[], list[str]]] | None = None) -> Corpus:
    """Read every domain's documents, cap each at ``max_chars``, split into train/val by content hash."""
    sources = sources or default_sources(seed, max_chars, doc_chars)
    corpus = Corpus()
    for domain, read in sources.items():
        docs = read()
        train, val = select_and_split(docs, seed, max_chars, val_fraction)
        if not train or not val:
            raise RuntimeError(f"domain {domain!r}: too little text on this machine ({len(docs)} documents)")
        corpus.train[domain], corpus.val[domain] = train, val
        log.info("corpus %-6s %5d docs available, %4d train / %3d val documents, %d / %d chars",
                 domain, len(docs), len(train), len(val), sum(map(len, train)), sum(map(len, val)))
    return corpus


def write_jsonl(path: Path, docs: Iterable[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_corpus(corpus: Corpus, data_dir: Path) -> None:
    """``data_dir/<domain>/{train,val}.jsonl`` with one ``{"text": ...}`` record per document."""
    for domain in corpus.domains:
        write_jsonl(data_dir / domain / "train.jsonl", corpus.train[domain])
        write_jsonl(data_dir / domain / "val.jsonl", corpus.val[domain])


def read_jsonl(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


__all__ = ["DOMAINS", "Corpus", "build_corpus", "write_corpus", "read_jsonl", "chunk", "dedup",
           "normalise", "content_hash", "select_and_split"]
