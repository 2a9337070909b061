"""The distillation loss: ``CE + gamma * D(teacher, student)`` from the teacher's top-k log-probabilities.

The teacher service sends only its k most likely tokens per position (``teacher_ids``, ``teacher_logprobs``:
natural-log probabilities at temperature 1, normalised over the full vocabulary). Every divergence D is taken
over k + 1 buckets: the k tokens, plus one *tail* bucket holding everything else --

    teacher tail  p_tail = 1 - sum_k exp(teacher_logprobs)          (0 when below 1e-6, i.e. rounding noise)
    student tail  q_tail = 1 - sum_k q(teacher_ids)                 (clamped at a tiny epsilon)

This is the divergence between the two distributions coarsened to those buckets. With k == V the tail bucket
is empty on both sides and is dropped, so D *is* the dense (full-vocabulary) divergence.

The divergences (``loss=``), with p the teacher's and q the student's bucket distribution, sums over buckets i:

    forward_kl  KL(p || q)  = sum_i p_i (log p_i - log q_i)                                  (the default)
    reverse_kl  KL(q || p)  = sum_i q_i (log q_i - log p_i)
    jsd         m = beta p + (1 - beta) q;  beta KL(p || m) + (1 - beta) KL(q || m)   for 0 < beta < 1,
                KL(p || q) at beta = 0 and KL(q || p) at beta = 1                       (beta in [0, 1])
    skew_kl     KL(p || skew p + (1 - skew) q)                                          (skew in (0, 1])
    skew_rkl    KL(q || skew q + (1 - skew) p)                                          (skew in (0, 1])
    tvd         0.5 sum_i |p_i - q_i|

``jsd`` follows TRL's ``GKDTrainer.generalized_jsd_loss`` exactly (Agarwal et al. 2023, eq. 1), including its
two endpoints: the mixture form itself tends to 0 at both ends (about beta KL(p || q) near 0 and
(1 - beta) KL(q || p) near 1), so beta = 0 and beta = 1 are explicit switches to the forward and reverse KL, as
in TRL, not limits. ``skew_kl``/``skew_rkl`` are DistiLLM's skewed KL and skewed reverse KL (Ko et al. 2024);
skew = 1 gives 0, small skew approaches the plain KL.

Temperature T (Hinton et al.): the student is ``log_softmax(logits / T)``. The teacher's top-k at temperature
T would need its full logits; we use ``log p_k / T`` for the k tokens and ``log p_tail / T`` for the tail bucket
(as if the tail were one token; exact for the k tokens' relative odds, approximate for the tail) and
renormalise over the k + 1 buckets. At T = 1 this is exact. Every divergence is multiplied by T^2 so its
gradient scale does not depend on T. ``parts["kl"]`` is that scaled term, so ``loss == ce + gamma * kl``.

CE and D are means over the positions whose label is not ``-100``. All in float32; no NaN or inf when the
teacher's tail is exactly 0: a zero bucket weighs 0 (``0 * log 0`` is taken as 0), and where p is the
*reference* of a log (``log p`` in the reverse directions) it is floored at 1e-12, so a student that keeps mass
in a bucket the teacher left empty pays a large but finite penalty.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
LOSSES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_rkl", "tvd")  # kd.loss in the train config
_TINY = 1e-12  # floor for the student's tail probability (and any bucket probability) before its log
_LOG_TINY = math.log(_TINY)
_TAIL_NOISE = 1e-6  # a teacher tail below this is rounding noise of sum(exp(logprobs)): taken as 0


def cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token CE over positions with ``labels != -100`` (0 when there are none, not NaN)."""
    V = student_logits.shape[-1]
    per_token = F.cross_entropy(student_logits.reshape(-1, V).float(), labels.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="none")
    count = (labels != IGNORE_INDEX).sum().clamp_min(1)
    return per_token.sum() / count


# ---------------------------------------------------------------------------------------------------------
# the k + 1 buckets

class Buckets(NamedTuple):
    """Teacher (p) and student (q) over the buckets, ``[B, T, n]`` float32 each, n = k + 1 (k when k == V).

    ``p`` may hold exact zeros (an empty teacher tail); ``log_p`` is floored at log(1e-12) so it stays finite.
    ``q > 0`` everywhere (its tail is clamped at 1e-12); ``q == log_q.exp()``, both carry the gradient.
    """

    p: torch.Tensor
    log_p: torch.Tensor
    q: torch.Tensor
    log_q: torch.Tensor


def topk_buckets(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                 temperature: float = 1.0) -> Buckets:
    """The teacher's and the student's distributions over the top-k + tail buckets at temperature T."""
    T = float(temperature)
    ids = teacher_ids.to(student_logits.device, torch.long)
    t_logp = teacher_logprobs.to(student_logits.device, torch.float32)  # the wire may carry float16
    full = ids.shape[-1] >= student_logits.shape[-1]  # k == V: no tail bucket

    # teacher at temperature T. The tail is summed in float64 and taken as 0 below _TAIL_NOISE (rounding noise
    # of the sum, which log(tail) / T would otherwise blow up).
    if full:
        t_logits = t_logp / T
    else:
        t_tail = (1.0 - t_logp.double().exp().sum(-1, keepdim=True)).float()     # [B, T, 1]
        t_tail = torch.where(t_tail < _TAIL_NOISE, torch.zeros_like(t_tail), t_tail)
        t_logits = torch.cat([t_logp, t_tail.log()], dim=-1) / T                  # log 0 = -inf -> weight 0
    p = torch.softmax(t_logits, dim=-1)
    log_p = torch.log_softmax(t_logits, dim=-1).clamp_min(_LOG_TINY)

    # student over the same buckets
    s_logp = torch.log_softmax(student_logits.float() / T, dim=-1)                # [B, T, V]
    log_q = s_logp.gather(-1, ids)                                                # [B, T, k]
    if not full:
        s_tail = (1.0 - log_q.exp().sum(-1, keepdim=True)).clamp_min(_TINY)
        log_q = torch.cat([log_q, s_tail.log()], dim=-1)                          # [B, T, k+1]
    return Buckets(p, log_p, log_q.exp(), log_q)


# ---------------------------------------------------------------------------------------------------------
# the divergences: Buckets -> [B, T], one value per position

def _kl(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = sum a (log a - log b); a bucket with a == 0 adds 0 (the logs are finite)."""
    return (a * (log_a - log_b)).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w a + (1 - w) b) for w in [0, 1], from the two log-probabilities."""
    if w == 1:
        return log_a
    if w == 0:
        return log_b
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def forward_kl(b: Buckets) -> torch.Tensor:
    """KL(p || q) (teacher || student): mass-covering."""
    return (torch.xlogy(b.p, b.p) - b.p * b.log_q).sum(-1)  # xlogy(0, 0) = 0


def reverse_kl(b: Buckets) -> torch.Tensor:
    """KL(q || p) (student || teacher): mode-seeking."""
    return _kl(b.q, b.log_q, b.log_p)


def generalized_jsd(b: Buckets, beta: float) -> torch.Tensor:
    """TRL's generalised JSD: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q; the KLs at 0, 1."""
    if beta == 0:
        return forward_kl(b)
    if beta == 1:
        return reverse_kl(b)
    log_m = _log_mix(b.log_p, b.log_q, beta)
    return beta * _kl(b.p, b.log_p, log_m) + (1 - beta) * _kl(b.q, b.log_q, log_m)


def skew_kl(b: Buckets, skew: float) -> torch.Tensor:
    """DistiLLM's skewed KL: KL(p || skew p + (1 - skew) q)."""
    return _kl(b.p, b.log_p, _log_mix(b.log_p, b.log_q, skew))


def skew_rkl(b: Buckets, skew: float) -> torch.Tensor:
    """DistiLLM's skewed reverse KL: KL(q || skew q + (1 - skew) p)."""
    return _kl(b.q, b.log_q, _log_mix(b.log_q, b.log_p, skew))


def tvd(b: Buckets) -> torch.Tensor:
    """Total variation distance: 0.5 sum |p - q|."""
    return 0.5 * (b.p - b.q).abs().sum(-1)


def check_divergence(loss: str, beta: float, skew: float) -> tuple[str, float, float]:
    """``(loss, beta, skew)`` checked; ValueError naming the argument when one is not allowed."""
    if loss not in LOSSES:
        raise ValueError(f"loss: unknown divergence {loss!r} (known: {', '.join(LOSSES)})")
    for name, value, ok, rule in (("beta", beta, lambda x: 0 <= x <= 1, "in [0, 1]"),
                                  ("skew", skew, lambda x: 0 < x <= 1, "in (0, 1]")):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not ok(float(value)):
            raise ValueError(f"{name}: must be a number {rule}, got {value!r}")
    return loss, float(beta), float(skew)


def _divergence(loss: str, beta: float, skew: float) -> Callable[[Buckets], torch.Tensor]:
    return {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": lambda b: generalized_jsd(b, beta),
            "skew_kl": lambda b: skew_kl(b, skew), "skew_rkl": lambda b: skew_rkl(b, skew), "tvd": tvd}[loss]


def topk_divergence(student_logits: torch.Tensor, labels: torch.Tensor, teacher_ids: torch.Tensor,
                    teacher_logprobs: torch.Tensor, temperature: float = 1.0, loss: str = "forward_kl",
                    beta: float = 0.5, skew: float = 0.1) -> torch.Tensor:
    """T^2 * D(teacher, student) on the teacher's top-k plus tail bucket, mean over labelled positions."""
    loss, beta, skew = check_divergence(loss, beta, skew)
    T = float(temperature)
    per_pos = _divergence(loss, beta, skew)(topk_buckets(student_logits, teacher_ids, teacher_logprobs, T))
    mask = (labels != IGNORE_INDEX).float()
    return (per_pos * mask).sum() / mask.sum().clamp_min(1.0) * (T * T)


def topk_kl(student_logits: torch.Tensor, labels: torch.Tensor, teacher_ids: torch.Tensor,
            teacher_logprobs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(teacher || student) on the teacher's top-k plus tail bucket, mean over labelled positions."""
    return topk_divergence(student_logits, labels, teacher_ids, teacher_logprobs, temperature)


def distill_loss(student_logits: torch.Tensor, labels: torch.Tensor,
                 teacher_ids: torch.Tensor | None, teacher_logprobs: torch.Tensor | None,
                 gamma: float, temperature: float, loss: str = "forward_kl", beta: float = 0.5,
                 skew: float = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(total, {"ce", "kl"})`` with ``total = ce + gamma * kl``; plain CE when gamma == 0 or no teacher.

    ``kl`` is the T^2-scaled divergence ``loss`` (one of :data:`LOSSES`; ``beta`` is jsd's, ``skew`` the skewed
    KLs'; both are checked whatever ``loss`` is: ValueError naming the argument).
    Shapes: ``student_logits [B, T, V]``, ``labels [B, T]`` (int64, -100 = ignore), ``teacher_ids [B, T, k]``,
    ``teacher_logprobs [B, T, k]``; position ``t`` of the teacher is its distribution over ``labels[:, t]``.
    """
    loss, beta, skew = check_divergence(loss, beta, skew)
    ce = cross_entropy(student_logits, labels)
    if gamma == 0 or teacher_ids is None or teacher_logprobs is None:
        return ce, {"ce": ce.detach(), "kl": torch.zeros((), device=ce.device)}
    if teacher_ids.shape != teacher_logprobs.shape or teacher_ids.shape[:2] != student_logits.shape[:2]:
        raise ValueError(f"teacher shapes {tuple(teacher_ids.shape)} / {tuple(teacher_logprobs.shape)} do not "
                         f"match student logits {tuple(student_logits.shape)}")
    kl = topk_divergence(student_logits, labels, teacher_ids, teacher_logprobs, temperature, loss, beta, skew)
    return ce + gamma * kl, {"ce": ce.detach(), "kl": kl.detach()}
