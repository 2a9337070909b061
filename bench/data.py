"""Data preparation at scale: the streamed, parallel cache (``ddk.data.cache``) against the in-memory way.

Prints one table, the rows side by side in one run. The domains are code text built from the Python standard
library on this machine (every ``.py`` under ``sysconfig``'s stdlib, site-packages left out), written as one
``.jsonl`` domain of about 100 MB and one of about 400 MB; each repetition of the sources gets a different
first line, so no two documents are the same and every one gets its own hash. The kit's tokenizer
(``.cache/kit-quick/tokenizer``, vocabulary 2048), ``seq_len`` 256, ``val_fraction`` 0.05, no val_files.

Rows (each one a fresh Python process, so its peak memory is its own):
  in-memory          today's algorithm before issue 16 (:func:`reference_split_and_pack`, kept here and in the
                     tests as the reference): every document read into memory, tokenised into Python lists,
                     held out, packed, saved as int32
  streamed, N proc   ``ddk.data.cache.prepare_domains(..., workers=N)`` into an empty cache folder (1: in
                     this process, where the tokenizer's own threads may use both cores, as they do for the
                     in-memory row; 2: two tokenising child processes), with the tokenizer as ``ddk data
                     prepare`` loads it (``load_tokenizer``: tokenizer.json with the tokenizers library only, no
                     transformers or torch imported)
  baseline           a process that only loads the tokenizer: with transformers (which imports torch), the floor
                     of the in-memory row, and with the tokenizers library only, the floor of the streamed rows;
                     "above baseline" is a row's peak minus its floor
Peak RSS is that of the process tree, sampled every 50 ms with psutil, and PSS the same with shared pages split
between the processes that share them (the main process's own ``ru_maxrss`` is
printed too); tokens are the tokens tokenised (EOS included); tokens/s = tokens / wall seconds. The in-memory row
of the 400 MB domain needs about 58 bytes per token; it runs only when the machine has that much memory
available (with a margin), else its row says so.

Targets (issue 16): streamed peak RSS <= 1 GB and flat from 100 MB to 400 MB (<= 0.25 x the in-memory peak at
100 MB); tokens/s >= 1.6 x the in-memory way's on a 2-core machine. The load average is printed before and
after: other programs on the machine slow every row alike only if they stay the same, so read the ratios with it.

Run:  .venv/bin/python bench/data.py [--sizes 100,400] [--workers 1,2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Iterable

import numpy as np

REPO = Path(__file__).resolve().parent.parent
KIT_TOKENIZER = REPO / ".cache" / "kit-quick" / "tokenizer"
SEQ_LEN = 256
VAL_FRACTION = 0.05
BYTES_PER_TOKEN_IN_MEMORY = 58  # measured (issue 16): 2.30 GiB for 39.7M tokens


# ---------------------------------------------------------------------------------------------------------
# the reference: the in-memory algorithm of ddk.trainer.data (now ddk.data) before issue 16 (format 1), unchanged

def reference_pack(token_lists: Iterable[list[int]], eos_id: int, seq_len: int) -> np.ndarray:
    """Concatenate documents (EOS after each) and cut into ``[n, seq_len + 1]`` int32 blocks."""
    chunks = [np.asarray(t + [eos_id], dtype=np.int32) for t in token_lists]
    stream = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
    n = len(stream) // (seq_len + 1)
    return stream[: n * (seq_len + 1)].reshape(n, seq_len + 1)


def reference_tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens, in chunks of 512 texts."""
    out: list[list[int]] = []
    for i in range(0, len(texts), 512):
        out.extend(tokenizer(texts[i:i + 512], add_special_tokens=False)["input_ids"])
    return out


def reference_split_and_pack(spec, tokenizer, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Read, hold out validation, tokenise and pack one domain -> (train, val) int32 blocks, all in memory."""
    from ddk.errors import UsageError
    from ddk.data.domains import doc_hash_fraction, read_documents

    eos = tokenizer.eos_token_id
    docs = list(read_documents(spec, spec.files))
    if not docs:
        raise UsageError(f"domain {spec.name}: no documents in {spec.files}")
    if spec.val_files:
        val_docs = list(read_documents(spec, spec.val_files))
        if not val_docs:
            raise UsageError(f"domain {spec.name}: no documents in val_files {spec.val_files}")
        train = reference_pack(reference_tokenize(tokenizer, docs), eos, seq_len)
        val = reference_pack(reference_tokenize(tokenizer, val_docs), eos, seq_len)
    else:
        toks = reference_tokenize(tokenizer, docs)
        # Hold out by hash: first every document under val_fraction, then (in hash order) more until
        # validation fills at least one block. Train keeps file order.
        order = sorted(range(len(docs)), key=lambda i: doc_hash_fraction(docs[i]))
        held, n_tokens = set(), 0
        for i in order:
            if doc_hash_fraction(docs[i]) >= spec.val_fraction and n_tokens >= seq_len + 1:
                break
            held.add(i)
            n_tokens += len(toks[i]) + 1
        train = reference_pack((toks[i] for i in range(len(docs)) if i not in held), eos, seq_len)
        val = reference_pack((toks[i] for i in order if i in held), eos, seq_len)
    if len(train) == 0:
        raise UsageError(f"domain {spec.name}: too little training text for one block of {seq_len + 1} tokens")
    if len(val) == 0:
        raise UsageError(f"domain {spec.name}: too little validation text for one block of {seq_len + 1} tokens")
    return train, val


# ---------------------------------------------------------------------------------------------------------
# the corpus

def stdlib_sources() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py")):
        if "site-packages" in p.parts or "dist-packages" in p.parts:
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            out.append(text)
    return out


def write_domain(path: Path, megabytes: int) -> int:
    """``path``: a .jsonl of stdlib sources repeated (each copy with its own first line) up to ``megabytes``."""
    sources = stdlib_sources()
    target, written, copy = megabytes * 1_000_000, 0, 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < target:
            for i, text in enumerate(sources):
                line = json.dumps({"text": f"# copy {copy} of source {i}\n{text}"}) + "\n"
                fh.write(line)
                written += len(line.encode("utf-8"))
                if written >= target:
                    break
            copy += 1
    return written


# ---------------------------------------------------------------------------------------------------------
# one row, in its own process

def run_row(mode: str, data: Path, workers: int, cache: Path) -> dict:
    from ddk.data.domains import DomainSpec

    if mode in ("new", "base-fast"):  # as `ddk data prepare` loads it: the tokenizers library only
        from ddk.data.tokenizer import TokenizerFile, load_tokenizer

        tok = load_tokenizer(KIT_TOKENIZER)
        assert isinstance(tok, TokenizerFile)
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(KIT_TOKENIZER))
    spec = DomainSpec("code", [str(data)], val_fraction=VAL_FRACTION)
    t0 = time.perf_counter()
    if mode in ("base", "base-fast"):  # the floor of the rows: Python, the tokenizer (base: transformers, torch)
        time.sleep(1.0)
        n_train = n_val = 0
        tokens, digest = None, None
    elif mode == "ref":
        train, val = reference_split_and_pack(spec, tok, SEQ_LEN)
        cache.mkdir(parents=True, exist_ok=True)
        np.save(cache / "train.npy", train)
        np.save(cache / "val.npy", val)
        n_train, n_val = len(train), len(val)
        digest = hashlib.sha1(np.ascontiguousarray(train).astype(np.uint16).tobytes()).hexdigest()
        tokens = None
    else:
        from ddk.data.cache import prepare_domains

        d = prepare_domains([spec], tok, SEQ_LEN, cache, workers=workers, progress=False)["code"]
        n_train, n_val, tokens = len(d.train), len(d.val), d.build["tokens"]
        digest = None
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "train_blocks": n_train, "val_blocks": n_val, "tokens": tokens, "digest": digest,
            "maxrss_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "maxrss_children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
            "torch_imported": "torch" in sys.modules, "transformers_imported": "transformers" in sys.modules}


def tree_pss(pid: int) -> int:
    """PSS in bytes of a process and its descendants (shared pages split between the processes sharing them)."""
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied, AttributeError):
            pass
    return total


def measure(mode: str, data: Path, workers: int, cache: Path) -> dict:
    """Run one row in a child process, sampling its process tree's RSS and PSS."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import tree_rss

    shutil.rmtree(cache, ignore_errors=True)
    out = cache.with_suffix(".json")
    proc = subprocess.Popen([sys.executable, __file__, "--_row", mode, str(data), str(workers), str(cache),
                             str(out)])
    peak = peak_pss = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        peak_pss = max(peak_pss, tree_pss(proc.pid))
        time.sleep(0.05)
    if proc.returncode != 0:
        raise SystemExit(f"row {mode} {data.name} failed with exit code {proc.returncode}")
    row = json.loads(out.read_text())
    row["peak_tree"], row["peak_pss"] = peak, peak_pss
    shutil.rmtree(cache, ignore_errors=True)
    return row


def mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100,400", help="domain sizes in MB (default 100,400)")
    p.add_argument("--workers", default="1,2", help="worker counts of the streamed rows (default 1,2)")
    p.add_argument("--keep", default=None, help="folder for the corpora (kept and reused; default: a temp folder)")
    p.add_argument("--_row", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._row:
        mode, data, workers, cache, out = args._row
        Path(out).write_text(json.dumps(run_row(mode, Path(data), int(workers), Path(cache))))
        return 0

    sizes = [int(s) for s in args.sizes.split(",")]
    worker_counts = [int(w) for w in args.workers.split(",")]
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ddk-bench-data-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"load average at the start: {os.getloadavg()}; cores: {os.cpu_count()}; "
          f"memory available: {mem_available() / 2**30:.1f} GiB", flush=True)
    rows = []
    try:
        base = measure("base", Path(__file__), 1, root / "cache-base")
        print(f"  baseline (transformers tokenizer loaded): peak {base['peak_tree'] / 2**30:.2f} GiB", flush=True)
        fast = measure("base-fast", Path(__file__), 1, root / "cache-base-fast")
        print(f"  baseline (tokenizers-only tokenizer): peak {fast['peak_tree'] / 2**30:.2f} GiB", flush=True)
        for mb in sizes:
            data = root / f"code-{mb}mb.jsonl"
            if not data.is_file():
                write_domain(data, mb)
            size = data.stat().st_size
            new_rows = {}
            for w in worker_counts:
                r = measure("new", data, w, root / f"cache-{mb}-{w}")
                new_rows[w] = r
                rows.append((mb, f"streamed, {w} process" + ("es" if w > 1 else " (+ tokenizer threads)"), r))
                print(f"  {mb} MB streamed {w}: {r['seconds']:.1f} s, peak {r['peak_tree'] / 2**30:.2f} GiB, "
                      f"load {os.getloadavg()[0]:.2f}, torch imported: {r['torch_imported']}", flush=True)
            tokens = next(iter(new_rows.values()))["tokens"]
            need = 1.5 * BYTES_PER_TOKEN_IN_MEMORY * tokens
            if mem_available() > need:
                r = measure("ref", data, 1, root / f"cache-{mb}-ref")
                r["tokens"] = tokens
                rows.append((mb, "in-memory (before)", r))
                print(f"  {mb} MB in-memory: {r['seconds']:.1f} s, peak {r['peak_tree'] / 2**30:.2f} GiB, "
                      f"load {os.getloadavg()[0]:.2f}", flush=True)
                blocks = {w: (x["train_blocks"], x["val_blocks"]) for w, x in new_rows.items()}
                same = all(b == (r["train_blocks"], r["val_blocks"]) for b in blocks.values())
                print(f"  same block counts as the reference: {same}", flush=True)
            else:
                rows.append((mb, f"in-memory (before): skipped, needs ~{need / 2**30:.1f} GiB, "
                                 f"{mem_available() / 2**30:.1f} available", None))
            print(f"  {mb} MB = {size / 1e6:.0f} MB on disk, {tokens:,} tokens", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    print(f"\nload average at the end: {os.getloadavg()}\n")
    print("| domain | path | tokens | seconds | tokens/s | peak RSS (tree) | above baseline | peak PSS (tree) "
          "| main ru_maxrss |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    gib = 2**30
    print(f"| - | baseline of in-memory: Python + transformers (torch) + the tokenizer, nothing read | | | | "
          f"{base['peak_tree'] / gib:.2f} GiB | 0 | {base['peak_pss'] / gib:.2f} GiB | "
          f"{base['maxrss_self'] / gib:.2f} GiB |")
    print(f"| - | baseline of streamed: Python + the tokenizers-only tokenizer, nothing read | | | | "
          f"{fast['peak_tree'] / gib:.2f} GiB | 0 | {fast['peak_pss'] / gib:.2f} GiB | "
          f"{fast['maxrss_self'] / gib:.2f} GiB |")
    ref = {mb: r for mb, name, r in rows if r is not None and name.startswith("in-memory")}
    for mb, name, r in rows:
        if r is None:
            print(f"| {mb} MB | {name} | | | | | | | |")
            continue
        tps = r["tokens"] / r["seconds"]
        floor = fast if name.startswith("streamed") else base
        print(f"| {mb} MB | {name} | {r['tokens']:,} | {r['seconds']:.1f} | {tps:,.0f} | "
              f"{r['peak_tree'] / gib:.2f} GiB | {(r['peak_tree'] - floor['peak_tree']) / gib:.2f} GiB | "
              f"{r['peak_pss'] / gib:.2f} GiB | {r['maxrss_self'] / gib:.2f} GiB |")
    print()
    for mb, name, r in rows:
        if r is None or not name.startswith("streamed"):
            continue
        line = f"{mb} MB {name}: peak {r['peak_tree'] / 2**30:.2f} GiB (target <= 0.93 GiB = 1 GB)"
        if mb in ref:
            above = (r["peak_tree"] - fast["peak_tree"]) / max(1, ref[mb]["peak_tree"] - base["peak_tree"])
            line += (f", {r['peak_tree'] / ref[mb]['peak_tree']:.2f} x the in-memory peak (target <= 0.25; "
                     f"above the baseline {above:.2f} x), tokens/s {ref[mb]['seconds'] / r['seconds']:.2f} x "
                     f"(target >= 1.6)")
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
