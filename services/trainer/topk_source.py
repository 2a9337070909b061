"""Training from a top-k store (``cache.dir: DIR`` in the train config): a teacher-like object for the feed and
the evaluation, and the checks the driver makes before anything starts.

:class:`StoreTeacher` answers ``topk(input_ids, top_k)`` -- what the feed and ``evaluate.teacher_answers`` ask of a
:class:`~ddk.teacher.client.TeacherClient` -- from the :class:`~ddk.teacher.store.TopkStore` in ``DIR/topk.sqlite``
(``ddk teacher precompute --out DIR`` fills it; a service cache folder, ``ddk teacher serve --cache-dir DIR``, is
the same layout). The rows it returns are the store's float16 numbers, which are the bytes a float16 wire frame
carries, so a run from the store and the same run against the live teacher see the same teacher outputs.

- ``teacher.urls`` empty: the store alone, no teacher at all. The driver (:func:`checked_store_source`) checks the
  manifest against the student's tokenizer and the config (``kd.top_k``, ``data.seq_len``) and counts the blocks
  the run needs that the store lacks (every training block when ``kd.gamma > 0``, the evaluation blocks);
  anything wrong is exit 2, naming it. The DDK teacher losses come from the stored target logprobs of the
  validation blocks.
- ``teacher.urls`` set as well: a miss goes to the teacher (asked for the store's k, so the entry serves any
  smaller k) and is written back, so the next run -- another arm of ``ddk compare``, a restart -- finds it. A
  folder without a manifest is started with one for this teacher; a manifest of another teacher is exit 2.

Every worker opens the store itself (:func:`open_source`): a local SQLite file, safe with several processes on one
host and on a shared file system that implements POSIX locks. Workers on several hosts without a shared file
system should use the service-side cache (``ddk teacher serve --cache-dir``) instead.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

import numpy as np
import torch

from ddk.errors import UsageError
from ddk.data.topk_manifest import MANIFEST, manifest_for, read_manifest, store_path, write_manifest

log = logging.getLogger("ddk.trainer")

CHECK_BATCH = 256  # blocks per has_many call of the driver's count of missing blocks


class StoreMiss(RuntimeError):
    """A sequence the store lacks, asked of a store without a teacher behind it."""


class StoreTeacher:
    """``topk(input_ids, top_k)`` from ``store`` under the teacher fingerprint ``fingerprint``; misses from
    ``fallback`` (a TeacherClient, asked for ``store_k`` columns) written back, or :class:`StoreMiss` without one.
    Thread-safe (the feed prefetches from a thread). ``hits``/``misses`` count sequences."""

    def __init__(self, store, fingerprint: str, fallback=None, store_k: int | None = None) -> None:
        self.store, self.fingerprint, self.fallback = store, fingerprint, fallback
        self.store_k = store_k
        self.hits = self.misses = 0
        self._lock = threading.Lock()

    def topk(self, input_ids, top_k: int):
        from ddk.teacher.client import TeacherOutput

        if isinstance(input_ids, torch.Tensor):
            rows = input_ids.detach().to("cpu", torch.int64).numpy()
        else:
            rows = np.asarray(input_ids, dtype=np.int64)
        if rows.ndim != 2 or rows.shape[0] == 0 or rows.shape[1] < 2:
            raise ValueError(f"input_ids: expected a non-empty [B, L >= 2] batch, got shape {rows.shape}")
        b, length, k = rows.shape[0], rows.shape[1], int(top_k)
        entries = self.store.get_many(self.fingerprint, list(rows), k)
        missing = [i for i, e in enumerate(entries) if e is None]
        with self._lock:
            self.hits += b - len(missing)
            self.misses += len(missing)
        out = TeacherOutput(ids=torch.empty((b, length - 1, k), dtype=torch.int64),
                            logprobs=torch.empty((b, length - 1, k), dtype=torch.float32),
                            target_logprob=torch.empty((b, length - 1), dtype=torch.float32))
        for i, e in enumerate(entries):
            if e is not None:
                out.ids[i].copy_(torch.from_numpy(e.ids.astype(np.int64)))
                out.logprobs[i].copy_(torch.from_numpy(e.logprobs))
                out.target_logprob[i].copy_(torch.from_numpy(e.target_logprob))
        if missing:
            if self.fallback is None:
                raise StoreMiss(f"cache.dir: {len(missing)} of {b} sequences of a batch are not in the top-k store "
                                f"{self.store.path} and teacher.urls is empty (run `ddk teacher precompute` on "
                                "this config again, or set teacher.urls)")
            fetch_k = max(k, int(self.store_k or k))
            got = self.fallback.topk(torch.from_numpy(rows[missing]), fetch_k)
            try:
                self.store.put_many(self.fingerprint, [
                    (rows[i], got.ids[j].numpy(), got.logprobs[j].numpy(), got.target_logprob[j].numpy())
                    for j, i in enumerate(missing)])
            except sqlite3.Error as e:  # the run goes on: the answer is in hand, only the write-back is lost
                log.warning("top-k store %s: could not write %d answers back (%s)", self.store.path, len(missing), e)
            for j, i in enumerate(missing):
                out.ids[i].copy_(got.ids[j, :, :k])
                out.logprobs[i].copy_(got.logprobs[j, :, :k])
                out.target_logprob[i].copy_(got.target_logprob[j])
        return out

    def close(self) -> None:
        if self.hits or self.misses:
            log.info("top-k store %s: %d sequences from the store, %d from the teacher%s", self.store.path,
                     self.hits, self.misses, " (written back)" if self.misses else "")
        self.store.close()
        if self.fallback is not None and hasattr(self.fallback, "close"):
            self.fallback.close()


def _store(directory: Path, manifest: dict):
    from ddk.teacher.store import TopkStore

    return TopkStore(store_path(directory), encoding=manifest.get("encoding") or "float16",
                     vocab_size=manifest.get("vocab_size"))


def open_source(cfg, token: str | None = None, fallback=None) -> StoreTeacher:
    """A worker's :class:`StoreTeacher` for ``cache.dir`` (the driver checked it and wrote its manifest); a
    TeacherClient for ``teacher.urls`` behind it when set (``fallback`` replaces it)."""
    directory = Path(cfg.cache.dir)
    manifest = read_manifest(directory)
    if manifest is None:
        raise UsageError(f"cache.dir: no {MANIFEST} in {directory}")
    if fallback is None and cfg.teacher.urls:
        from ddk.teacher.client import TeacherClient

        fallback = TeacherClient(cfg.teacher.urls, token=token)
    return StoreTeacher(_store(directory, manifest), manifest["model_fingerprint"], fallback, int(manifest["k"]))


def needed_blocks(cfg, domains: dict) -> dict[str, list]:
    """Per domain, the block arrays a run may send the teacher: every training block when the loss needs the
    teacher (``kd.gamma > 0``), and the evaluation set's blocks (``eval.*``: ddk.trainer.evaluate.evaluation_sets)."""
    from ddk.trainer.evaluate import evaluation_sets

    sets = evaluation_sets(domains, cfg.eval)
    out = {}
    for name in sorted(domains):
        parts = [domains[name].train] if cfg.kd.gamma > 0 else []
        out[name] = parts + [sets[name].blocks]
    return out


def missing_blocks(store, fingerprint: str, k: int, blocks: dict[str, list]) -> dict[str, tuple[int, int]]:
    """``{domain: (blocks missing, blocks needed)}`` by the keys in the store."""
    out = {}
    for name, parts in blocks.items():
        missing = needed = 0
        for part in parts:
            for i in range(0, len(part), CHECK_BATCH):
                rows = np.asarray(part[i:i + CHECK_BATCH], dtype=np.int64)
                have = store.has_many(fingerprint, list(rows), k)
                needed += len(have)
                missing += len(have) - sum(have)
        out[name] = (missing, needed)
    return out


def check_manifest(manifest: dict, cfg, student_fingerprint: str, directory) -> None:
    """Refuse (exit 2) a store the run cannot use, naming what differs. Pure but for the message's path."""
    path = Path(directory) / MANIFEST
    theirs = manifest.get("tokenizer_fingerprint")
    if theirs != student_fingerprint:
        raise UsageError(f"cache.dir: the store's tokenizer fingerprint {theirs} ({path}) differs from student.model's "
                         f"{student_fingerprint} (a store scored for another tokenizer)")
    if int(manifest["seq_len"]) != int(cfg.data.seq_len):
        raise UsageError(f"cache.dir: the store holds blocks of seq_len {manifest['seq_len']} ({path}); "
                         f"data.seq_len is {cfg.data.seq_len}")
    if cfg.kd.gamma > 0 and int(manifest["k"]) < int(cfg.kd.top_k):
        raise UsageError(f"cache.dir: the store holds the teacher's top-{manifest['k']} ({path}), fewer than "
                         f"kd.top_k {cfg.kd.top_k}")
    if not manifest.get("model_fingerprint"):
        raise UsageError(f"cache.dir: {path} names no teacher model_fingerprint")


def checked_store_source(cfg, tokenizer, domains: dict, client=None) -> StoreTeacher:
    """The driver's view of ``cache.dir`` (exit 2 on any mismatch): its manifest checked against the student's
    tokenizer and the config; without a teacher (``client`` None) every block the run needs must be in the store;
    with one, its ``model_fingerprint`` must be the store's (a folder without a manifest gets one for it). Returns
    the :class:`StoreTeacher` (``client`` behind it; closing it closes both)."""
    from ddk.fingerprint import tokenizer_fingerprint

    directory = Path(cfg.cache.dir)
    student_fp = tokenizer_fingerprint(tokenizer)
    manifest = read_manifest(directory)
    info = client.info() if client is not None else None
    if manifest is None:
        if client is None:
            raise UsageError(f"cache.dir: no {MANIFEST} in {directory} (fill it with `ddk teacher precompute "
                             "CONFIG --out DIR`, or set teacher.urls to fill it as the run goes)")
        if not info.get("model_fingerprint"):
            raise UsageError("cache.dir: the teacher publishes no model_fingerprint, so its answers cannot be "
                             "stored")
        manifest = manifest_for(info, cfg.kd.top_k, cfg.data.seq_len, "float16", domains, complete=False)
        write_manifest(directory, manifest)
        log.info("cache.dir: a new top-k store in %s, filled as the run goes", directory)
    check_manifest(manifest, cfg, student_fp, directory)
    if info is not None and info.get("model_fingerprint") != manifest["model_fingerprint"]:
        raise UsageError(f"cache.dir: the store holds teacher {manifest['model_fingerprint']} "
                         f"({directory / MANIFEST}); teacher.urls serves {info.get('model_fingerprint')}")
    store = _store(directory, manifest)
    try:
        if client is None:
            gaps = missing_blocks(store, manifest["model_fingerprint"], cfg.kd.top_k if cfg.kd.gamma > 0 else 1,
                                  needed_blocks(cfg, domains))
            missing = sum(m for m, _ in gaps.values())
            if missing:
                needed = sum(n for _, n in gaps.values())
                where = ", ".join(f"{n} {m} of {t}" for n, (m, t) in gaps.items() if m)
                unknown = sorted(set(domains) - set(manifest.get("domains") or {}))
                note = f"; not in its manifest: {', '.join(unknown)}" if unknown else ""
                raise UsageError(f"cache.dir: {missing} of the {needed} blocks the run needs are not in the store "
                                 f"{directory} ({where}{note}); run `ddk teacher precompute` on this config again, "
                                 "or set teacher.urls to score them")
            log.info("cache.dir: training from the top-k store %s (%d blocks, teacher %s), no teacher service",
                     directory, sum(n for _, n in gaps.values()), manifest["model_fingerprint"])
    except BaseException:
        store.close()
        raise
    return StoreTeacher(store, manifest["model_fingerprint"], client, int(manifest["k"]))
