"""Student rollouts for on-policy distillation (issue 28): the ``hf`` engine.

The trainer's own student writes completions of a batch of prompts with transformers' ``generate`` (KV cache,
left padding, attention mask), so its weights are always current. Per row it returns the prompt ids, the
completion ids (up to and including the first eos; all ``max_new_tokens`` when the row never emits eos), the
student's log-probability of each sampled token and a rollout id.

Log-probabilities: taken from the generation's own raw logits (``output_logits=True``), i.e. the student at
temperature 1 *before* the temperature / top-p warpers, gathered at the sampled token. No second forward pass is
needed (the logits are computed anyway to sample), and it is the quantity the losses need: the trainer's
``log p_student(x_t)`` at temperature 1, so that the importance weight ``exp(log p_trainer - log p_engine)`` of
:mod:`ddk.trainer.onpolicy_loss` is 1 up to float rounding (the KV-cached incremental forward and the trainer's
full forward sum in different orders) when the engine is current. Sampling at ``temperature != 1`` or
``top_p < 1`` deliberately draws from another distribution; that change is not importance-corrected (as in the
Tinker cookbook and TRL's GKD).

Reproducibility: each call draws with a seed derived from ``(seed, step, rank)`` (:func:`step_seed`, SHA-256, so
it is the same in every process), inside ``torch.random.fork_rng`` so the caller's RNG is untouched; ``step`` is
a counter that each call advances and that :meth:`HFRollout.state_dict` / :meth:`HFRollout.load_state_dict`
save and restore, so a resumed run repeats the same rollouts. Same seed + same weights + same prompts -> the
same completions (on one device type; CPU and GPU kernels differ). ``temperature == 0`` is greedy (argmax).

Rollout ids are ``"{seed}-{rank}-{step}-{row}"`` (:func:`rollout_id`: the rollout seed, the rank, the engine's call
counter and the row's index in that call): unique per rollout within a run, and the same after a resume, so
counting them in metrics.jsonl (the step's ``onpolicy.rollout_ids``) shows whether a rollout was trained on twice
or lost.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ddk.teacher.generation import left_pad


@dataclass(frozen=True)
class Rollout:
    """One completion: ``logprobs[i]`` is the student's log p(``completion_ids[i]``) at temperature 1."""

    rollout_id: str
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    finished: bool  # ended with eos (False: stopped at max_new_tokens)


def rollout_id(seed: int, rank: int, call: int, row: int) -> str:
    """The id of row ``row`` of the engine's call number ``call`` (its counter before the call) on ``rank``."""
    return f"{int(seed)}-{int(rank)}-{int(call)}-{int(row)}"


def step_seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit seed from ``(seed, step, rank)``, the same in every process (unlike ``hash``)."""
    digest = hashlib.sha256(f"ddk-rollout:{int(seed)}:{int(step)}:{int(rank)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def cut_at_eos(ids: Sequence[int], eos_ids: Sequence[int]) -> tuple[int, bool]:
    """``(length, finished)``: the completion runs up to and including the first eos, if any."""
    stops = set(int(e) for e in eos_ids)
    for i, t in enumerate(ids):
        if int(t) in stops:
            return i + 1, True
    return len(ids), False


def _eos_ids(model) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


class SeededRollout:
    """What both engines share: the sampling settings (checked), the seed, and ``step``, the count of calls that
    seeds each call's draws and that a checkpoint saves (:meth:`state_dict`) so a resumed run repeats them."""

    def __init__(self, seed: int, rank: int = 0, max_new_tokens: int = 64, temperature: float = 1.0,
                 top_p: float = 1.0):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {top_p}")
        self.seed, self.rank = int(seed), int(rank)
        self.max_new_tokens, self.temperature, self.top_p = int(max_new_tokens), float(temperature), float(top_p)
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"rollout state: saved with seed {state['seed']}, this run's seed is {self.seed}")
        self.step = int(state["step"])


class HFRollout(SeededRollout):
    """The ``hf`` engine: the student generates with ``generate``; ``step`` counts calls (resumable)."""

    def generate(self, model, prompts: Sequence[Sequence[int]], stop_at_eos: bool = True) -> list[Rollout]:
        """Completions of ``prompts`` (token-id lists, ragged) by ``model``; advances ``step`` by one.

        ``stop_at_eos=False`` makes every row run to ``max_new_tokens`` (benchmarks)."""
        step = self.step
        self.step += 1
        return generate(model, prompts, self.max_new_tokens, self.temperature, self.top_p,
                        step_seed(self.seed, step, self.rank),
                        row_id=lambda i: rollout_id(self.seed, self.rank, step, i),
                        stop_at_eos=stop_at_eos)


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float, top_p: float,
             seed: int, row_id=lambda i: f"r-{i}", stop_at_eos: bool = True) -> list[Rollout]:
    """One batch of rollouts with ``seed`` (see :class:`HFRollout` for the resumable counter); ``row_id(i)``
    names row ``i``."""
    pad_id = model.config.pad_token_id
    pad_id = 0 if pad_id is None else int(pad_id)
    eos = _eos_ids(model) if stop_at_eos else []
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    greedy = temperature == 0
    kwargs: dict[str, Any] = dict(do_sample=False) if greedy else dict(
        do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(seed)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=int(max_new_tokens),
                                 min_new_tokens=0 if stop_at_eos else int(max_new_tokens),
                                 eos_token_id=eos or None, pad_token_id=pad_id, use_cache=True,
                                 return_dict_in_generate=True, output_logits=True, **kwargs)
    finally:
        model.train(was_training)
    new = out.sequences[:, ids.shape[1]:]                                             # [B, n]
    logits = torch.stack(out.logits, dim=1).float()                                   # [B, n, V]
    lp = torch.log_softmax(logits, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)  # [B, n]
    rows = []
    for i, p in enumerate(prompts):
        toks = new[i].tolist()
        n, finished = cut_at_eos(toks, eos)
        rows.append(Rollout(row_id(i), [int(t) for t in p], toks[:n], lp[i, :n].tolist(), finished))
    return rows
