"""``train.strategy: fsdp``: the student sharded with PyTorch FSDP2 across the workers, its sharded checkpoints
and the gathered Hugging Face export.

:func:`shard_model` applies ``fully_shard`` to every decoder layer, then to the root (which takes the rest:
embeddings, final norm and the LM head; tied embedding/head weights stay one parameter, sharded once). Each
parameter becomes a DTensor sharded on dim 0 over a 1-d device mesh of all ranks. Mixed precision is FSDP2's
``MixedPrecisionPolicy``: parameters are all-gathered and computed in ``train.precision``'s dtype
(bf16/fp16; ``auto``: bf16 on CUDA, float32 on CPU), gradients reduced in float32, the sharded master
parameters and the AdamW moments stay float32. FSDP2 runs on CPU with gloo too (tests/unit/test_fsdp.py).
The optimiser must be built after sharding (its parameters are the DTensors).

A sharded checkpoint (one folder per saved step, as checkpoint.py's; every rank writes its own files, no
pickle anywhere):

    state.json / state.safetensors        rank 0: step, world_size, "strategy": "fsdp", mixture weights and
                                          version, LR schedule, torch RNG, extra (no model, no optimiser)
    rank-<r>.json / .safetensors          rank r: its sampler (as for DDP)
    model-rank<r>.safetensors             rank r's local shard of every model tensor (DTensor.to_local()),
                                          keyed by the state-dict name; tied names stored once
    model-rank<r>.json                    its manifest: format, rank, world_size, per name the global shape,
                                          the local shape, the placements ("S0" = Shard(0), "R" = Replicate)
                                          and dtype; ``tied``: {name: the name stored for it}
    optim-rank<r>.json / .safetensors     rank r's AdamW state (checkpoint.save_state); each sharded moment is
                                          {"__dtensor__": {"local", "shape", "stride", "placements"}}

It resumes on the same world size only (each rank reads back its own shards, copied into the sharded
parameters' local tensors; the moments are rebuilt with ``DTensor.from_local``). :func:`gather_full_state`
(every rank takes part) and :func:`save_pretrained_full` (rank 0) write the export: one Hugging Face folder,
as an unsharded run writes it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ddk.errors import UsageError
from ddk.trainer import checkpoint as ckpt
from safetensors.torch import load_file, save_file

STRATEGY = "fsdp"
SHARD_FORMAT = 1

__all__ = ["decoder_layers", "gather_full_state", "load_training_sharded", "mixed_precision", "param_dtype",
           "prepare_student_step", "save_and_report_sharded", "save_pretrained_full", "save_training_sharded",
           "shard_model", "shards_complete", "unsharded_class"]


def _model_stem(rank: int) -> str:
    return f"model-rank{rank}"


def _optim_stem(rank: int) -> str:
    return f"optim-rank{rank}"


# --------------------------------------------------------------------------------------------
# sharding
# --------------------------------------------------------------------------------------------

def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers, each one FSDP unit: ``model.model.layers`` for Hugging Face decoder-only
    models, else every outermost module whose class name ends in ``DecoderLayer``."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
        return list(layers)
    found: list[torch.nn.Module] = []
    for m in model.modules():
        if type(m).__name__.endswith("DecoderLayer") and not any(_contains(f, m) for f in found):
            found.append(m)
    return found


def _contains(outer: torch.nn.Module, inner: torch.nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def param_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """The dtype FSDP gathers and computes the parameters in, from ``train.precision``."""
    device = torch.device(device)
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def mixed_precision(precision: str, device: torch.device | str):
    """FSDP2's policy: parameters in :func:`param_dtype`, gradients reduced in float32 (fp32: no casts)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = param_dtype(precision, device)
    if dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def shard_model(model: torch.nn.Module, precision: str = "fp32", device: torch.device | str = "cpu"):
    """``model`` on ``device``, sharded in place with FSDP2 across the default process group (returned).

    ``fully_shard`` on each of :func:`decoder_layers`, then on the root. Needs an initialised
    torch.distributed process group (Ray Train's workers have one, gloo on CPU, NCCL on GPU); one rank works.
    Raises :class:`~ddk.errors.UsageError` naming ``train.strategy`` when FSDP2 cannot run here.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise UsageError("train.strategy: fsdp needs a torch.distributed process group (the Ray Train workers "
                         "set one up); this context has none: use train.strategy=ddp")
    device = torch.device(device)
    layers = decoder_layers(model)
    if not layers:
        raise UsageError(f"train.strategy: fsdp found no decoder layers in {type(model).__name__} "
                         "(neither model.model.layers nor modules named *DecoderLayer)")
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        policy = mixed_precision(precision, device)
        model.to(device)
        for layer in layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
    except UsageError:
        raise
    except Exception as e:  # e.g. a backend without the collectives FSDP2 needs
        raise UsageError(f"train.strategy: fsdp cannot shard the student on {device} with the "
                         f"{dist.get_backend()} backend: {type(e).__name__}: {e}") from e
    return model


def prepare_student_step(step_module: torch.nn.Module, precision: str, device: torch.device | str,
                         rank: int = 0) -> torch.nn.Module:
    """The Trainer's ``train.strategy: fsdp`` placement of :class:`~ddk.trainer.scale.StudentStep`: its student
    sharded (:func:`shard_model`: each decoder layer, then the student, which holds embeddings, final norm and
    LM head). StudentStep itself holds no parameters and is not wrapped: evaluation calls the student directly,
    and the student's own forward is what gathers its top-level parameters.

    The hidden-state (chunked) loss path runs through the student's own forward
    (:func:`ddk.trainer.scale.last_hidden_states`), so the root's gathered LM head is what it projects with.
    """
    shard_model(step_module.student, precision, device)
    return step_module


def save_and_report_sharded(ctx, state, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                            loss: float) -> None:
    """loop.save_and_report for ``train.strategy: fsdp``: every rank writes its shards to a temporary folder
    (:func:`save_training_sharded`) and hands it to ``ctx.report`` (Ray Train merges the ranks' folders)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ddk-ckpt-") as tmp:
        save_training_sharded(tmp, state.state_dict(), rank=ctx.rank, world_size=ctx.world_size, model=model,
                              optimizer=optimizer, scheduler=scheduler)
        ctx.report({"step": state.step, "loss": loss, "version": state.version}, Path(tmp),
                   ckpt.checkpoint_name(state.step))


def _mesh(model: torch.nn.Module):
    from torch.distributed.tensor import DTensor

    for p in model.parameters():
        if isinstance(p, DTensor):
            return p.device_mesh
    raise ValueError("the model has no sharded (DTensor) parameters: shard_model it first")


# --------------------------------------------------------------------------------------------
# DTensor <-> (local tensor, JSON description)
# --------------------------------------------------------------------------------------------

def _placement_names(placements) -> list[str]:
    from torch.distributed.tensor import Replicate, Shard

    out = []
    for p in placements:
        if isinstance(p, Shard):
            out.append(f"S{p.dim}")
        elif isinstance(p, Replicate):
            out.append("R")
        else:
            raise TypeError(f"cannot checkpoint a DTensor placed as {p!r}")
    return out


def _placements(names: list[str]):
    from torch.distributed.tensor import Replicate, Shard

    return tuple(Replicate() if n == "R" else Shard(int(n[1:])) for n in names)


def _local(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """(this rank's part of ``x``, its description: global shape and placements; plain tensors: "R")."""
    from torch.distributed.tensor import DTensor

    if isinstance(x, DTensor):
        local = x.to_local()
        return local, {"shape": list(x.shape), "local_shape": list(local.shape),
                       "placements": _placement_names(x.placements), "dtype": str(local.dtype)}
    return x, {"shape": list(x.shape), "local_shape": list(x.shape), "placements": None, "dtype": str(x.dtype)}


def _mark_dtensors(obj: Any) -> Any:
    """``obj`` (a nested optimiser state) with every DTensor as a ``{"__dtensor__": {...}}`` node that
    checkpoint.flatten can store: its local shard plus global shape, stride and placements."""
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        return {"__dtensor__": {"local": obj.to_local().detach(), "shape": list(obj.shape),
                                "stride": list(obj.stride()), "placements": _placement_names(obj.placements)}}
    if isinstance(obj, dict):
        return {k: _mark_dtensors(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_mark_dtensors(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_mark_dtensors(v) for v in obj)
    return obj


def _unmark_dtensors(obj: Any, mesh, device: torch.device) -> Any:
    from torch.distributed.tensor import DTensor

    if isinstance(obj, dict):
        if set(obj) == {"__dtensor__"}:
            d = obj["__dtensor__"]
            return DTensor.from_local(d["local"].to(device), mesh, _placements(d["placements"]), run_check=False,
                                      shape=torch.Size(d["shape"]), stride=tuple(d["stride"]))
        return {k: _unmark_dtensors(v, mesh, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unmark_dtensors(v, mesh, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_unmark_dtensors(v, mesh, device) for v in obj)
    return obj


# --------------------------------------------------------------------------------------------
# sharded checkpoints
# --------------------------------------------------------------------------------------------

def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def save_model_shard(directory: str | Path, model: torch.nn.Module, *, rank: int, world_size: int) -> None:
    """``model-rank<r>.safetensors`` (this rank's local shards) and its ``model-rank<r>.json`` manifest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, dict] = {}
    tied: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) in first:  # the same parameter under a second name (tied embeddings and LM head)
            tied[name] = first[id(value)]
            continue
        first[id(value)] = name
        local, meta[name] = _local(value)
        tensors[name] = local.detach().cpu().contiguous()
    save_file(tensors, str(directory / f"{_model_stem(rank)}.safetensors"))
    _write_json(directory / f"{_model_stem(rank)}.json", {"format": SHARD_FORMAT, "rank": int(rank),
                                                          "world_size": int(world_size), "tensors": meta,
                                                          "tied": tied})


def read_manifest(directory: str | Path, rank: int) -> dict[str, Any]:
    path = Path(directory) / f"{_model_stem(rank)}.json"
    doc = json.loads(path.read_text())
    if doc.get("format") != SHARD_FORMAT:
        raise ValueError(f"{path}: unsupported shard format {doc.get('format')!r}")
    return doc


def _same_world(doc: dict, world_size: int, where: Path) -> None:
    if int(doc["world_size"]) != int(world_size):
        raise ValueError(f"{where}: a train.strategy=fsdp checkpoint of {doc['world_size']} ranks resumes on the "
                         f"same world size only (this run has {world_size}); use ray.num_workers="
                         f"{doc['world_size']}")


def load_model_shard(directory: str | Path, model: torch.nn.Module, *, rank: int, world_size: int) -> None:
    """Copy this rank's saved shards into the sharded model's local tensors (same world size and shapes)."""
    directory = Path(directory)
    doc = read_manifest(directory, rank)
    _same_world(doc, world_size, directory)
    tensors = load_file(str(directory / f"{_model_stem(rank)}.safetensors"))
    state = model.state_dict(keep_vars=True)
    stored, tied = doc["tensors"], doc.get("tied", {})
    unexpected = sorted(set(stored) - set(state))
    missing = sorted(k for k in state if k not in stored and k not in tied)
    if unexpected or missing:
        raise ValueError(f"{directory}: shard of rank {rank} does not fit the model "
                         f"(unexpected {unexpected[:5]}, missing {missing[:5]})")
    with torch.no_grad():
        for name, value in state.items():
            if name in tied:
                if state[tied[name]] is not value:
                    raise ValueError(f"{directory}: {name} was tied to {tied[name]} when saved but is not now")
                continue
            target, want = _local(value)
            got = stored[name]
            if got["shape"] != want["shape"] or got["local_shape"] != want["local_shape"] \
                    or got["placements"] != want["placements"]:
                raise ValueError(f"{directory}: {name} saved as {got} but the model has {want}")
            target.copy_(tensors[name])


_OWN_KEYS = ("step", "weights", "version", "sampler")  # TrainState keys stored outside ``extra``


def _shared_state(state: dict[str, Any], world_size: int, scheduler: Any | None) -> dict[str, Any]:
    """Rank 0's ``state`` file: what checkpoint.save_checkpoint writes, without model and optimiser."""
    return {"step": int(state["step"]), "world_size": int(world_size), "strategy": STRATEGY,
            "weights": {k: float(v) for k, v in state["weights"].items()}, "version": int(state["version"]),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "torch_rng": torch.get_rng_state(),
            # the rest of TrainState's dict as it is (teacher_loss, pending, tokens, scaler, ...)
            "extra": {k: v for k, v in state.items() if k not in _OWN_KEYS}}


def save_training_sharded(directory: str | Path, state: dict[str, Any], *, rank: int, world_size: int,
                          model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any | None) -> None:
    """This rank's part of a sharded checkpoint of ``state`` (``TrainState.state_dict()``): every rank its model
    and optimiser shards and its sampler; rank 0 the shared state (the module docstring has the files)."""
    directory = Path(directory)
    save_model_shard(directory, model, rank=rank, world_size=world_size)
    ckpt.save_state(directory, {"step": int(state["step"]), "world_size": int(world_size),
                                "optimizer": _mark_dtensors(optimizer.state_dict())}, name=_optim_stem(rank))
    ckpt.save_state(directory, {"step": int(state["step"]), "sampler": state.get("sampler")},
                    name=f"rank-{rank}")
    if rank == 0:
        ckpt.save_state(directory, _shared_state(state, world_size, scheduler))


def load_training_sharded(directory: str | Path, *, rank: int, world_size: int, model: torch.nn.Module,
                          optimizer: torch.optim.Optimizer, scheduler: Any | None) -> dict[str, Any]:
    """Inverse of :func:`save_training_sharded` on the same world size (checkpoint.load_training's result)."""
    directory = Path(directory)
    shared, own = ckpt.load_checkpoint(directory, rank=rank)
    if shared.get("strategy") != STRATEGY:
        raise ValueError(f"{directory} was written with train.strategy=ddp (one full model); "
                         "resume it with train.strategy=ddp")
    _same_world({"world_size": shared["world_size"]}, world_size, directory)
    load_model_shard(directory, model, rank=rank, world_size=world_size)
    saved = ckpt.load_state(directory, _optim_stem(rank))
    device = next(iter(model.parameters())).device
    optimizer.load_state_dict(_unmark_dtensors(saved["optimizer"], _mesh(model), device))
    if scheduler is not None and shared.get("scheduler") is not None:
        scheduler.load_state_dict(shared["scheduler"])
    torch.set_rng_state(shared["torch_rng"])
    extra = shared.get("extra") or {}
    return {"teacher_loss": None, "pending": None, **extra, "step": int(shared["step"]),
            "weights": {k: float(v) for k, v in shared["weights"].items()}, "version": int(shared["version"]),
            "sampler": own.get("sampler") if own is not None else None}


def shards_complete(directory: str | Path, shared: dict[str, Any]) -> bool:
    """Every rank's model and optimiser shard of a sharded checkpoint present and readable
    (checkpoint.complete_step checks the shared and per-rank state files)."""
    directory = Path(directory)
    try:
        for r in range(int(shared.get("world_size", 1))):
            doc = read_manifest(directory, r)
            if int(doc["world_size"]) != int(shared["world_size"]):
                return False
            load_file(str(directory / f"{_model_stem(r)}.safetensors"))
            optim = ckpt.load_state(directory, _optim_stem(r))
            if optim.get("step") != shared["step"]:
                return False
    except Exception:  # noqa: BLE001 - a file missing or half-copied: not (yet) a usable checkpoint
        return False
    return True


# --------------------------------------------------------------------------------------------
# export: one Hugging Face folder
# --------------------------------------------------------------------------------------------

def gather_full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on rank 0's CPU; {} on the other ranks. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded_class(model: torch.nn.Module) -> type:
    """The model's own class (fully_shard swaps it for a subclass named ``FSDP<class>``)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def save_pretrained_full(model: torch.nn.Module, full_state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Rank 0: ``full_state`` (:func:`gather_full_state`) saved as a Hugging Face folder (safetensors + config),
    through a fresh unsharded instance of the model's class built on the meta device (no second copy)."""
    cls = unsharded_class(model)
    with torch.device("meta"):
        fresh = cls(model.config)
    missing, unexpected = fresh.load_state_dict(full_state, strict=False, assign=True)
    if unexpected:
        raise ValueError(f"gathered state has tensors the model lacks: {unexpected[:5]}")
    if missing and hasattr(fresh, "tie_weights"):
        fresh.tie_weights()
    still = [k for k, v in fresh.state_dict().items() if v.is_meta]
    if still:
        raise ValueError(f"gathered state lacks tensors of the model: {still[:5]}")
    if getattr(model, "generation_config", None) is not None:
        fresh.generation_config = model.generation_config
    fresh.save_pretrained(path, safe_serialization=True)
