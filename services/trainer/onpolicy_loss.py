"""Losses and the gap signal on the student's own tokens (on-policy distillation, issue 28). Pure torch, no I/O.

A rollout is a prompt plus a completion ``x_1..x_n`` that the student sampled. Per completion token the teacher
grades it with ``log p_teacher(x_t)`` (its log-probability of the token the student wrote, given the same
prefix). Two families of loss use that:

**sampled_reverse_kl** (Thinking Machines' on-policy distillation write-up, the Tinker cookbook's
``incorporate_kl_penalty`` + ``importance_sampling`` loss). The per-token advantage is the negative sampled
reverse KL, detached::

    A_t = -(log p_student(x_t) - log p_teacher(x_t))                      (no gradient)
    w_t = min(c, exp(log p_trainer(x_t) - log p_engine(x_t)))              (no gradient; 1 when current)
    loss = -sum_t m_t w_t A_t log p_student(x_t) / sum_t m_t              (m_t: completion mask)

so ``grad loss = -(1/M) sum_t m_t w_t A_t grad log p_student(x_t)``: REINFORCE with the per-token reward
``A_t`` (no discounting, no baseline, as the cookbook's default ``kl_discount_factor = 0``). Its expectation
over ``x ~ p_student`` is the gradient of the per-token reverse KL ``KL(p_student || p_teacher)`` (the score-
function identity; the ``E[grad log p] = 0`` term drops out). ``w_t`` is the truncated importance weight for a
rollout engine whose weights are older than the trainer's (``log p_engine``: the logprob the engine recorded
when it sampled; ``log p_trainer``: the trainer's current one, i.e. ``log p_student`` itself); Tinker's
``importance_sampling`` loss ``-(exp(lp_new - lp_old) * A)`` has the same gradient ``ratio * A * grad lp_new``
untruncated. With ``engine_logprobs=None`` (the ``hf`` engine: always current) ``w_t = 1``.

**gkd_divergence** (GKD's form, Agarwal et al. 2023): the existing ``kd.loss`` divergences of
:mod:`ddk.trainer.loss` on the teacher's top-k at the generated positions only (prompt positions are labelled
``-100``), called through :func:`ddk.trainer.loss.topk_divergence`. Its gradient flows through the student's
full distribution at each generated position (an exact, not sampled, divergence per position); the tokens
themselves are treated as data (no gradient through the sampling).

**onpolicy_gap**: the gap the controller sees in on-policy mode, per domain
``q = exp(mean over the domain's completion tokens of (log p_student - log p_teacher))``, the exponentiated
per-token sampled reverse KL on the student's own text (1 = the teacher agrees with every student token as
much as the student does).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

from ddk.trainer.loss import IGNORE_INDEX, topk_divergence


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[..., targets]`` in float32: ``[B, T, V]`` and ``[B, T]`` -> ``[B, T]``.

    ``targets`` may hold ``-100`` (ignored positions): they gather token 0 and must be masked by the caller."""
    t = targets.clamp_min(0).to(logits.device, torch.long)
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, t.unsqueeze(-1)).squeeze(-1)


def importance_weight(trainer_logprobs: torch.Tensor, engine_logprobs: torch.Tensor | None,
                      clip: float = 2.0) -> torch.Tensor:
    """``min(clip, exp(trainer - engine))`` per token, detached; all ones when ``engine_logprobs`` is None."""
    if clip <= 0:
        raise ValueError(f"clip: must be > 0, got {clip}")
    trainer = trainer_logprobs.detach().float()
    if engine_logprobs is None:
        return torch.ones_like(trainer)
    diff = trainer - engine_logprobs.to(trainer.device, torch.float32)
    return diff.clamp(max=math.log(clip)).exp()  # == min(clip, exp(diff)), no overflow


def sampled_reverse_kl(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor,
                       engine_logprobs: torch.Tensor | None = None, clip: float = 2.0,
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss, parts)``: the on-policy policy-gradient loss on completion tokens (module docstring).

    ``student_logprobs`` ``[B, T]`` carries the gradient (the trainer's forward pass); ``teacher_logprobs`` and
    ``engine_logprobs`` are data; ``mask`` ``[B, T]`` is 1 on completion tokens. ``parts``: ``reverse_kl`` (the
    masked mean of ``log p_student - log p_teacher``), ``weight`` (mean ``w_t``) and ``clipped`` (share of
    tokens whose weight hit ``clip``), all detached. 0 (not NaN) when the mask is empty."""
    if student_logprobs.shape != teacher_logprobs.shape or student_logprobs.shape != mask.shape:
        raise ValueError(f"shapes differ: student {tuple(student_logprobs.shape)}, teacher "
                         f"{tuple(teacher_logprobs.shape)}, mask {tuple(mask.shape)}")
    s = student_logprobs.float()
    t = teacher_logprobs.to(s.device, torch.float32)
    m = mask.to(s.device, torch.float32)
    count = m.sum().clamp_min(1.0)
    log_ratio = (s.detach() - t) * m                       # masked: padding may hold anything finite
    advantage = -log_ratio
    w = importance_weight(s, engine_logprobs, clip) * m
    loss = -(w * advantage * s).sum() / count
    raw = (s.detach() - engine_logprobs.to(s.device, torch.float32)) if engine_logprobs is not None else None
    clipped = ((raw >= math.log(clip)).float() * m).sum() / count if raw is not None else torch.zeros(())
    return loss, {"reverse_kl": log_ratio.sum() / count, "weight": w.sum() / count, "clipped": clipped}


def completion_labels(input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Next-token labels ``[B, T - 1]`` for inputs ``input_ids[:, :-1]``: ``input_ids[:, 1:]`` where that token
    is a completion token (``completion_mask[:, 1:] == 1``), ``-100`` elsewhere (prompt and padding)."""
    labels = input_ids[:, 1:].clone()
    labels[completion_mask[:, 1:] == 0] = IGNORE_INDEX
    return labels


def gkd_divergence(student_logits: torch.Tensor, labels: torch.Tensor, teacher_ids: torch.Tensor,
                   teacher_logprobs: torch.Tensor, temperature: float = 1.0, loss: str = "forward_kl",
                   beta: float = 0.5, skew: float = 0.1) -> torch.Tensor:
    """GKD's form: ``kd.loss``'s divergence on the teacher's top-k at the generated positions (``labels != -100``,
    e.g. from :func:`completion_labels`), T^2-scaled, mean over those positions; :func:`topk_divergence`."""
    return topk_divergence(student_logits, labels, teacher_ids, teacher_logprobs, temperature, loss, beta, skew)


def rollout_gap(student_logprobs: Sequence[float], teacher_logprobs: Sequence[float]) -> tuple[float, int]:
    """``(sum of (log p_student - log p_teacher), token count)`` over one completion's tokens."""
    if len(student_logprobs) != len(teacher_logprobs):
        raise ValueError(f"lengths differ: {len(student_logprobs)} student, {len(teacher_logprobs)} teacher")
    return math.fsum(float(s) - float(t) for s, t in zip(student_logprobs, teacher_logprobs)), len(student_logprobs)


def onpolicy_gap(rows: Iterable[tuple[str, Sequence[float], Sequence[float]]]) -> dict[str, float]:
    """Per domain ``q = exp(sum of (log p_s - log p_t) / token count)`` over all its rollouts' completion tokens
    (token-weighted, like a perplexity ratio). ``rows``: ``(domain, student logprobs, teacher logprobs)``.
    A domain whose completions are all empty is left out (no tokens, no gap)."""
    sums: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    for domain, s, t in rows:
        total, n = rollout_gap(s, t)
        sums.setdefault(domain, []).append(total)
        counts[domain] = counts.get(domain, 0) + n
    return {d: math.exp(math.fsum(sums[d]) / counts[d]) for d in sums if counts[d] > 0}
