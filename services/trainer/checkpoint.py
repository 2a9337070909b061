"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint directory (one per saved step, written by every Ray worker into the same folder, which
Ray Train merges in storage) holds:

    model.safetensors        the student's weights (rank 0)
    state.safetensors        every tensor of the training state: AdamW moments, RNG state (rank 0)
    state.json               step, weights + version, LR schedule, optimiser hyper-parameters (rank 0);
                             tensors appear there as {"__tensor__": key} pointers into state.safetensors
    rank-<r>.json            worker r's own state (its sampler), with rank-<r>.safetensors for its tensors

With ``train.strategy: fsdp`` every rank writes its own shard of the model and optimiser instead
(``model-rank<r>``, ``optim-rank<r>``; ``"strategy": "fsdp"`` in state.json): see ddk.trainer.parallel.

:func:`save_training` / :func:`load_training` write and read a trainer's whole state (state.py's
``TrainState`` plus model, optimiser, schedule and RNG) in that layout.

`torch.save` would pickle, and a pickle in a checkpoint is code that runs on load. Instead
:func:`flatten` walks a nested state (dicts, lists, tuples, scalars, tensors, numpy arrays) and
splits it into a JSON-able skeleton plus a flat {key: tensor} map that safetensors can store;
:func:`unflatten` puts it back together, numpy arrays and tuples included, so optimiser and sampler
states round-trip exactly (``optimizer.load_state_dict`` accepts the result as is).
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
FORMAT_VERSION = 1


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


def save_model(directory: str | Path, model: torch.nn.Module) -> None:
    """The student's parameters and buffers (tied weights stored once: safetensors refuses shared memory)."""
    state = {}
    seen: dict[int, str] = {}
    for k, v in model.state_dict().items():
        ptr = v.data_ptr()
        if ptr in seen and v.numel() > 0:
            continue  # tied to an earlier tensor; load_state_dict(strict=False) + tie_weights restores it
        seen[ptr] = k
        state[k] = v.detach().cpu().contiguous()
    save_file(state, str(Path(directory) / MODEL_TENSORS))


def load_model(directory: str | Path, model: torch.nn.Module) -> None:
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


def save_checkpoint(directory: str | Path, *, rank: int, step: int, model: torch.nn.Module | None,
                    optimizer: torch.optim.Optimizer | None, scheduler: Any | None,
                    weights: dict[str, float], version: int, rank_state: dict[str, Any],
                    extra: dict[str, Any] | None = None, world_size: int = 1) -> None:
    """Write this worker's part of the checkpoint after ``step`` optimiser steps.

    Rank 0 writes the shared part (model, optimiser, schedule, step, mixture); every rank writes
    its own ``rank-<r>`` files (its sampler state), so a resumed worker continues its own stream.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        assert model is not None and optimizer is not None
        save_model(directory, model)
        save_state(directory, {
            "step": int(step),
            "world_size": int(world_size),
            "weights": {k: float(v) for k, v in weights.items()},
            "version": int(version),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "torch_rng": torch.get_rng_state(),
            "extra": extra or {},
        })
    save_state(directory, {"step": int(step), **rank_state}, name=_rank_stem(rank))


def load_checkpoint(directory: str | Path, *, rank: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(shared state, this rank's state or None when the checkpoint has no file for this rank)."""
    directory = Path(directory)
    shared = load_state(directory)
    own = load_state(directory, _rank_stem(rank)) if (directory / f"{_rank_stem(rank)}.json").exists() else None
    return shared, own


def save_training(directory: str | Path, state: dict[str, Any], *, rank: int, world_size: int,
                  model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None,
                  scheduler: Any | None) -> None:
    """This rank's part of the checkpoint of a trainer's state (``TrainState.state_dict()``, see state.py).

    The files are those of :func:`save_checkpoint`: step, weights and version in the shared state, teacher
    losses and the pending evaluation under its ``extra``, the sampler in ``rank-<r>``.
    """
    save_checkpoint(directory, rank=rank, step=state["step"], model=model, optimizer=optimizer,
                    scheduler=scheduler, weights=state["weights"], version=state["version"],
                    rank_state={"sampler": state.get("sampler")},
                    extra={"teacher_loss": state.get("teacher_loss"), "pending": state.get("pending"),
                           **({"tokens": state["tokens"]} if state.get("tokens") else {}),
                           **({"scaler": state["scaler"]} if state.get("scaler") else {})},
                    world_size=world_size)


def load_training(directory: str | Path, *, rank: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  scheduler: Any | None) -> dict[str, Any]:
    """Inverse of :func:`save_training`: loads the model, optimiser, LR schedule and torch RNG in place and
    returns the trainer's state as ``TrainState.load_state_dict`` takes it (``sampler`` None when the
    checkpoint has no state for this rank, e.g. the world size changed)."""
    shared, own = load_checkpoint(directory, rank=rank)
    if shared.get("strategy") == "fsdp":  # sharded: ddk.trainer.parallel.load_training_sharded reads it
        raise ValueError(f"{directory} is a sharded checkpoint of train.strategy=fsdp on {shared.get('world_size')} "
                         "ranks: resume it with train.strategy=fsdp on as many workers")
    load_model(directory, model)
    optimizer.load_state_dict(shared["optimizer"])
    if scheduler is not None and shared.get("scheduler") is not None:
        scheduler.load_state_dict(shared["scheduler"])
    torch.set_rng_state(shared["torch_rng"])
    extra = shared.get("extra") or {}
    return {"step": int(shared["step"]), "weights": {k: float(v) for k, v in shared["weights"].items()},
            "version": int(shared["version"]), "teacher_loss": extra.get("teacher_loss"),
            "pending": extra.get("pending"), "sampler": own.get("sampler") if own is not None else None,
            **({"tokens": extra["tokens"]} if extra.get("tokens") else {}),
            **({"scaler": extra["scaler"]} if extra.get("scaler") else {})}


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
    if shared.get("strategy") == "fsdp":  # every rank's model and optimiser shard (ddk.trainer.parallel)
        from ddk.trainer.parallel import shards_complete

        if not shards_complete(directory, shared):
            return None
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
