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

A store scored across tokenizers (``ddk teacher precompute`` with a teacher of another tokenizer; its manifest's
``alignment``) is keyed by the teacher's own rows of the student's blocks (``xtok_teacher.StoreKeys``): the
cross-tokenizer wrapper asks :meth:`StoreTeacher.topk_rows` with each row unpadded, so a row is one entry in
whatever batch it comes. Its checks: the manifest's alignment must name the student's tokenizer and this
version's rule, the live teacher (if any) its tokenizer and longest row; the teacher's tokenizer for a run
without a teacher comes from the folder (``DIR/teacher-tokenizer``, fingerprint-checked).

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
from ddk.data.topk_manifest import (MANIFEST, TEACHER_TOKENIZER, manifest_for, read_manifest, store_path,
                                   write_manifest)

log = logging.getLogger("ddk.trainer")

CHECK_BATCH = 256  # blocks per has_many call of the driver's count of missing blocks


class StoreMiss(RuntimeError):
    """A sequence the store lacks, asked of a store without a teacher behind it."""


class StoreTeacher:
    """``topk(input_ids, top_k)`` from ``store`` under the teacher fingerprint ``fingerprint``; misses from
    ``fallback`` (a TeacherClient, asked for ``store_k`` columns) written back, or :class:`StoreMiss` without one.
    Thread-safe (the feed prefetches from a thread). ``hits``/``misses`` count sequences."""

    def __init__(self, store, fingerprint: str, fallback=None, store_k: int | None = None,
                 manifest: dict | None = None, directory: str | Path | None = None) -> None:
        self.store, self.fingerprint, self.fallback = store, fingerprint, fallback
        self.store_k = store_k
        self.manifest, self.directory = manifest, directory
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
            got = self._fetch([rows[i] for i in missing], k, b, pad=0)
            for j, i in enumerate(missing):
                out.ids[i].copy_(got.ids[j, :, :k])
                out.logprobs[i].copy_(got.logprobs[j, :, :k])
                out.target_logprob[i].copy_(got.target_logprob[j])
        return out

    def topk_rows(self, rows: list, top_k: int, pad: int = 0) -> list:
        """Per row of any length (a cross-tokenizer row: the teacher's own ids, ``xtok_teacher``): a
        ``SequenceOutput`` of its ``len - 1`` positions keyed by the row itself, unpadded, so that a row is the
        same entry in whatever batch it comes; None for a row of fewer than 2 ids (nothing to score). Misses go
        to the fallback in one request right-padded with ``pad`` (a causal teacher's answer at a position does not
        depend on what follows) and are stored cut to their own length."""
        from ddk.teacher.client import SequenceOutput

        k = int(top_k)
        arrays = [np.asarray(r, dtype=np.int64) for r in rows]
        live = [i for i, a in enumerate(arrays) if len(a) >= 2]
        entries = self.store.get_many(self.fingerprint, [arrays[i] for i in live], k) if live else []
        out: list = [None] * len(rows)
        missing = []
        for i, e in zip(live, entries):
            if e is None:
                missing.append(i)
                continue
            out[i] = SequenceOutput(torch.from_numpy(e.ids.astype(np.int64)), torch.from_numpy(e.logprobs),
                                    torch.from_numpy(e.target_logprob))
        with self._lock:
            self.hits += len(live) - len(missing)
            self.misses += len(missing)
        if missing:
            got = self._fetch([arrays[i] for i in missing], k, len(live), pad)
            for j, i in enumerate(missing):
                n = len(arrays[i]) - 1
                out[i] = SequenceOutput(got.ids[j, :n, :k].clone(), got.logprobs[j, :n, :k].float().clone(),
                                        got.target_logprob[j, :n].float().clone())
        return out

    def _fetch(self, rows: list, k: int, asked: int, pad: int):
        """The fallback's answer for ``rows`` (right-padded with ``pad`` to the longest), asked for the store's
        k and written back, each row's entry cut to its own length; StoreMiss without a fallback."""
        if self.fallback is None:
            raise StoreMiss(f"cache.dir: {len(rows)} of {asked} sequences of a batch are not in the top-k store "
                            f"{self.store.path} and teacher.urls is empty (run `ddk teacher precompute` on "
                            "this config again, or set teacher.urls)")
        width = max(len(r) for r in rows)
        batch = np.full((len(rows), width), int(pad), dtype=np.int64)
        for j, r in enumerate(rows):
            batch[j, :len(r)] = r
        got = self.fallback.topk(torch.from_numpy(batch), max(k, int(self.store_k or k)))
        try:
            self.store.put_many(self.fingerprint, [
                (r, got.ids[j, :len(r) - 1].numpy(), got.logprobs[j, :len(r) - 1].numpy(),
                 got.target_logprob[j, :len(r) - 1].numpy()) for j, r in enumerate(rows)])
        except sqlite3.Error as e:  # the run goes on: the answer is in hand, only the write-back is lost
            log.warning("top-k store %s: could not write %d answers back (%s)", self.store.path, len(rows), e)
        return got

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
    return StoreTeacher(_store(directory, manifest), manifest["model_fingerprint"], fallback, int(manifest["k"]),
                        manifest, directory)


def save_teacher_tokenizer(directory: str | Path, tok) -> None:
    """A cross-tokenizer store's copy of the teacher's tokenizer (``DIR/teacher-tokenizer``: its data files)."""
    import shutil
    import tempfile

    target = Path(directory) / TEACHER_TOKENIZER
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TEACHER_TOKENIZER}.", dir=target.parent))
    tok.save_pretrained(str(tmp))
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def load_teacher_tokenizer(directory: str | Path, fingerprint: str):
    """The teacher's tokenizer a cross-tokenizer store keeps (UsageError when absent or of another fingerprint)."""
    from transformers import PreTrainedTokenizerFast

    from ddk.fingerprint import tokenizer_fingerprint

    folder = Path(directory) / TEACHER_TOKENIZER
    if not (folder / "tokenizer.json").is_file():
        raise UsageError(f"cache.dir: {folder} has no tokenizer.json (a store scored across tokenizers keeps the "
                         "teacher's tokenizer there; run `ddk teacher precompute` on it again)")
    tok = PreTrainedTokenizerFast.from_pretrained(str(folder), trust_remote_code=False)
    got = tokenizer_fingerprint(tok)
    if got != fingerprint:
        raise UsageError(f"cache.dir: the teacher tokenizer in {folder} has fingerprint {got}; the manifest "
                         f"names {fingerprint}")
    return tok


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


def missing_blocks(store, fingerprint: str, k: int, blocks: dict[str, list],
                   keys=None) -> dict[str, tuple[int, int]]:
    """``{domain: (blocks missing, blocks needed)}`` by the keys in the store (``keys``: blocks -> their keys,
    ``xtok_teacher.StoreKeys``; None: the blocks themselves; a None key needs nothing)."""
    out = {}
    for name, parts in blocks.items():
        missing = needed = 0
        for part in parts:
            for i in range(0, len(part), CHECK_BATCH):
                rows = np.asarray(part[i:i + CHECK_BATCH], dtype=np.int64)
                ks = keys(rows) if keys is not None else list(rows)
                live = [x for x in ks if x is not None]
                have = store.has_many(fingerprint, live, k) if live else []
                needed += len(ks)
                missing += len(have) - sum(have)
        out[name] = (missing, needed)
    return out


def check_manifest(manifest: dict, cfg, student_fingerprint: str, directory) -> None:
    """Refuse (exit 2) a store the run cannot use, naming what differs. Pure but for the message's path."""
    path = Path(directory) / MANIFEST
    theirs = manifest.get("tokenizer_fingerprint")
    if manifest.get("alignment"):  # scored across tokenizers: the teacher's tokenizer is another one
        check_alignment(manifest["alignment"], cfg, student_fingerprint, path)
    elif theirs != student_fingerprint:
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


def check_alignment(alignment: dict, cfg, student_fingerprint: str, path) -> None:
    """A cross-tokenizer store's ``alignment`` (its manifest's) against the run: exit 2 naming what differs. Pure."""
    from ddk.trainer.xtok_teacher import ALIGNMENT

    if cfg.kd.cross_tokenizer == "off":
        raise UsageError(f"cache.dir: the store ({path}) was scored across tokenizers (its alignment); "
                         "kd.cross_tokenizer is off")
    theirs = alignment.get("student_tokenizer_fingerprint")
    if theirs != student_fingerprint:
        raise UsageError(f"cache.dir: the store's alignment.student_tokenizer_fingerprint {theirs} ({path}) differs "
                         f"from student.model's {student_fingerprint} (a store scored for another student tokenizer)")
    for key, want in ALIGNMENT.items():
        if alignment.get(key) != want:
            raise UsageError(f"cache.dir: the store's alignment.{key} {alignment.get(key)!r} ({path}) is not this "
                             f"version's {want!r}; score it again (`ddk teacher precompute`)")


def check_live_teacher(manifest: dict, info: dict, expected_alignment: dict | None, directory) -> None:
    """The store against the teacher of ``teacher.urls`` (``info``: its /v1/info): the same model, tokenizer and
    (across tokenizers) alignment, else exit 2 naming the first that differs. Pure."""
    path = Path(directory) / MANIFEST
    live = {"model_fingerprint": info.get("model_fingerprint"), "alignment": expected_alignment,
            "tokenizer_fingerprint": info.get("tokenizer_fingerprint")}
    for key, want in live.items():
        if manifest.get(key) != want:
            raise UsageError(f"cache.dir: the store's {key} {manifest.get(key)!r} ({path}) is not the run's "
                             f"{want!r} (teacher.urls serves teacher {info.get('model_fingerprint')})")


def store_keys(manifest: dict, directory, student_tok, teacher_tok=None):
    """The key function of the store's entries (``xtok_teacher.StoreKeys``): the blocks themselves for a store of
    the student's tokenizer; the teacher's rows for a cross-tokenizer one (its tokenizer: ``teacher_tok``, else the
    folder's copy)."""
    from ddk.trainer.xtok_teacher import StoreKeys

    alignment = manifest.get("alignment")
    if not alignment:
        return StoreKeys()
    teacher_tok = teacher_tok or load_teacher_tokenizer(directory, manifest["tokenizer_fingerprint"])
    return StoreKeys(student_tok, teacher_tok, int(alignment["teacher_max_len"]))


def new_manifest(cfg, directory: Path, info: dict, domains: dict, alignment: dict | None, teacher_tok) -> dict:
    """The manifest of a folder a run with ``teacher.urls`` starts filling (a cross-tokenizer store keeps the
    teacher's tokenizer beside it)."""
    if not info.get("model_fingerprint"):
        raise UsageError("cache.dir: the teacher publishes no model_fingerprint, so its answers cannot be stored")
    manifest = manifest_for(info, cfg.kd.top_k, cfg.data.seq_len, "float16", domains, complete=False,
                            alignment=alignment)
    if teacher_tok is not None:
        save_teacher_tokenizer(directory, teacher_tok)
    write_manifest(directory, manifest)
    log.info("cache.dir: a new top-k store in %s, filled as the run goes%s", directory,
             " (keyed by the teacher's rows: another tokenizer)" if alignment else "")
    return manifest


def checked_store_source(cfg, tokenizer, domains: dict, client=None) -> StoreTeacher:
    """The driver's view of ``cache.dir`` (exit 2 on any mismatch): its manifest checked against the student's
    tokenizer and the config; without a teacher (``client`` None) every block the run needs must be in the store;
    with one, its model, tokenizer and alignment must be the store's (a folder without a manifest gets one for
    it). Returns the :class:`StoreTeacher` (``client`` behind it; closing it closes both)."""
    from ddk.fingerprint import tokenizer_fingerprint
    from ddk.trainer.xtok_teacher import alignment_settings, teacher_max_len

    directory = Path(cfg.cache.dir)
    student_fp = tokenizer_fingerprint(tokenizer)
    manifest = read_manifest(directory)
    info = client.info() if client is not None else None
    teacher_tok = alignment = None
    if info is not None and info.get("tokenizer_fingerprint") != student_fp and cfg.kd.cross_tokenizer != "off":
        teacher_tok = client.tokenizer()  # the driver's handshake checked the pair (launch._cross_checked)
        alignment = alignment_settings(student_fp, teacher_max_len(info))
    if manifest is None:
        if client is None:
            raise UsageError(f"cache.dir: no {MANIFEST} in {directory} (fill it with `ddk teacher precompute "
                             "CONFIG --out DIR`, or set teacher.urls to fill it as the run goes)")
        manifest = new_manifest(cfg, directory, info, domains, alignment, teacher_tok)
    check_manifest(manifest, cfg, student_fp, directory)
    if info is not None:
        check_live_teacher(manifest, info, alignment, directory)
    store = _store(directory, manifest)
    try:
        if client is None:
            check_complete(cfg, store, manifest, domains, directory, store_keys(manifest, directory, tokenizer))
    except BaseException:
        store.close()
        raise
    return StoreTeacher(store, manifest["model_fingerprint"], client, int(manifest["k"]), manifest, directory)


def check_complete(cfg, store, manifest: dict, domains: dict, directory: Path, keys) -> None:
    """A run without a teacher: every block it needs must be in the store (exit 2 counting what is missing)."""
    gaps = missing_blocks(store, manifest["model_fingerprint"], cfg.kd.top_k if cfg.kd.gamma > 0 else 1,
                          needed_blocks(cfg, domains), keys)
    missing = sum(m for m, _ in gaps.values())
    if missing:
        needed = sum(n for _, n in gaps.values())
        where = ", ".join(f"{n} {m} of {t}" for n, (m, t) in gaps.items() if m)
        unknown = sorted(set(domains) - set(manifest.get("domains") or {}))
        note = f"; not in its manifest: {', '.join(unknown)}" if unknown else ""
        raise UsageError(f"cache.dir: {missing} of the {needed} blocks the run needs are not in the store "
                         f"{directory} ({where}{note}); run `ddk teacher precompute` on this config again, "
                         "or set teacher.urls to score them")
    log.info("cache.dir: training from the top-k store %s (%d blocks, teacher %s%s), no teacher service", directory,
             sum(n for _, n in gaps.values()), manifest["model_fingerprint"],
             ", across tokenizers" if manifest.get("alignment") else "")
