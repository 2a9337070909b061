"""The manifest of a top-k store folder (``DIR/manifest.json`` beside ``DIR/topk.sqlite``): which teacher
(model and tokenizer fingerprints), ``k``, ``seq_len``, encoding, and how many blocks of each domain and split it
holds, and whether it is ``complete``. Written by ``ddk teacher precompute`` (:mod:`ddk.trainer.precompute`),
checked by a run training from the store (:mod:`ddk.trainer.topk_source`). No timestamps: a run killed and
resumed ends with the manifest an uninterrupted one writes.

A store scored across tokenizers (a teacher of another tokenizer, ``ddk.trainer.xtok_teacher``) is keyed by the
teacher's own rows of the student's blocks; its manifest's ``tokenizer_fingerprint`` is the teacher's, and
``alignment`` (None for a same-tokenizer store) names the rule and the student's tokenizer those rows come from
(``xtok_teacher.alignment_settings``). The folder keeps the teacher's tokenizer in ``DIR/teacher-tokenizer``, so a
run from the store alone can re-tokenise its blocks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ddk.data.evalset import validation_windows
from ddk.errors import UsageError

MANIFEST = "manifest.json"
STORE_FILE = "topk.sqlite"  # the service cache's name too (app.py: cache_dir/topk.sqlite)
TEACHER_TOKENIZER = "teacher-tokenizer"  # a cross-tokenizer store's copy of the teacher's tokenizer files
FORMAT = 1
SPLITS = ("train", "val")
# the manifest keys a store's entries depend on: another value in any of them is another store
IDENTITY = ("model_fingerprint", "tokenizer_fingerprint", "k", "seq_len")
CROSS_IDENTITY = ("alignment",)  # also compared; absent in the manifests of same-tokenizer stores (None)


def store_path(directory: str | Path) -> Path:
    return Path(directory) / STORE_FILE


def read_manifest(directory: str | Path) -> dict | None:
    """``DIR/manifest.json`` (None when absent; UsageError naming ``what`` when unreadable)."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"cache.dir: {path} is not a readable manifest ({e})") from None
    if not isinstance(manifest, dict) or any(k not in manifest for k in IDENTITY):
        raise UsageError(f"cache.dir: {path} is not a top-k store manifest (it lacks {', '.join(IDENTITY)})")
    return manifest


def write_manifest(directory: str | Path, manifest: dict) -> None:
    """Atomically (a temporary file renamed over the old one)."""
    path = Path(directory) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def manifest_for(info: dict, k: int, seq_len: int, encoding: str, domains: dict, complete: bool,
                 alignment: dict | None = None) -> dict:
    """The manifest of a store of ``info``'s teacher (``/v1/info``) for ``domains`` (name -> PackedDomain, or
    name -> {"train": n, "val": n}); ``alignment``: a cross-tokenizer store's (module docstring). Pure."""
    counts = {n: ({s: int(d[s]) for s in SPLITS} if isinstance(d, dict) else
                  {"train": len(d.train), "val": len(validation_windows(d))}) for n, d in sorted(domains.items())}
    return {"format": FORMAT, "model": info.get("model"), "model_fingerprint": info.get("model_fingerprint"),
            "tokenizer_fingerprint": info.get("tokenizer_fingerprint"), "vocab_size": info.get("vocab_size"),
            "k": int(k), "seq_len": int(seq_len), "encoding": encoding, "domains": counts,
            "blocks": sum(c["train"] + c["val"] for c in counts.values()), "complete": bool(complete),
            **({"alignment": dict(alignment)} if alignment else {})}


def identity_problem(old: dict, new: dict) -> str | None:
    """What makes ``old``'s store another store than ``new``'s (None: the same). Pure."""
    for key in IDENTITY + CROSS_IDENTITY:
        if old.get(key) != new.get(key):
            return f"{key} {old.get(key)!r} (the folder's) is not {new.get(key)!r}"
    return None


def blocks_of(domains: dict) -> list[tuple[str, str, object]]:
    """(domain, split, blocks) of every split of every domain, in name order: the training blocks, and for
    validation every whole-document window any evaluation set is drawn from (ddk.data.evalset.validation_windows;
    a short document's block padded with EOS, as the evaluation sends it)."""
    return [(n, s, domains[n].train if s == "train" else validation_windows(domains[n]).blocks)
            for n in sorted(domains) for s in SPLITS]
