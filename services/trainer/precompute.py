"""``ddk teacher precompute CONFIG [--set ...] --out DIR``: score every block of a train config through the teacher
service once and keep the answers in a top-k store, so that runs can train from it without a teacher.

What is scored: the trainer's packed blocks from the token cache, every training block and every validation block
of each domain of the config (``data.seq_len + 1`` token ids each, exactly the rows the teacher feed and the
evaluation send), at ``k = kd.top_k``. The store key is those token ids (``ddk.teacher.store.sequence_key``), and
the teacher's identity is its ``model_fingerprint`` from ``GET /v1/info``.

The folder ``DIR``:

- ``DIR/topk.sqlite``: a :class:`~ddk.teacher.store.TopkStore` (the same layout as ``ddk teacher serve
  --cache-dir DIR``, so a teacher can serve from a precomputed folder and a service cache can be trained from);
- ``DIR/manifest.json``: what the store holds (:func:`ddk.data.topk_manifest.manifest_for`): the teacher's model
  and tokenizer fingerprints, ``k``, ``seq_len``, the encoding and the blocks per domain and split, and
  ``complete`` (false until every block is in). It holds no timestamps, so a run that was killed and resumed ends with the
  manifest an uninterrupted one writes.

Resumable: the manifest is written first (``complete: false``); each batch of blocks is looked up in the store
(keys only, :meth:`TopkStore.has_many`) and only the missing ones are sent, so a second run after a kill (or
after the data grew) scores only what is not there. A SIGKILLed run loses the requests in flight; the store
stays consistent (SQLite WAL). A folder holding another teacher's, tokenizer's, k's or seq_len's store is
refused (exit 2).

A teacher of another tokenizer (``kd.cross_tokenizer: auto``, the handshake of ``ddk train``:
``xtok_teacher.checked_teacher_tokenizer``): each block is re-tokenised the teacher's way
(``xtok_teacher.StoreKeys``, what the cross-tokenizer wrapper sends) and the store is keyed by those teacher rows,
unpadded (a batch's rows right-padded with the teacher's eos into one request, each answer stored cut to its own
row); the manifest's ``tokenizer_fingerprint`` is the teacher's and its ``alignment`` names the rule and the
student's tokenizer (a folder of a same-tokenizer store, or of another alignment, is exit 2 naming the key), and
``DIR/teacher-tokenizer`` keeps the teacher's tokenizer for runs without a teacher.

Training from it: ``cache.dir: DIR`` in the train config (``ddk.trainer.topk_source``). It lives in the trainer
package, beside the train config it reads (the teacher package imports nothing of the trainer).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ddk.data.cache import prepare_data
from ddk.data.tokenizer import student_tokenizer
from ddk.data.topk_manifest import (MANIFEST, blocks_of, identity_problem, manifest_for, read_manifest, store_path,
                                   write_manifest)
from ddk.errors import UsageError
from ddk.fingerprint import tokenizer_fingerprint
from ddk.teacher.client import TeacherClient
from ddk.teacher.store import TopkStore
from ddk.tokenfile import read_token
from ddk.trainer.config import load_config
from ddk.trainer.launch import check_teacher
from ddk.trainer.topk_source import save_teacher_tokenizer
from ddk.trainer.xtok_teacher import StoreKeys, alignment_settings, checked_teacher_tokenizer, teacher_max_len

log = logging.getLogger(__name__)


def main(args) -> int:
    """``ddk teacher precompute``."""
    overrides = list(args.overrides) + ([f"teacher.urls=[{args.teacher}]"] if args.teacher else [])
    cfg = load_config(args.config, overrides)  # --teacher first, so that a config without teacher.urls validates
    urls = list(cfg.teacher.urls)
    if not urls:
        raise UsageError("--teacher: give a teacher URL (or set teacher.urls in the config)")
    out = Path(args.out).expanduser().resolve()
    k, seq_len = int(cfg.kd.top_k), int(cfg.data.seq_len)
    tokenizer, student_vocab = student_tokenizer(cfg)
    token = read_token(cfg.teacher.token_file, "teacher.token_file") if cfg.teacher.token_file else None
    client = TeacherClient(urls, token=token)
    try:
        info = client.info()
        student_fp = tokenizer_fingerprint(tokenizer)
        teacher_tok = None
        if info.get("tokenizer_fingerprint") != student_fp and cfg.kd.cross_tokenizer != "off":
            where = "--teacher" if args.teacher else "teacher.urls"
            teacher_tok = checked_teacher_tokenizer(client, tokenizer, where)  # exit 2 when the pair cannot work
        check_teacher(info, student_fp, cfg, student_vocab, cross=teacher_tok is not None)
        alignment = alignment_settings(student_fp, teacher_max_len(info)) if teacher_tok is not None else None
        keys = StoreKeys(tokenizer, teacher_tok, teacher_max_len(info))  # teacher_tok None: the blocks themselves
        if not info.get("model_fingerprint"):
            raise UsageError(f"--teacher: {urls[0]} publishes no model_fingerprint (a store needs the teacher's "
                             "identity)")
        domains = prepare_data(cfg, tokenizer)
        old = read_manifest(out)
        encoding = args.encoding or (old or {}).get("encoding") or "float16"
        fresh = manifest_for(info, k, seq_len, encoding, domains, complete=False, alignment=alignment)
        if old is not None:
            problem = identity_problem(old, fresh)
            if problem:
                raise UsageError(f"--out: {out} holds another store ({problem}); use another folder")
            fresh["domains"] = {**old.get("domains", {}), **fresh["domains"]}  # a domain scored before stays
            fresh["blocks"] = sum(c["train"] + c["val"] for c in fresh["domains"].values())
        if teacher_tok is not None:
            save_teacher_tokenizer(out, teacher_tok)
        write_manifest(out, fresh)
        store = TopkStore(store_path(out), encoding=encoding, vocab_size=info.get("vocab_size"))
        try:
            scored, seconds = _score(client, store, info["model_fingerprint"], domains, k, args, keys)
        finally:
            store.close()
        write_manifest(out, {**fresh, "complete": True})
    finally:
        client.close()
    n = sum(len(b) for _, _, b in blocks_of(domains))
    rate = scored * (seq_len + 1) / seconds if seconds > 0 else 0.0
    print(f"ddk teacher precompute: {n} blocks of {len(domains)} domains in {store_path(out)} "
          f"({scored} scored now, {n - scored} there before; {rate:,.0f} tokens/s); manifest {out / MANIFEST}"
          + (" (across tokenizers: keyed by the teacher's rows)" if alignment else ""), flush=True)
    return 0


def _score(client, store, fp: str, domains: dict, k: int, args, keys: StoreKeys) -> tuple[int, float]:
    """Every block whose key (``keys``: the block, or its teacher row) is not in the store, sent in requests of
    ``args.batch_size`` keys (right-padded with ``keys.pad`` to the longest) with ``args.concurrency`` in flight,
    each answer stored as it comes. The bar counts the student's tokens. Returns (keys scored, seconds)."""
    import torch
    from tqdm import tqdm

    batch, todo = int(args.batch_size), []
    present_tokens = total_tokens = 0
    for name, split, blocks in blocks_of(domains):
        for i in range(0, len(blocks), batch):
            rows = np.asarray(blocks[i:i + batch], dtype=np.int64)
            ks = keys(rows)
            live = [j for j, key in enumerate(ks) if key is not None]
            have = dict(zip(live, store.has_many(fp, [ks[j] for j in live], k))) if live else {}
            total_tokens += rows.size
            missing = [j for j in live if not have[j]]
            present_tokens += rows.shape[1] * (len(rows) - len(missing))
            if missing:
                todo.append(([ks[j] for j in missing], rows.shape[1] * len(missing)))
    bar = tqdm(total=total_tokens, initial=present_tokens, unit="tok", unit_scale=True, desc="precompute",
               dynamic_ncols=True, disable=args.quiet)
    scored, t0 = 0, time.perf_counter()

    def fetch(item):
        rows, tokens = item
        padded = np.full((len(rows), max(len(r) for r in rows)), keys.pad, dtype=np.int64)
        for j, r in enumerate(rows):
            padded[j, :len(r)] = r
        return rows, tokens, client.topk(torch.from_numpy(padded), k)

    try:
        with ThreadPoolExecutor(max_workers=int(args.concurrency), thread_name_prefix="precompute") as pool:
            pending = []
            for rows in todo:  # at most `concurrency` requests queued beyond the ones running
                pending.append(pool.submit(fetch, rows))
                if len(pending) >= 2 * int(args.concurrency):
                    scored += _store_answer(store, fp, *pending.pop(0).result(), bar)
            for f in pending:
                scored += _store_answer(store, fp, *f.result(), bar)
    finally:
        bar.close()
    return scored, time.perf_counter() - t0


def _store_answer(store, fp: str, rows: list, tokens: int, out, bar) -> int:
    """One request's answer stored, each row's entry cut to its own length (a padded teacher row)."""
    ids, lps, tgt = out.ids.numpy(), out.logprobs.numpy(), out.target_logprob.numpy()
    store.put_many(fp, [(r, ids[j, :len(r) - 1], lps[j, :len(r) - 1], tgt[j, :len(r) - 1])
                        for j, r in enumerate(rows)])
    bar.update(int(tokens))
    return len(rows)
