"""The distillation loss: ``CE + gamma * KL(teacher || student)`` from the teacher's top-k log-probabilities.

The teacher service sends only its k most likely tokens per position (``teacher_ids``, ``teacher_logprobs``:
natural-log probabilities at temperature 1, normalised over the full vocabulary). The KL is taken over k + 1
buckets: the k tokens, plus one *tail* bucket holding everything else --

    teacher tail  p_tail = 1 - sum_k exp(teacher_logprobs)          (0 when below 1e-6, i.e. rounding noise)
    student tail  q_tail = 1 - sum_k q(teacher_ids)                 (clamped at a tiny epsilon)
    KL = sum_k p_k (log p_k - log q_k) + p_tail (log p_tail - log q_tail)

This is the KL between the two distributions coarsened to those buckets: it never exceeds the full KL, and
with k == V (tail 0) it *is* the full KL.

Temperature T (Hinton et al.): the student is ``log_softmax(logits / T)``. The teacher's top-k at temperature
T would need its full logits; we use ``log p_k / T`` for the k tokens and ``log p_tail / T`` for the tail bucket
(as if the tail were one token; exact for the k tokens' relative odds, approximate for the tail) and
renormalise over the k + 1 buckets. At T = 1 this is exact. The KL is multiplied by T^2 so its gradient scale
does not depend on T. ``parts["kl"]`` is that scaled term, so ``loss == ce + gamma * kl``.

CE and KL are means over the positions whose label is not ``-100``. All in float32; no NaN when the tail is
exactly 0 (``0 * log 0`` is taken as 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
_TINY = 1e-12  # floor for the student's tail probability before its log
_TAIL_NOISE = 1e-6  # a teacher tail below this is rounding noise of sum(exp(logprobs)): taken as 0


def cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token CE over positions with ``labels != -100`` (0 when there are none, not NaN)."""
    V = student_logits.shape[-1]
    per_token = F.cross_entropy(student_logits.reshape(-1, V).float(), labels.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="none")
    count = (labels != IGNORE_INDEX).sum().clamp_min(1)
    return per_token.sum() / count


def topk_kl(student_logits: torch.Tensor, labels: torch.Tensor, teacher_ids: torch.Tensor,
            teacher_logprobs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(teacher || student) on the teacher's top-k plus tail bucket, mean over labelled positions."""
    T = float(temperature)
    ids = teacher_ids.to(student_logits.device, torch.long)
    t_logp = teacher_logprobs.to(student_logits.device, torch.float32)  # the wire may carry float16

    # teacher over k + 1 buckets at temperature T. The tail is summed in float64 and taken as 0 below
    # _TAIL_NOISE (rounding noise of the sum, which log(tail) / T would otherwise blow up) or when k == V.
    t_tail = (1.0 - t_logp.double().exp().sum(-1, keepdim=True)).float()     # [B, T, 1]
    t_tail = torch.where(t_tail < _TAIL_NOISE, torch.zeros_like(t_tail), t_tail)
    if ids.shape[-1] >= student_logits.shape[-1]:
        t_tail = torch.zeros_like(t_tail)
    t_logits = torch.cat([t_logp, t_tail.log()], dim=-1) / T                  # log 0 = -inf -> weight 0
    p = torch.softmax(t_logits, dim=-1)                                       # [B, T, k+1]

    # student over the same buckets
    s_logp = torch.log_softmax(student_logits.float() / T, dim=-1)            # [B, T, V]
    s_logp_k = s_logp.gather(-1, ids)                                         # [B, T, k]
    s_tail = (1.0 - s_logp_k.exp().sum(-1, keepdim=True)).clamp_min(_TINY)
    log_q = torch.cat([s_logp_k, s_tail.log()], dim=-1)                       # [B, T, k+1]

    kl = (torch.xlogy(p, p) - p * log_q).sum(-1)                              # [B, T]; xlogy(0, 0) = 0
    mask = (labels != IGNORE_INDEX).float()
    return (kl * mask).sum() / mask.sum().clamp_min(1.0) * (T * T)


def distill_loss(student_logits: torch.Tensor, labels: torch.Tensor,
                 teacher_ids: torch.Tensor | None, teacher_logprobs: torch.Tensor | None,
                 gamma: float, temperature: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss, {"ce", "kl"})`` with ``loss = ce + gamma * kl``; plain CE when gamma == 0 or no teacher.

    Shapes: ``student_logits [B, T, V]``, ``labels [B, T]`` (int64, -100 = ignore), ``teacher_ids [B, T, k]``,
    ``teacher_logprobs [B, T, k]``; position ``t`` of the teacher is its distribution over ``labels[:, t]``.
    """
    ce = cross_entropy(student_logits, labels)
    if gamma == 0 or teacher_ids is None or teacher_logprobs is None:
        return ce, {"ce": ce.detach(), "kl": torch.zeros((), device=ce.device)}
    if teacher_ids.shape != teacher_logprobs.shape or teacher_ids.shape[:2] != student_logits.shape[:2]:
        raise ValueError(f"teacher shapes {tuple(teacher_ids.shape)} / {tuple(teacher_logprobs.shape)} do not "
                         f"match student logits {tuple(student_logits.shape)}")
    kl = topk_kl(student_logits, labels, teacher_ids, teacher_logprobs, temperature)
    return ce + gamma * kl, {"ce": ce.detach(), "kl": kl.detach()}
