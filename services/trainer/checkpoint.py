"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint directory (one per saved step, written by every Ray worker into the same folder, which
Ray Train merges in storage) holds, whatever ``train.strategy`` (ddp or fsdp) and world size wrote it:

    model.safetensors        the full student (rank 0; an FSDP run gathers it parameter by parameter)
    state.json               rank 0: layout, step, world_size, strategy, the optimiser's full state keyed by
                             parameter name, LR schedule, torch RNG, and the shared ``entries``: ``trainer``
                             (TrainState) and ``mixture`` (MixtureSync); tensors appear as
                             {"__tensor__": key} pointers into state.safetensors
    state.safetensors        every tensor of that state: AdamW moments, RNG state
    rank-<r>.json            worker r's own ``entries`` (its ``sampler``), with rank-<r>.safetensors

So a checkpoint resumes on any number of workers and under either strategy (ddk.trainer.parallel.Distributed
writes and reads it; each rank takes its part of every tensor on load). This module is the format:
:func:`save_checkpoint` / :func:`load_checkpoint` (which reads the layout before 2026-12-06 too,
:func:`upgrade`), the model file, and the discovery of the newest complete checkpoint.

`torch.save` would pickle, and a pickle in a checkpoint is code that runs on load. Instead
:func:`flatten` walks a nested state (dicts, lists, tuples, scalars, tensors, numpy arrays) and
splits it into a JSON-able skeleton plus a flat {key: tensor} map that safetensors can store;
:func:`unflatten` puts it back together, numpy arrays and tuples included, so optimiser and sampler
states round-trip exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
MODEL_TENSORS = "model.safetensors"
FORMAT_VERSION = 1   # the JSON skeleton + safetensors encoding of one state file (flatten/unflatten)
LAYOUT = 2           # what the files hold: 2 = entries (2026-12-06); 1 = the fields before it


def _rank_stem(rank: int) -> str:
    return f"rank-{rank}"


# --------------------------------------------------------------------------------------------
# pure: nested state <-> (JSON skeleton, flat tensors)
# --------------------------------------------------------------------------------------------

def flatten(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split ``obj`` into a JSON-able skeleton and {key: tensor}.

    Dict keys become strings in JSON, so int keys (as in ``optimizer.state_dict()["state"]``) are
    recorded and restored. Floats that JSON cannot hold (inf, nan) are stored as 0-d tensors.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[path] = x.detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(x, np.ndarray):
            tensors[path] = torch.from_numpy(np.ascontiguousarray(x))
            return {"__ndarray__": path}
        if isinstance(x, np.generic):
            return walk(x.item(), path)
        if isinstance(x, dict):
            keys = list(x.keys())
            if all(isinstance(k, str) for k in keys):
                return {"__dict__": {k: walk(v, f"{path}.{k}") for k, v in x.items()}}
            if all(isinstance(k, int) and not isinstance(k, bool) for k in keys):
                return {"__intdict__": [[k, walk(v, f"{path}.{k}")] for k, v in x.items()]}
            raise TypeError(f"cannot checkpoint a dict with keys of mixed/unsupported types at {path!r}")
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(x)]
        if isinstance(x, float) and not np.isfinite(x):
            tensors[path] = torch.tensor(x, dtype=torch.float64)
            return {"__float__": path}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot checkpoint a value of type {type(x).__name__} at {path!r}")

    return walk(obj, prefix or "state"), tensors


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten`."""
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__ndarray__" in skeleton:
            return tensors[skeleton["__ndarray__"]].numpy().copy()
        if "__float__" in skeleton:
            return float(tensors[skeleton["__float__"]].item())
        if "__tuple__" in skeleton:
            return tuple(unflatten(v, tensors) for v in skeleton["__tuple__"])
        if "__intdict__" in skeleton:
            return {int(k): unflatten(v, tensors) for k, v in skeleton["__intdict__"]}
        if "__dict__" in skeleton:
            return {k: unflatten(v, tensors) for k, v in skeleton["__dict__"].items()}
        raise ValueError(f"unknown checkpoint node {sorted(skeleton)}")
    return skeleton


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------

def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def save_state(directory: str | Path, state: dict[str, Any], name: str = "state") -> None:
    """Write ``state`` (nested) as ``<name>.json`` + ``<name>.safetensors`` in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    skeleton, tensors = flatten(state)
    save_file(tensors, str(directory / f"{name}.safetensors"))
    _write_json(directory / f"{name}.json", {"format": FORMAT_VERSION, "state": skeleton})


def load_state(directory: str | Path, name: str = "state") -> dict[str, Any]:
    directory = Path(directory)
    doc = json.loads((directory / f"{name}.json").read_text())
    if doc.get("format") != FORMAT_VERSION:
        raise ValueError(f"{directory / (name + '.json')}: unsupported checkpoint format {doc.get('format')!r}")
    tensors = load_file(str(directory / f"{name}.safetensors"))
    return unflatten(doc["state"], tensors)


def write_model(directory: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """``model.safetensors`` from a full (unsharded) state dict: tensors shared under two names (tied embeddings
    and LM head) are stored once, since safetensors refuses shared memory; loading ties them again."""
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in tensors.items():
        ptr = v.data_ptr()
        if ptr in seen and v.numel() > 0:
            continue
        seen.add(ptr)
        state[k] = v.detach().cpu().contiguous()
    save_file(state, str(Path(directory) / MODEL_TENSORS))


def save_model(directory: str | Path, model: torch.nn.Module) -> None:
    """The (unsharded) student's parameters and buffers in ``model.safetensors``."""
    write_model(directory, model.state_dict())


def load_model(directory: str | Path, model: torch.nn.Module) -> None:
    """``model.safetensors`` into an unsharded ``model`` (tied tensors tied again; anything else missing raises)."""
    state = load_file(str(Path(directory) / MODEL_TENSORS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"checkpoint has tensors the model lacks: {unexpected[:5]}")
    if missing and hasattr(model, "tie_weights"):
        model.tie_weights()
    # anything still missing that is not tied to a loaded tensor is an error
    loaded = {p.data_ptr() for k, p in model.state_dict().items() if k in state}
    really_missing = [k for k in missing if model.state_dict()[k].data_ptr() not in loaded]
    if really_missing:
        raise ValueError(f"checkpoint lacks tensors of the model: {really_missing[:5]}")


def save_checkpoint(directory: str | Path, *, rank: int, step: int, world_size: int = 1, strategy: str = "ddp",
                    model: dict[str, torch.Tensor] | None = None, optimizer: dict[str, Any] | None = None,
                    scheduler: dict[str, Any] | None = None, entries: dict[str, Any] | None = None,
                    rank_entries: dict[str, Any] | None = None) -> None:
    """Write this worker's part of the checkpoint after ``step`` optimiser steps (the module docstring's files).

    Rank 0 writes the shared part: ``model`` (the full state dict), ``optimizer`` (its full state, keyed by
    parameter name), the LR ``scheduler``'s state, the torch RNG and the shared ``entries`` (plain values:
    the trainer's state, the mixture). Every rank writes its ``rank_entries`` (its sampler) to ``rank-<r>``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        write_model(directory, model or {})
        save_state(directory, {"layout": LAYOUT, "step": int(step), "world_size": int(world_size),
                               "strategy": strategy, "optimizer": optimizer, "scheduler": scheduler,
                               "torch_rng": torch.get_rng_state(), "entries": entries or {}})
    save_state(directory, {"step": int(step), "entries": rank_entries or {}}, name=_rank_stem(rank))


def load_checkpoint(directory: str | Path, *, rank: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(shared state, this rank's state or None when the checkpoint has no file for this rank), as
    :func:`save_checkpoint` wrote them; a checkpoint of the layout before 2026-12-06 (DDP) is read into the
    same shape (:func:`upgrade`)."""
    directory = Path(directory)
    shared = load_state(directory)
    own = load_state(directory, _rank_stem(rank)) if (directory / f"{_rank_stem(rank)}.json").exists() else None
    return upgrade(shared, own, directory)


def _old_shards(where: str | Path):
    from ddk.errors import UsageError

    return UsageError(f"{where}: a train.strategy=fsdp checkpoint of the per-rank shard format (before 2026-12-06) "
                      "cannot be resumed by this version: finish that run with the ddk that wrote it, or start it "
                      "afresh in a new output_dir")


def check_resumable(storage: str | Path) -> None:
    """The driver's check before Ray starts: the newest checkpoint under ``storage`` (the run's folder in Ray
    Train's storage) is one this version resumes; an old sharded one is a UsageError naming it (exit 2). Reads
    the ``state.json`` files only."""
    root = Path(storage)
    if not root.is_dir():
        return
    for d in sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")),
                    key=lambda p: p.name, reverse=True):
        try:
            top = json.loads((d / f"{STATE_JSON}").read_text())["state"]["__dict__"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not (yet) readable: the workers' discovery skips it too
        if int(top.get("layout") or 1) < LAYOUT and top.get("strategy") == "fsdp":
            raise _old_shards(d)
        return


def upgrade(shared: dict[str, Any], own: dict[str, Any] | None,
            where: str | Path = "checkpoint") -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A layout-1 checkpoint's (shared, own) in layout 2's shape; layout 2 as it is.

    Layout 1 kept the mixture (``weights``, ``version``, ``extra.pending``) and the trainer's state
    (``extra.teacher_loss``, ``tokens``, ``scaler``) in the shared state and the sampler in ``rank-<r>``; they
    become the ``trainer`` and ``mixture`` entries and the ``sampler`` rank entry. Its optimiser state stays
    keyed by index (the loader maps it). A layout-1 ``train.strategy: fsdp`` checkpoint (per-rank shards)
    cannot be read: UsageError (exit 2) naming the folder."""
    if int(shared.get("layout", 1)) >= LAYOUT:
        return shared, own
    if shared.get("strategy") == "fsdp":
        raise _old_shards(where)
    extra = shared.get("extra") or {}
    pending = extra.get("pending")
    unposted = pending if isinstance(pending, list) else [pending] if pending else []
    trainer = {"step": int(shared["step"]), "teacher_loss": extra.get("teacher_loss"),
               **{k: extra[k] for k in ("tokens", "scaler") if extra.get(k)}}
    mixture = {"weights": shared["weights"], "version": int(shared["version"]), "unposted": unposted}
    new = {"layout": 1, "step": int(shared["step"]), "world_size": int(shared.get("world_size", 1)),
           "strategy": "ddp", "optimizer": shared.get("optimizer"), "scheduler": shared.get("scheduler"),
           "torch_rng": shared.get("torch_rng"), "entries": {"trainer": trainer, "mixture": mixture}}
    if own is not None:
        own = {"step": own.get("step"),
               "entries": {"sampler": own["sampler"]} if own.get("sampler") is not None else {}}
    return new, own


# --------------------------------------------------------------------------------------------
# discovery: the newest complete checkpoint in a storage folder
# --------------------------------------------------------------------------------------------

def checkpoint_name(step: int) -> str:
    return f"step-{int(step):08d}"


def _loads(directory: Path, name: str) -> dict[str, Any] | None:
    """``<name>.json`` + ``<name>.safetensors`` fully readable (a half-copied file fails here)."""
    try:
        return load_state(directory, name)
    except Exception:  # OSError, JSON and safetensors errors alike: not (yet) a usable file
        return None


def complete_step(directory: str | Path) -> int | None:
    """The step of the checkpoint in ``directory`` when every part of it is there and readable, else None.

    Complete means: the shared state, the model and the state of every rank that wrote it (``world_size``
    in the shared state) all load. A folder half-copied or half-deleted when a process died is not complete.
    """
    directory = Path(directory)
    shared = _loads(directory, "state")
    if shared is None or "step" not in shared:
        return None
    if int(shared.get("layout", 1)) < LAYOUT and shared.get("strategy") == "fsdp":
        pass  # the old per-rank shard format: found, so that resuming it says why it cannot (upgrade)
    else:
        try:
            load_file(str(directory / MODEL_TENSORS))
        except Exception:
            return None
    for r in range(int(shared.get("world_size", 1))):
        own = _loads(directory, _rank_stem(r))
        if own is None or own.get("step") != shared["step"]:
            return None
    return int(shared["step"])


def latest_complete(root: str | Path) -> tuple[int, Path] | None:
    """(step, folder) of the newest complete ``step-*`` checkpoint under ``root``, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    for d in sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")),
                    key=lambda p: p.name, reverse=True):
        step = complete_step(d)
        if step is not None:
            return step, d
    return None


def resume_point(registered: str | Path | None, storage: str | Path | None) -> tuple[int, Path, bool] | None:
    """Where to resume: (step, folder, registered?) or None for a fresh start.

    ``registered`` is the checkpoint Ray Train hands back (its latest registered one), ``storage`` the
    run's folder in Ray Train's storage. Ray registers a report only when its controller next polls the
    workers, so a crash right after a report can leave a complete, newer checkpoint in storage that Ray
    does not know about; the newer of the two wins (an incomplete registered one never does, and when
    it is the only one there is, this raises ValueError rather than start the run over).
    """
    reg_step = complete_step(registered) if registered is not None else None
    found = latest_complete(storage) if storage is not None else None
    if found is not None and (reg_step is None or found[0] > reg_step):
        return found[0], found[1], False
    if reg_step is not None:
        return reg_step, Path(registered), True
    if registered is not None:  # starting over would silently discard the run: refuse
        raise ValueError(f"the latest checkpoint {registered} is incomplete and no other complete one was found")
    return None
