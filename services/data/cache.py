"""Preparing the token cache: streamed, parallel, bounded in memory, resumable (``ddk data prepare``).

A domain is read document by document (:func:`ddk.trainer.data.read_documents`) and cut into *chunks* of whole
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
:class:`ddk.trainer.data.TokenBlocks` reads those ranges as one ``[n_blocks, seq_len + 1]`` array.

Memory is bounded by the chunks in flight (two per worker, at most ``MAX_INFLIGHT_CHARS`` characters), never by
the corpus: each chunk's tokens go to disk as soon as it is done, and finalising copies through memory maps.
The blocks are the same whatever the number of workers or shards: a shard boundary is not a block boundary.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import io
import itertools
import json
import logging
import os
import struct
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ddk.errors import UsageError
from ddk.trainer.data import (CACHE_FORMAT, DomainSpec, PackedDomain, TokenBlocks, cache_key, default_cache_dir,
                              doc_hash_fraction, file_kind, read_documents, safe_dirname, token_dtype)

log = logging.getLogger(__name__)

SHARD_CHARS = 4_000_000          # characters of text per chunk (one part; ~1.5M tokens of code) ...
MAX_SHARD_CHARS = 64_000_000     # ... growing up to this for a big domain, so it has at most ~2,048 shards
SHARD_DOCS = 100_000             # and at most this many documents
BATCH_CHARS = 256_000            # characters per encode_batch call inside a worker (bounds the tokenizer's memory)
MAX_INFLIGHT_CHARS = 256_000_000  # text handed to workers and not yet written back
META = "meta.json"
BUILD = "build.json"
HOLDOUT = "val-holdout.npy"
WORKERS_ENV = "DDK_DATA_WORKERS"


def default_workers() -> int:
    """``$DDK_DATA_WORKERS``, else the cores this process may run on."""
    env = os.environ.get(WORKERS_ENV)
    if env:
        try:
            n = int(env)
        except ValueError:
            raise UsageError(f"{WORKERS_ENV}: expected a positive integer, got {env!r}") from None
        if n < 1:
            raise UsageError(f"{WORKERS_ENV}: expected a positive integer, got {env!r}")
        return n
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------------------
# the tokenizer, without transformers (and torch) where the folder allows it

GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
TOKENIZER_ENV = "DDK_DATA_TOKENIZER"  # "auto" (default), "tokenizers" (tokenizer.json whatever the class), "transformers"


class TokenizerFile:
    """A tokenizer read from a folder's ``tokenizer.json`` with the ``tokenizers`` library only: what
    :func:`prepare_domains` uses of a transformers tokenizer (``eos_token_id``, ``get_vocab()``, ``len()``,
    ``is_fast``, ``backend_tokenizer``), and ``__call__`` / ``encode`` / ``decode`` as transformers has them
    (no special tokens added unless asked). The vocabulary is the file's, added tokens included, which is what
    transformers' ``get_vocab()`` returns for the same folder (:func:`load_tokenizer` checks when it is)."""

    is_fast = True

    def __init__(self, backend, eos_token: str, name_or_path: str = ""):
        self.backend_tokenizer = backend
        self.eos_token = eos_token
        self.eos_token_id = backend.token_to_id(eos_token)
        self.name_or_path = name_or_path

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, texts, add_special_tokens: bool = True) -> dict:
        one = isinstance(texts, str)
        enc = self.backend_tokenizer.encode_batch([texts] if one else list(texts),
                                                  add_special_tokens=add_special_tokens)
        ids = [e.ids for e in enc]
        return {"input_ids": ids[0] if one else ids}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"TokenizerFile({self.name_or_path!r}, vocab {len(self)}, eos {self.eos_token!r})"


def _token_text(value: Any) -> str | None:
    """A special token's text as tokenizer_config.json / special_tokens_map.json write it (str or AddedToken dict)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def tokenizer_file(path: str | Path) -> tuple[TokenizerFile | None, str]:
    """(the folder's tokenizer read with ``tokenizers`` only, "") when that gives what transformers would --
    the same ``get_vocab()`` (hence the same fingerprint and cache key), EOS and token ids -- else (None, why).

    The rules of transformers 5's ``AutoTokenizer.from_pretrained`` that matter here: the special tokens are
    tokenizer_config.json's, overridden by special_tokens_map.json when the config has no
    ``added_tokens_decoder``; a special token missing from the vocabulary is *added* (another vocabulary: not
    done here); a named tokenizer class (``Qwen2Tokenizer``, ``LlamaTokenizer``, ...) rebuilds its backend from
    the vocabulary and merges with its own normalizer and pre-tokenizer, and a vocabulary over 100,000 may get
    the Mistral regex patch, so only the generic classes (:data:`GENERIC_TOKENIZER_CLASSES`) are read
    directly (``$DDK_DATA_TOKENIZER=tokenizers`` reads tokenizer.json whatever the class)."""
    p = Path(path).expanduser()
    tj = p / "tokenizer.json"
    if not tj.is_file():
        return None, "no tokenizer.json"
    try:
        cfg = json.loads((p / "tokenizer_config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        cfg = {}
    except (OSError, ValueError) as e:
        return None, f"tokenizer_config.json: {e}"
    if not isinstance(cfg, dict):
        return None, "tokenizer_config.json is not an object"
    forced = os.environ.get(TOKENIZER_ENV, "auto").strip().lower() == "tokenizers"
    cls = cfg.get("tokenizer_class")
    if not forced and cls not in GENERIC_TOKENIZER_CLASSES:
        return None, f"tokenizer_class {cls!r} (transformers may rebuild it)"
    if cfg.get("split_special_tokens") or cfg.get("add_prefix_space") is not None:
        return None, "split_special_tokens / add_prefix_space set in tokenizer_config.json"
    special = dict(cfg)
    if "added_tokens_decoder" not in cfg and (p / "special_tokens_map.json").is_file():
        try:
            special.update(json.loads((p / "special_tokens_map.json").read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            return None, f"special_tokens_map.json: {e}"
    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_file(str(tj))
    except Exception as e:  # noqa: BLE001 - a file tokenizers cannot read: transformers may
        return None, f"tokenizer.json: {e}"
    vocab = backend.get_vocab(with_added_tokens=True)
    if not forced and len(vocab) > 100_000:
        return None, "a vocabulary over 100,000 (transformers may patch its regex)"
    names = [_token_text(special.get(k)) for k in SPECIAL_TOKEN_KEYS]
    names += [_token_text(special[k]) for k in special if k.endswith("_token") and k not in SPECIAL_TOKEN_KEYS]
    for k in ("additional_special_tokens", "extra_special_tokens"):
        extra = special.get(k) or []
        names += [_token_text(t) for t in (extra.values() if isinstance(extra, dict) else extra)]
    for idx, tok in (cfg.get("added_tokens_decoder") or {}).items():
        text = _token_text(tok)
        if text is None or vocab.get(text) != int(idx):
            return None, f"added_tokens_decoder {idx}: {text!r} is not that id in tokenizer.json"
    missing = [t for t in names if t is not None and t not in vocab]
    if missing:
        return None, f"special token {missing[0]!r} not in tokenizer.json (transformers would add it)"
    eos = _token_text(special.get("eos_token"))
    if eos is None:
        return None, "no eos_token in tokenizer_config.json"
    return TokenizerFile(backend, eos, str(p)), ""


def load_tokenizer(path: str | Path):
    """The tokenizer of a model folder for preparing data: :func:`tokenizer_file` when it can (no transformers,
    no torch imported), else transformers' ``AutoTokenizer`` (with a log line saying why)."""
    how = os.environ.get(TOKENIZER_ENV, "auto").strip().lower()
    if how not in ("auto", "tokenizers", "transformers"):
        raise UsageError(f"{TOKENIZER_ENV}: expected auto, tokenizers or transformers, got {how!r}")
    why = f"{TOKENIZER_ENV}=transformers"
    if how != "transformers":
        tok, why = tokenizer_file(path)
        if tok is not None:
            log.debug("tokenizer %s: read with the tokenizers library (tokenizer.json)", path)
            return tok
    log.info("tokenizer %s: loading with transformers (%s)", path, why)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise UsageError(f"tokenizer: cannot load one from {path} ({e})") from None


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
# tokenising a chunk (in this process, a worker process or a Ray Data worker)

def tokenizer_payload(tokenizer) -> tuple[str, Any, str]:
    """What a worker needs to rebuild ``tokenizer``: (kind, blob, key). A fast tokenizer travels as its
    ``tokenizer.json`` text (workers then need only the ``tokenizers`` package). Any other cannot leave this
    process (no pickle crosses a process boundary): kind ``"local"``, tokenised here (:meth:`Executors.get`)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if getattr(tokenizer, "is_fast", False) and backend is not None:
        blob: Any = backend.to_str()
        return "fast", blob, hashlib.sha1(blob.encode("utf-8")).hexdigest()
    return "local", tokenizer, f"local-{id(tokenizer)}"


def make_encoder(payload: tuple[str, Any, str]) -> Callable[[list[str]], list[list[int]]]:
    """texts -> token ids of each, without special tokens (what ``tokenizer(texts, add_special_tokens=False)``
    gives), with truncation and padding off."""
    kind, blob, _ = payload
    if kind == "fast":
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(blob)
        tok.no_truncation()
        tok.no_padding()
        encode = getattr(tok, "encode_batch_fast", None) or tok.encode_batch  # _fast: no offsets computed

        def run(texts: list[str]) -> list[list[int]]:
            return [e.ids for e in encode(texts, add_special_tokens=False)]

        return run
    hf = blob  # "local": the tokenizer object itself, in this process

    def run_hf(texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in hf(texts, add_special_tokens=False)["input_ids"]]

    return run_hf


_ENCODERS: dict[str, Callable] = {}


def _encoder(payload) -> Callable:
    if payload[2] not in _ENCODERS:
        _ENCODERS[payload[2]] = make_encoder(payload)
    return _ENCODERS[payload[2]]


class _Stream:
    """Token ids appended document by document, kept as a few numpy arrays (not Python lists)."""

    def __init__(self, dtype: np.dtype):
        self.dtype, self.n, self._lists, self._pending, self._arrays = dtype, 0, [], 0, []

    def add(self, ids: list[int]) -> None:
        self._lists.append(ids)
        self._pending += len(ids)
        self.n += len(ids)

    def flush(self) -> None:
        if self._lists:
            try:
                self._arrays.append(np.fromiter(itertools.chain.from_iterable(self._lists), dtype=self.dtype,
                                                count=self._pending))
            except OverflowError as e:
                raise UsageError(f"tokenizer: a token id does not fit the cache's {self.dtype.name} ({e})") from None
            self._lists, self._pending = [], 0

    def array(self) -> np.ndarray:
        self.flush()
        return np.concatenate(self._arrays) if self._arrays else np.zeros(0, self.dtype)


def _batches(texts: list[str], max_chars: int) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for t in texts:
        batch.append(t)
        chars += len(t)
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def tokenize_chunk(encode: Callable, texts: list[str], eos: int, dtype: str, holdout: float | None,
                   block_len: int) -> dict:
    """One chunk's token streams. Pure function of its inputs.

    Every document is its ids followed by ``eos``. With ``holdout`` (val_fraction), a document whose hash is
    below it goes to ``held`` (with ``[hash, index in chunk, tokens]`` in ``held_docs``), any other to ``train``;
    ``candidates`` are the training documents that the "at least one validation block" rule could take from this
    chunk: the lowest hashes, as many as hold ``block_len`` tokens (``[hash, index, offset in train, tokens]``).
    Without ``holdout`` everything goes to ``train`` (the caller names it).
    """
    dt = np.dtype(dtype)
    keep, held = _Stream(dt), _Stream(dt)
    held_docs: list[list] = []
    cand: list[tuple] = []
    i = 0
    for batch in _batches(texts, BATCH_CHARS):
        for text, ids in zip(batch, encode(batch)):
            ids.append(eos)
            if holdout is not None:
                f = doc_hash_fraction(text)
                if f < holdout:
                    held_docs.append([f, i, len(ids)])
                    held.add(ids)
                else:
                    cand.append((f, i, keep.n, len(ids)))
                    keep.add(ids)
            else:
                keep.add(ids)
            i += 1
        keep.flush()
        held.flush()
    cand.sort()  # by hash, then index in the chunk (file order)
    candidates, total = [], 0
    for f, j, off, n in cand:
        if total >= block_len:
            break
        candidates.append([f, j, off, n])
        total += n
    return {"train": keep.array(), "held": held.array(), "held_docs": held_docs, "candidates": candidates,
            "docs": i, "tokens": keep.n + held.n}


# ---------------------------------------------------------------------------------------------------------
# executors: where chunks are tokenised. submit() returns a concurrent.futures.Future of tokenize_chunk's dict.

class InlineExecutor:
    """In this process (one worker). The tokenizer's own threads may still use more than one core."""

    slots = 1

    def __init__(self, payload):
        self.encode = _encoder(payload)

    def submit(self, args: tuple) -> cf.Future:
        fut: cf.Future = cf.Future()
        fut.set_result(tokenize_chunk(self.encode, *args))
        return fut

    def close(self, abort: bool = False) -> None:
        pass


# Messages between this process and a tokenising child: no pickle. A message is a JSON header (8-byte length,
# then UTF-8 JSON) and the numpy arrays it names, each as an 8-byte length and ``np.save`` bytes written
# with ``allow_pickle=False``. Tasks and results of :func:`tokenize_chunk` are JSON values plus arrays.

def write_message(stream, value: dict) -> None:
    arrays = {k: v for k, v in value.items() if isinstance(v, np.ndarray)}
    header = json.dumps({"value": {k: v for k, v in value.items() if k not in arrays},
                         "arrays": list(arrays)}).encode("utf-8")
    stream.write(struct.pack(">Q", len(header)) + header)
    for name in arrays:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
        stream.write(struct.pack(">Q", buf.tell()) + buf.getvalue())
    stream.flush()


def _read_exact(stream, n: int) -> bytes:
    data = stream.read(n)
    if data is None or len(data) < n:
        raise EOFError("the stream ended inside a message")
    return data


def read_message(stream) -> dict:
    """The next message; EOFError at the end of the stream."""
    head = stream.read(8)
    if not head:
        raise EOFError("end of stream")
    if len(head) < 8:
        head += _read_exact(stream, 8 - len(head))
    (size,) = struct.unpack(">Q", head)
    header = json.loads(_read_exact(stream, size).decode("utf-8"))
    value = dict(header["value"])
    for name in header["arrays"]:
        (n,) = struct.unpack(">Q", _read_exact(stream, 8))
        value[name] = np.load(io.BytesIO(_read_exact(stream, n)), allow_pickle=False)
    return value


class _QueuedExecutor:
    """What the process and Ray Data executors share: ``submit`` puts ``(future, args)`` on ``self._queue`` for
    their feeding thread(s), and ``_cancel_queued`` drops (cancels) what nothing has taken yet."""

    def submit(self, args: tuple) -> cf.Future:
        fut: cf.Future = cf.Future()
        self._queue.put((fut, args))
        return fut

    def _cancel_queued(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except Exception:  # queue.Empty
                break
            if item is not None:
                item[0].cancel()


class ProcessExecutor(_QueuedExecutor):
    """``workers`` child processes, two chunks in flight each. A child is ``python -c 'worker_main()'``: it imports
    numpy and ``tokenizers`` only (not torch, not the parent's main module, so any script may call this without a
    ``__main__`` guard), reads tasks from its stdin and writes results to its stdout (:func:`write_message`:
    JSON and ``.npy`` bytes, no pickle), and exits
    when its stdin closes -- also when this process is killed. One thread here feeds each child."""

    def __init__(self, payload, workers: int, shard_chars: int):
        import queue
        import subprocess
        import threading

        self.slots = max(1, min(2 * workers, MAX_INFLIGHT_CHARS // max(1, shard_chars)))
        self._queue: queue.Queue = queue.Queue()
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false",  # one core per child
               "PYTHONPATH": os.pathsep.join([p for p in sys.path if p] +
                                             ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
        self._procs = [subprocess.Popen([sys.executable, "-c", "from ddk.trainer.prepare import worker_main; "
                                         "worker_main()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
                       for _ in range(workers)]
        self._threads = []
        kind, blob, key = payload
        if kind != "fast":
            raise ValueError("ProcessExecutor: only a fast tokenizer can be sent to a worker process")
        for proc in self._procs:
            write_message(proc.stdin, {"kind": kind, "blob": blob, "key": key})
            t = threading.Thread(target=self._feed, args=(proc,), daemon=True, name="ddk-tokenise")
            t.start()
            self._threads.append(t)

    def _feed(self, proc) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fut, args = item
            if not fut.set_running_or_notify_cancel():
                continue
            texts, eos, dtype, hold, block_len = args
            try:
                write_message(proc.stdin, {"texts": texts, "eos": eos, "dtype": dtype, "holdout": hold,
                                           "block_len": block_len})
                value = read_message(proc.stdout)
            except (OSError, EOFError, ValueError) as e:
                fut.set_exception(RuntimeError(f"a tokenising process stopped (exit code {proc.poll()}): {e}"))
                return
            if "error" in value:
                fut.set_exception(RuntimeError(f"a tokenising process failed: {value['error']}"))
            else:
                fut.set_result(value)


    def close(self, abort: bool = False) -> None:
        """Let the children finish their chunk and exit (``abort``: kill them now)."""
        self._cancel_queued()  # what no child has taken yet
        for _ in self._threads:
            self._queue.put(None)
        for proc in self._procs:
            if abort:
                proc.kill()
            with contextlib.suppress(OSError):
                proc.stdin.close()
        for proc in self._procs:
            try:
                proc.wait(timeout=60)
            except Exception:  # subprocess.TimeoutExpired: a child stuck in a big chunk
                proc.kill()
                proc.wait()
        for t in self._threads:
            t.join(timeout=5)


def worker_main() -> None:
    """A tokenising child of :class:`ProcessExecutor`: payload first, then tasks until stdin closes."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes or kills us
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # stdout carries results only
    try:
        first = read_message(stdin)
    except EOFError:
        return
    encode = make_encoder((first["kind"], first["blob"], first["key"]))
    while True:
        try:
            task = read_message(stdin)
        except EOFError:
            return
        try:
            out = tokenize_chunk(encode, task["texts"], task["eos"], task["dtype"], task["holdout"],
                                 task["block_len"])
        except Exception as e:  # noqa: BLE001 - sent back to the parent, raised there
            out = {"error": f"{type(e).__name__}: {e}"}
        try:
            write_message(stdout, out)
        except (BrokenPipeError, OSError):  # the parent is gone
            return


def _ray_data_tokenise(batch: dict, payload) -> dict:
    """Ray Data ``map_batches`` function: each row's ``task`` (a :func:`write_message` of one chunk's texts and
    settings) tokenised with the ``tokenizers`` library (the encoder built once per Ray worker process) into its
    ``result`` (a :func:`write_message` of :func:`tokenize_chunk`'s dict). No pickle inside the rows."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    encode = _encoder(payload)
    results = []
    for task in batch["task"]:
        t = read_message(io.BytesIO(bytes(task)))
        out = tokenize_chunk(encode, t["texts"], t["eos"], t["dtype"], t["holdout"], t["block_len"])
        buf = io.BytesIO()
        write_message(buf, out)
        results.append(buf.getvalue())
    return {"i": np.asarray(batch["i"]), "result": np.array(results, dtype=object)}


WINDOW_WAIT_S = 1.0  # how long a Ray Data window waits for the driver's next chunk before it starts


class RayDataExecutor(_QueuedExecutor):
    """Ray Data across the cluster at ``address`` (a local Ray when empty). The driver reads and cuts the
    documents in corpus order (as every executor: the parts keep their numbers, resuming works the same), and
    each window of chunks becomes a Ray Dataset (``from_items``, one block per chunk) tokenised by
    ``map_batches`` in Ray workers (one CPU each, the fast tokenizer rebuilt from its ``tokenizer.json``
    text); the token arrays come back through the object store and this process writes the shards. Each
    result carries its chunk's place in the window, so the order Ray returns them in does not matter. One
    window runs while the next one fills (``slots`` = two windows)."""

    def __init__(self, payload, address: str | None, shard_chars: int):
        import queue
        import threading

        try:
            import ray
            import ray.data
        except ImportError:
            raise UsageError("--ray: Ray Data is not installed (pip install 'ray[data]')") from None
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            ray.init(address=address or None, include_dashboard=False, logging_level=logging.WARNING,
                     runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the driver's own bar counts tokens
        ctx.execution_options.preserve_order = True  # not needed (results carry their place); keeps logs in order
        self.payload = payload
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.window = max(1, min(2 * cpus, MAX_INFLIGHT_CHARS // (2 * max(1, shard_chars))))
        self.slots = 2 * self.window
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True, name="ddk-ray-data")
        self._thread.start()

    def _run(self) -> None:
        import queue

        done = False
        while not done:
            item = self._queue.get()
            if item is None:
                return
            items = [item]
            while len(items) < self.window:  # up to one window (waiting a little for the driver to read more)
                try:
                    nxt = self._queue.get(timeout=WINDOW_WAIT_S)
                except queue.Empty:
                    break
                if nxt is None:
                    done = True
                    break
                items.append(nxt)
            items = [(f, a) for f, a in items if f.set_running_or_notify_cancel()]
            if not items:
                continue
            try:
                rows = []
                for i, (_, (texts, eos, dtype, hold, block_len)) in enumerate(items):
                    buf = io.BytesIO()
                    write_message(buf, {"texts": texts, "eos": eos, "dtype": dtype, "holdout": hold,
                                        "block_len": block_len})
                    rows.append({"i": i, "task": buf.getvalue()})
                ds = self.ray.data.from_items(rows, override_num_blocks=len(rows))
                del rows
                ds = ds.map_batches(_ray_data_tokenise, batch_size=1, batch_format="numpy",
                                    fn_kwargs={"payload": self.payload}, num_cpus=1)
                for row in ds.iter_rows():
                    fut = items[int(row["i"])][0]
                    if not fut.done():
                        fut.set_result(read_message(io.BytesIO(bytes(row["result"]))))
                missing = [f for f, _ in items if not f.done()]
                if missing:
                    raise RuntimeError(f"Ray Data returned {len(items) - len(missing)} of {len(items)} chunks")
            except BaseException as e:  # noqa: BLE001 - handed to the waiting driver
                for f, _ in items:
                    if not f.done():
                        f.set_exception(e if isinstance(e, Exception) else RuntimeError(repr(e)))


    def close(self, abort: bool = False) -> None:
        self._cancel_queued()  # what no window has taken yet
        self._queue.put(None)
        self._thread.join(timeout=5 if abort else 600)
        if self.started:
            self.ray.shutdown()


class Executors:
    """The executor for each domain, made on first need and shared by the domains of one call: inline for a
    domain of about one chunk (or ``workers == 1``), else the process pool (or Ray)."""

    def __init__(self, tokenizer, workers: int | None, use_ray: bool, ray_address: str | None, shard_chars: int):
        self.tokenizer = tokenizer
        self._payload: tuple | None = None
        self.workers = workers if workers is not None else default_workers()
        if self.workers < 1:
            raise UsageError(f"workers: must be at least 1, got {self.workers}")
        self.use_ray, self.ray_address, self.shard_chars = use_ray, ray_address, shard_chars
        self._inline: InlineExecutor | None = None
        self._parallel: ProcessExecutor | RayDataExecutor | None = None

    @property
    def payload(self) -> tuple:
        if self._payload is None:  # only when something is to be tokenised (a big tokenizer.json takes a while)
            self._payload = tokenizer_payload(self.tokenizer)
        return self._payload

    def get(self, parallel: bool):
        if self.payload[0] != "fast":  # a slow tokenizer stays in this process (nothing is pickled across)
            parallel = False
        elif self.use_ray:
            parallel = True
        if not parallel or (self.workers == 1 and not self.use_ray):
            if self._inline is None:
                self._inline = InlineExecutor(self.payload)
            return self._inline
        if self._parallel is None:
            self._parallel = (RayDataExecutor(self.payload, self.ray_address, self.shard_chars) if self.use_ray
                              else ProcessExecutor(self.payload, self.workers, self.shard_chars))
        return self._parallel

    def close(self, abort: bool = False) -> None:
        if self._parallel is not None:
            self._parallel.close(abort)
            self._parallel = None


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

    return PackedDomain(name=meta["name"], train=blocks("train"), val=blocks("val"), info=meta)


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
            "candidates": result["candidates"] if kind == "t" else []}
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
                topups.append((pi, off, n))
                holes.setdefault(pi, []).append((off, n))
                held_tokens += n
        val_segments = []
        if held_tokens:
            entry = _write_holdout(d, train_parts, rows, topups, held_tokens, dtype)
            shards[HOLDOUT] = entry
            val_segments = [[HOLDOUT, 0, held_tokens]]
        val_docs, train_docs = len(rows) + len(topups), n_docs - len(rows) - len(topups)
        topped_up = len(topups)
    else:
        topped_up = 0
        val_segments = [[p["files"]["val"]["file"], 0, p["files"]["val"]["tokens"]] for p in val_parts
                        if "val" in p["files"]]
        val_docs, train_docs = sum(p["docs"] for p in val_parts), n_docs
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
    meta = {
        "format": CACHE_FORMAT, "name": spec.name, "seq_len": seq_len, "dtype": dtype.name,
        "tokenizer_fingerprint": fingerprint, "eos": eos, "files": spec.files, "val_files": spec.val_files,
        "select": spec.select, "val_fraction": holdout,
        "train": {"documents": train_docs, "tokens": train_tokens, "blocks": train_tokens // block_len,
                  "segments": train_segments},
        "val": {"documents": val_docs, "tokens": val_tokens, "blocks": val_tokens // block_len,
                "topped_up": topped_up, "segments": val_segments},
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
        for pi, off, n in topups:
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
    """See :func:`ddk.trainer.data.prepare_domains` (the same function)."""
    from ddk.fingerprint import tokenizer_fingerprint

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
    try:
        for spec in specs:
            d = domain_dir(cache, spec, fingerprint, eos, seq_len, dt)
            out[spec.name] = _ensure(spec, d, executors, eos, seq_len, dt, fingerprint, shard_chars, progress,
                                     verify)
    except BaseException:
        executors.close(abort=True)
        raise
    executors.close()
    return out


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


# ---------------------------------------------------------------------------------------------------------
# ddk data prepare / inspect

def _cli_inputs(args) -> tuple[list[DomainSpec], Any, int, Path, str | None]:
    """(specs, tokenizer, seq_len, cache_dir, ray address) from a train config (``--set`` applies) or a
    data.yaml / data folder (then ``--tokenizer`` is needed)."""
    import yaml

    from ddk.trainer.config import is_train_config, load_config
    from ddk.trainer.data import load_domain_specs

    path = Path(args.config).expanduser()
    if not path.exists():
        raise UsageError(f"config: no such file or directory: {path}")
    raw = None
    if path.is_file():
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise UsageError(f"config {path}: cannot read ({str(e).splitlines()[0]})") from None
    overrides = getattr(args, "overrides", None) or []
    ray_address = None
    if is_train_config(raw):
        cfg = load_config(str(path), overrides)
        specs = load_domain_specs(cfg.data.source())
        seq_len = cfg.data.seq_len
        cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()
        tok_path = getattr(args, "tokenizer", None) or cfg.student.model
        ray_address = cfg.ray.address or None
    else:
        if overrides:
            raise UsageError("--set: needs a train config (CONFIG here is a data.yaml or a data folder)")
        tok_path = getattr(args, "tokenizer", None)
        if not tok_path:
            raise UsageError("--tokenizer: required when CONFIG is a data.yaml or a data folder (no student.model)")
        specs = load_domain_specs(path)
        seq_len = 128
        cache = default_cache_dir()
    if getattr(args, "seq_len", None):
        seq_len = int(args.seq_len)
    if getattr(args, "cache_dir", None):
        cache = Path(args.cache_dir).expanduser()
    if seq_len < 2:
        raise UsageError("--seq-len: must be at least 2")
    return specs, load_tokenizer(str(tok_path)), seq_len, cache, ray_address


def summary_rows(domains: dict[str, PackedDomain]) -> list[dict]:
    """Per domain: documents, tokens, train/val blocks, natural proportion (share of the training tokens)."""
    from ddk.trainer.data import natural_proportions

    natural = natural_proportions(domains)
    rows = []
    for name, d in domains.items():
        info = d.info or {}
        tr, va = info.get("train", {}), info.get("val", {})
        rows.append({"domain": name, "train_documents": tr.get("documents"), "val_documents": va.get("documents"),
                     "train_tokens": tr.get("tokens"), "val_tokens": va.get("tokens"),
                     "train_blocks": len(d.train), "val_blocks": len(d.val), "natural": natural[name],
                     "dtype": str(d.train.dtype), "shards": len(info.get("shards", {}))})
    return rows


def format_summary(rows: list[dict]) -> str:
    head = ["domain", "docs (train/val)", "tokens (train/val)", "train blocks", "val blocks", "natural", "dtype",
            "shards"]
    cells = [[r["domain"], f"{r['train_documents']:,} / {r['val_documents']:,}",
              f"{r['train_tokens']:,} / {r['val_tokens']:,}", f"{r['train_blocks']:,}", f"{r['val_blocks']:,}",
              f"{r['natural']:.3f}", r["dtype"], str(r["shards"])] for r in rows]
    widths = [max(len(h), *(len(c[j]) for c in cells)) for j, h in enumerate(head)]

    def fmt(cs):
        return "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(cs, widths)))

    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in cells])


def prepare_main(args) -> int:
    """``ddk data prepare CONFIG [--set k=v] [--workers N] [--ray]``: build (or resume, or check and repair)
    the token cache of every domain, with a progress bar in tokens/s."""
    specs, tokenizer, seq_len, cache, ray_address = _cli_inputs(args)
    t0 = time.perf_counter()
    domains = prepare_domains(specs, tokenizer, seq_len, cache, workers=getattr(args, "workers", None),
                              use_ray=bool(getattr(args, "ray", False)),
                              ray_address=getattr(args, "ray_address", None) or ray_address,
                              verify=True, progress=None if not getattr(args, "quiet", False) else False,
                              shard_chars=getattr(args, "shard_chars", None))
    built = [d for d in domains.values() if d.build is not None]
    tokens = sum(d.build["tokens"] for d in built)
    print(format_summary(summary_rows(domains)))
    dt = time.perf_counter() - t0
    print(f"\ncache {cache}: {len(built)} of {len(domains)} domains built, {tokens:,} tokens tokenised "
          f"in {dt:.1f} s" + (f" ({tokens / dt:,.0f} tokens/s)" if tokens else ""))
    return 0


def inspect_main(args) -> int:
    """``ddk data inspect CONFIG``: per domain documents, tokens, train/val blocks, natural proportions (the
    cache is prepared first when it is missing)."""
    specs, tokenizer, seq_len, cache, _ = _cli_inputs(args)
    domains = prepare_domains(specs, tokenizer, seq_len, cache, workers=getattr(args, "workers", None),
                              progress=None)
    rows = summary_rows(domains)
    if getattr(args, "json", False):
        print(json.dumps({"cache_dir": str(cache), "seq_len": seq_len, "domains": rows}, indent=1))
    else:
        print(format_summary(rows))
        print(f"\ncache {cache}, seq_len {seq_len}")
    return 0
