"""How the student is spread over the workers (``train.strategy``: ddp or fsdp) and its one distributed-state
path, :class:`Distributed`.

:func:`shard_model` applies ``fully_shard`` to every decoder layer, then to the root (which takes the rest:
embeddings, final norm and the LM head; tied embedding/head weights stay one parameter, sharded once). Each
parameter becomes a DTensor sharded on dim 0 over a 1-d device mesh of all ranks. Mixed precision is FSDP2's
``MixedPrecisionPolicy``: parameters are all-gathered and computed in ``train.precision``'s dtype
(bf16/fp16; ``auto``: bf16 on CUDA, float32 on CPU), gradients reduced in float32, the sharded master
parameters and the AdamW moments stay float32. FSDP2 runs on CPU with gloo too (tests/unit/test_fsdp.py).
The optimiser must be built after sharding (its parameters are the DTensors).

Checkpoints and export go through one object for both strategies, :class:`Distributed` (place the student,
save, load, export, with stateful entries registered): the files are checkpoint.py's, rank 0 writing the full
student and optimiser (gathered tensor by tensor under FSDP), so a checkpoint resumes on any number of workers
(each rank slices its part on load). :func:`gather_full_state` (every rank takes part) and
:func:`save_pretrained_full` (rank 0) write the FSDP export: one Hugging Face folder, as an unsharded run writes it.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from ddk.errors import UsageError
from ddk.trainer import checkpoint as ckpt
from safetensors.torch import load_file

STRATEGIES = ("ddp", "fsdp")

log = logging.getLogger("ddk.trainer")

__all__ = ["Distributed", "Stateful", "STRATEGIES", "decoder_layers", "gather_full_state", "mixed_precision",
           "param_dtype", "prepare_student_step", "save_pretrained_full", "shard_model", "unsharded_class"]


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


# --------------------------------------------------------------------------------------------
# the one distributed-state path
# --------------------------------------------------------------------------------------------

class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


class Distributed:
    """DDP and FSDP2 behind one object: place the student, save, load and export it with its optimiser, LR
    schedule and the registered stateful entries (torchtitan's checkpoint manager is the model).

    ``strategy``: ``train.strategy`` (``ddp``: the context places the student, DDP under Ray Train with more than
    one worker; ``fsdp``: :func:`shard_model`). ``ctx``: the loop's context (``rank``, ``world_size``,
    ``prepare_model``, ``report``). After :meth:`place`, :meth:`attach` the (placed) student, its optimiser and
    schedule and :meth:`register` the entries: shared ones (the Trainer's state, the mixture) are written by rank
    0 and read by every rank; ``per_rank`` ones (the sampler) by each rank for itself.

    The files are checkpoint.py's, the same for both strategies: rank 0 writes the full student and the full
    optimiser state keyed by parameter name (an FSDP run gathers them tensor by tensor, every rank taking part),
    and on load every rank reads them and keeps its own part (``distribute_tensor`` with local slicing), so a
    checkpoint resumes on any number of workers, and under either strategy.
    """

    def __init__(self, strategy: str, ctx, device: torch.device | str = "cpu", precision: str = "fp32") -> None:
        if strategy not in STRATEGIES:
            raise UsageError(f"train.strategy: {strategy!r} is not one of {', '.join(STRATEGIES)}")
        self.strategy, self.ctx = strategy, ctx
        self.rank, self.world = int(ctx.rank), int(ctx.world_size)
        self.device, self.precision = torch.device(device), precision
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any | None = None
        self.shared: dict[str, Stateful] = {}
        self.per_rank: dict[str, Stateful] = {}
        self._export_state: dict[str, torch.Tensor] | None = None

    # -- placing -------------------------------------------------------------------------------------
    def place(self, step_module: torch.nn.Module) -> torch.nn.Module:
        """The student with its loss (:class:`~ddk.trainer.scale.StudentStep`) placed on the workers; build the
        optimiser after this (under FSDP its parameters are the sharded DTensors)."""
        if self.strategy == "fsdp":
            return prepare_student_step(step_module, self.precision, self.device, self.rank)
        return self.ctx.prepare_model(step_module)

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any | None = None) -> None:
        """The placed student (unwrapped: the Hugging Face model), its optimiser and LR schedule."""
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler

    def register(self, name: str, obj: Stateful, *, per_rank: bool = False) -> None:
        if name in self.shared or name in self.per_rank:
            raise ValueError(f"checkpoint entry {name!r} registered twice")
        (self.per_rank if per_rank else self.shared)[name] = obj

    # -- saving --------------------------------------------------------------------------------------
    def _full(self, t: torch.Tensor) -> torch.Tensor | None:
        """The whole tensor on rank 0's CPU (a DTensor gathered: every rank must call), None elsewhere."""
        if _is_dtensor(t):
            t = t.full_tensor()
        return t.detach().cpu() if self.rank == 0 else None

    def _param_names(self) -> list[str]:
        """The optimiser's parameters' names, in its index order (tied parameters: the first name)."""
        names: dict[int, str] = {}
        for n, p in self.model.named_parameters():
            names.setdefault(id(p), n)
        try:
            return [names[id(p)] for g in self.optimizer.param_groups for p in g["params"]]
        except KeyError:
            raise ValueError("the optimiser holds a parameter that is not the student's") from None

    def model_state(self) -> dict[str, torch.Tensor]:
        """The full student state dict on rank 0 ({} elsewhere); tied names share one tensor."""
        full: dict[str, torch.Tensor] = {}
        done: dict[int, torch.Tensor | None] = {}
        for name, value in self.model.state_dict(keep_vars=True).items():
            if id(value) not in done:
                done[id(value)] = self._full(value)
            if self.rank == 0:
                full[name] = done[id(value)]
        return full

    def optimizer_state(self) -> dict[str, Any] | None:
        """The optimiser's full state on rank 0, keyed by parameter name (None elsewhere)."""
        sd, names = self.optimizer.state_dict(), self._param_names()
        state: dict[str, Any] = {}
        for idx in sorted(sd["state"]):
            entry = {k: self._full(v) if isinstance(v, torch.Tensor) else v for k, v in sd["state"][idx].items()}
            state[names[idx]] = entry
        if self.rank != 0:
            return None
        groups = [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
        return {"state": state, "param_groups": groups}

    def save(self, directory: str | Path, step: int) -> None:
        """This rank's part of the checkpoint after ``step`` steps (every rank calls it: FSDP gathers)."""
        model, optim = self.model_state(), self.optimizer_state()
        rank0 = self.rank == 0
        ckpt.save_checkpoint(
            directory, rank=self.rank, step=step, world_size=self.world, strategy=self.strategy,
            model=model if rank0 else None, optimizer=optim,
            scheduler=self.scheduler.state_dict() if rank0 and self.scheduler is not None else None,
            entries={n: o.state_dict() for n, o in self.shared.items()} if rank0 else None,
            rank_entries={n: o.state_dict() for n, o in self.per_rank.items()})

    def save_and_report(self, step: int, metrics: dict[str, Any]) -> None:
        """:meth:`save` into a temporary folder, handed to ``ctx.report`` (which copies it to the run's storage;
        Ray Train merges the ranks' folders)."""
        with tempfile.TemporaryDirectory(prefix="ddk-ckpt-") as tmp:
            self.save(tmp, step)
            self.ctx.report(metrics, Path(tmp), ckpt.checkpoint_name(step))

    # -- loading -------------------------------------------------------------------------------------
    def _local(self, full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``full`` as ``like`` holds it: a DTensor placed as ``like`` (this rank's slice), else the tensor."""
        if _is_dtensor(like):
            from torch.distributed.tensor import distribute_tensor

            return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
        return full

    def load_model_file(self, directory: str | Path) -> None:
        """``model.safetensors`` into the placed student, each rank its part (tied names filled by identity)."""
        tensors = load_file(str(Path(directory) / ckpt.MODEL_TENSORS))
        state = self.model.state_dict(keep_vars=True)
        aliases: dict[int, list[str]] = {}
        for name, value in state.items():
            aliases.setdefault(id(value), []).append(name)
        unexpected = sorted(set(tensors) - set(state))
        missing = sorted(n for n, v in state.items() if not any(a in tensors for a in aliases[id(v)]))
        if unexpected or missing:
            raise ValueError(f"{directory}: the checkpoint's model does not fit the student "
                             f"(unexpected {unexpected[:5]}, missing {missing[:5]})")
        with torch.no_grad():
            for names in aliases.values():
                value = state[names[0]]
                full = tensors[next(a for a in names if a in tensors)]
                if tuple(full.shape) != tuple(value.shape):
                    raise ValueError(f"{directory}: {names[0]} has shape {list(full.shape)} in the checkpoint, "
                                     f"{list(value.shape)} in the student")
                local = self._local(full, value)
                target = value.to_local() if _is_dtensor(value) else value
                target.copy_(local.to_local() if _is_dtensor(local) else local)

    def load_optimizer_state(self, saved: dict[str, Any]) -> None:
        """The full optimiser state (keyed by name; a layout-1 checkpoint's by index) into the optimiser, each
        rank its part of every moment."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        names = self._param_names()
        by_index = any(isinstance(i, int) for g in saved["param_groups"] for i in g["params"])
        index = {n: i for i, n in enumerate(names)}

        def idx(key) -> int:
            i = key if by_index else index.get(key)
            if i is None or not 0 <= i < len(params):
                raise ValueError(f"the checkpoint's optimiser state has a parameter the student lacks: {key!r}")
            return i

        state = {}
        for key, entry in saved["state"].items():
            p = params[idx(key)]
            state[idx(key)] = {k: self._local(v, p) if isinstance(v, torch.Tensor) and v.dim() > 0 else v
                               for k, v in entry.items()}
        groups = [{**g, "params": [idx(k) for k in g["params"]]} for g in saved["param_groups"]]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})

    def load(self, directory: str | Path) -> dict[str, Any]:
        """The checkpoint in ``directory`` into the student, optimiser, schedule, torch RNG and every registered
        entry (every rank; any world size and strategy). An entry the checkpoint lacks is logged and left as it
        is (a rank beyond the saved world size has no sampler). Returns the shared state as read."""
        shared, own = ckpt.load_checkpoint(directory, rank=self.rank)
        self.load_model_file(directory)
        if shared.get("optimizer") is not None:
            self.load_optimizer_state(shared["optimizer"])
        if self.scheduler is not None and shared.get("scheduler") is not None:
            self.scheduler.load_state_dict(shared["scheduler"])
        if shared.get("torch_rng") is not None:
            torch.set_rng_state(shared["torch_rng"])
        for entries, registered, where in ((shared.get("entries") or {}, self.shared, "the checkpoint"),
                                           ((own or {}).get("entries") or {}, self.per_rank, "this rank")):
            for name, obj in registered.items():
                if entries.get(name) is None:
                    log.warning("rank %d: %s has no %s state (saved on %s workers, now %d); it starts afresh",
                                self.rank, where, name, shared.get("world_size"), self.world)
                    continue
                obj.load_state_dict(entries[name])
        return shared

    # -- export --------------------------------------------------------------------------------------
    def prepare_export(self) -> None:
        """Every rank, before rank 0's :meth:`save_pretrained`: FSDP gathers the full student onto rank 0."""
        if self.strategy == "fsdp":
            self._export_state = gather_full_state(self.model)

    def save_pretrained(self, path: str | Path) -> None:
        """Rank 0: the student as a Hugging Face folder (safetensors + config), as an unsharded run writes it."""
        if self.strategy == "fsdp":
            if self._export_state is None:
                raise RuntimeError("train.strategy=fsdp: prepare_export must run on every rank first")
            save_pretrained_full(self.model, self._export_state, path)
        else:
            self.model.save_pretrained(path, safe_serialization=True)
