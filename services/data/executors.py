"""Where the token cache's chunks are tokenised: this process (:class:`InlineExecutor`), worker processes
(:class:`ProcessExecutor`, ``python -c 'from ddk.data.executors import worker_main; ...'``) or Ray Data
(:class:`RayDataExecutor`); :class:`Executors` picks one per domain. A chunk becomes :func:`tokenize_chunk`'s
dict; between processes it travels as :func:`write_message` (JSON and ``.npy`` bytes, no pickle).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import io
import itertools
import json
import logging
import os
import struct
import sys
from typing import Callable, Iterator

import numpy as np

from ddk.data.domains import doc_hash_fraction
from ddk.data.tokenizer import cached_encoder, make_encoder, tokenizer_payload
from ddk.errors import UsageError

log = logging.getLogger(__name__)

BATCH_CHARS = 256_000            # characters per encode_batch call inside a worker (bounds the tokenizer's memory)
MAX_INFLIGHT_CHARS = 256_000_000  # text handed to workers and not yet written back
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
# tokenising a chunk (in this process, a worker process or a Ray Data worker)

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
    Without ``holdout`` everything goes to ``train`` (the caller names it), and ``doc_hash``/``doc_tokens`` give
    each document's hash and tokens in order (a validation file's document table).
    """
    dt = np.dtype(dtype)
    keep, held = _Stream(dt), _Stream(dt)
    held_docs: list[list] = []
    cand: list[tuple] = []
    doc_hash: list[float] = []
    doc_tokens: list[int] = []
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
                doc_hash.append(doc_hash_fraction(text))
                doc_tokens.append(len(ids))
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
            "docs": i, "tokens": keep.n + held.n, "doc_hash": np.array(doc_hash, np.float64),
            "doc_tokens": np.array(doc_tokens, np.int64)}


# ---------------------------------------------------------------------------------------------------------
# executors: where chunks are tokenised. submit() returns a concurrent.futures.Future of tokenize_chunk's dict.

class InlineExecutor:
    """In this process (one worker). The tokenizer's own threads may still use more than one core."""

    slots = 1

    def __init__(self, payload):
        self.encode = cached_encoder(payload)

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
        self._procs = [subprocess.Popen([sys.executable, "-c", "from ddk.data.executors import worker_main; "
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
    encode = cached_encoder(payload)
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
