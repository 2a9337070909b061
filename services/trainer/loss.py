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

from ddk.vocab import DIVERGENCES

IGNORE_INDEX = -100
LOSSES = DIVERGENCES  # kd.loss in the train config: the names are ddk.vocab's (torch-free), the functions here
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
    ids = teacher_ids.to(student_logits.device, torch.long)
    s_logp = torch.log_softmax(student_logits.float() / float(temperature), dim=-1)  # [B, T, V]
    return buckets_from_student_logp(s_logp.gather(-1, ids), teacher_logprobs, temperature,
                                     full=ids.shape[-1] >= student_logits.shape[-1])


def buckets_from_student_logp(student_logp_k: torch.Tensor, teacher_logprobs: torch.Tensor,
                              temperature: float = 1.0, full: bool = False) -> Buckets:
    """:func:`topk_buckets` from the student's log-probabilities at temperature T on the teacher's k ids
    (``[..., k]``, float32) instead of its logits; ``full``: k == V (no tail bucket)."""
    T = float(temperature)
    t_logp = teacher_logprobs.to(student_logp_k.device, torch.float32)  # the wire may carry float16

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
    log_q = student_logp_k                                                        # [B, T, k]
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


# ---------------------------------------------------------------------------------------------------------
# the chunked loss from the hidden states (issue 12): the output projection inside the chunk

DEFAULT_CHUNK_BUDGET = 256 * 2**20  # bytes of one chunk's float32 [chunk, vocab] logits
MAX_CHUNK_TOKENS = 8192  # beyond this the per-chunk overhead is already negligible; keeps [chunk, H] bounded too


def default_chunk_tokens(vocab_size: int, budget_bytes: int = DEFAULT_CHUNK_BUDGET) -> int:
    """Positions per chunk so that one chunk's float32 ``[chunk, vocab]`` is at most ``budget_bytes``.

    At least 1, at most :data:`MAX_CHUNK_TOKENS` (8192). With the default 256 MiB: 2,097 positions at vocabulary
    32,000, 524 at 128,000, 8192 (the cap) at 2,048. The chunk's peak is a few times that one tensor (its
    float32 log-softmaxes and their gradients live at the same time), but never grows with the batch.
    """
    if vocab_size < 1 or budget_bytes < 1:
        raise ValueError(f"vocab_size and budget_bytes must be >= 1, got {vocab_size}, {budget_bytes}")
    return max(1, min(MAX_CHUNK_TOKENS, budget_bytes // (4 * vocab_size)))


def _chunk(z: torch.Tensor, labels: torch.Tensor, teacher_ids: torch.Tensor | None,
           teacher_logprobs: torch.Tensor | None, temperature: float,
           divergence: Callable[[Buckets], torch.Tensor] | None, ce_scale: torch.Tensor, kl_scale: torch.Tensor,
           want_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One chunk: (CE sum, divergence sum, d objective / d logits or None), sums over its labelled positions.

    ``z [n, V]`` the chunk's logits (any float dtype, taken in float32 as in the plain path), ``labels [n]``,
    teacher ``[n, k]``; objective = ``ce_scale * CE sum + kl_scale * divergence sum``. The divergence is the
    plain path's own (:func:`buckets_from_student_logp` and the divergence function, on the student's
    log-probabilities at the k ids, ``[n, k]``, with autograd); only the log-softmax is taken by hand, so that one
    ``[n, V]`` gradient is built in place instead of autograd's several: for log-probs ``l = z/T - lse(z/T)``
    gathered at some ids with upstream gradient G there, ``d/dz = (scatter(G) - softmax(z/T) * sum(G)) / T``.
    The CE is the same with T = 1, the label as the id and G = -1 per labelled position.
    """
    # float32 logits; when z is float32 this *is* z's storage, overwritten in place below with the gradient
    # (the projection's backward needs only its inputs, never its output), so a chunk holds one [n, V]
    zf = z.detach().float()                                                       # [n, V]
    mask = labels != IGNORE_INDEX
    lab = torch.where(mask, labels, torch.zeros_like(labels)).unsqueeze(-1)       # [n, 1]
    z_lab = zf.gather(-1, lab)                                                    # [n, 1]
    T = float(temperature)
    kd = divergence is not None
    if kd:
        ids = teacher_ids.to(zf.device, torch.long)
        z_ids = zf.gather(-1, ids)                                                # [n, k]
    soft_t = None
    if kd and T != 1:  # softmax(z / T) in its own [n, V]; lse_t = logsumexp(z / T)
        soft_t = zf / T
        m_t = soft_t.amax(-1, keepdim=True)
        sum_t = soft_t.sub_(m_t).exp_().sum(-1, keepdim=True)
        lse_t = m_t + sum_t.log()
        soft_t = soft_t.div_(sum_t) if want_grad else None
    m = zf.amax(-1, keepdim=True)  # softmax(z) in place (as torch.logsumexp: max + log sum exp(z - max))
    total = zf.sub_(m).exp_().sum(-1, keepdim=True)
    lse = m + total.log()                                                         # [n, 1]
    if T == 1:
        lse_t = lse
    ce = -((z_lab - lse).squeeze(-1) * mask).sum()
    kl = torch.zeros((), device=zf.device)
    if kd:
        log_q = (z_ids / T - lse_t).requires_grad_(want_grad)                    # [n, k]
        with torch.enable_grad() if want_grad else torch.no_grad():
            per_pos = divergence(buckets_from_student_logp(log_q, teacher_logprobs, T,
                                                           full=ids.shape[-1] >= zf.shape[-1]))
            kl = (per_pos * mask.float()).sum()
            g_q = torch.autograd.grad(kl * kl_scale, log_q)[0] if want_grad else None
        kl = kl.detach()
    if not want_grad:
        return ce, kl, None
    c = mask.float().unsqueeze(-1) * ce_scale                                     # dCE-objective / d(-log p_label)
    grad = zf.div_(total)                                                         # softmax(z)
    if kd and T == 1:  # one softmax for both terms
        grad.mul_(c - g_q.sum(-1, keepdim=True))
    else:
        grad.mul_(c)
        if kd:
            grad.add_(soft_t.mul_(g_q.sum(-1, keepdim=True) / -T))
            del soft_t
    grad.scatter_add_(-1, lab, -c)
    if kd:
        grad.scatter_add_(-1, ids, g_q / T)
    if z.dtype != grad.dtype:  # bf16 (autocast) or float64: into z's own storage, no third [n, V]
        grad = z.detach().copy_(grad)
    return ce, kl, grad


def _chunked_pass(hidden, weight, bias, labels, teacher_ids, teacher_logprobs, gamma, temperature, divergence,
                  chunk, need_grads: tuple[bool, bool, bool]):
    """The loop over chunks of flattened positions: (total, ce, kl, grad_hidden, grad_weight, grad_bias).

    With any of ``need_grads`` (hidden, weight, bias) the gradient of ``total`` is taken chunk by chunk: the
    logits' gradient from :func:`_chunk`, then ``torch.autograd.grad`` through the chunk's projection alone
    (which handles autocast and dtypes as the plain path's would); otherwise no graph at all.
    """
    B, T, H = hidden.shape
    N = B * T
    h = hidden.detach().reshape(N, H)
    w = weight.detach().requires_grad_(need_grads[1])
    b = None if bias is None else bias.detach().requires_grad_(need_grads[2])
    lab = labels.reshape(-1).to(h.device, torch.long)
    ids = None if divergence is None else teacher_ids.reshape(N, -1)
    lps = None if divergence is None else teacher_logprobs.reshape(N, -1)
    mask = lab != IGNORE_INDEX
    count = mask.sum().clamp_min(1)  # as cross_entropy: int
    count_f = mask.float().sum().clamp_min(1.0)  # as topk_divergence: float
    T2 = float(temperature) ** 2
    ce_scale, kl_scale = 1.0 / count, (gamma * T2) / count_f
    labelled = F.pad(mask, (0, -N % chunk)).view(-1, chunk).any(1).tolist()  # one sync for all chunks

    any_grad = any(need_grads)
    acc = torch.promote_types(weight.dtype, torch.float32)  # the weight's gradient is accumulated in >= float32
    grad_h = torch.zeros_like(h) if need_grads[0] else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_grads[1] else None
    grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_grads[2] else None
    ce_sum = torch.zeros((), device=h.device)
    kl_sum = torch.zeros((), device=h.device)
    for i, has_labels in enumerate(labelled):
        if not has_labels:  # adds 0 to every sum and every gradient
            continue
        s, e = i * chunk, min((i + 1) * chunk, N)
        with torch.enable_grad() if any_grad else torch.no_grad():
            h_c = h[s:e].requires_grad_(need_grads[0]) if need_grads[0] else h[s:e]
            z = F.linear(h_c, w, b)
        ce_c, kl_c, g_z = _chunk(z, lab[s:e], None if ids is None else ids[s:e], None if lps is None else lps[s:e],
                                 temperature, divergence, ce_scale, kl_scale, any_grad)
        if any_grad:
            inputs = [x for x, need in zip((h_c, w, b), need_grads) if need]
            grads = iter(torch.autograd.grad(z, inputs, g_z))  # g_z in z's dtype (and, often, storage)
            del z, g_z
            if need_grads[0]:
                grad_h[s:e] = next(grads)
            if need_grads[1]:
                grad_w += next(grads)
            if need_grads[2]:
                grad_b += next(grads)
        ce_sum = ce_sum + ce_c
        kl_sum = kl_sum + kl_c
    ce = ce_sum / count
    kl = kl_sum / count_f * T2
    total = ce + gamma * kl if divergence is not None else ce.clone()  # its own tensor: ce is not differentiable
    return (total, ce, kl, None if grad_h is None else grad_h.view(B, T, H),
            None if grad_w is None else grad_w.to(weight.dtype), None if grad_b is None else grad_b.to(bias.dtype))


class _ChunkedLoss(torch.autograd.Function):
    """The loss and its gradient in the forward pass (as Liger's fused linear cross-entropy); backward scales."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, teacher_ids, teacher_logprobs, gamma, temperature, divergence,
                chunk, need_grads):
        total, ce, kl, gh, gw, gb = _chunked_pass(hidden, weight, bias, labels, teacher_ids, teacher_logprobs,
                                                  gamma, temperature, divergence, chunk, need_grads)
        ctx.grads = (gh, gw, gb)  # kept on ctx, not saved tensors: they are results, not inputs of the graph
        ctx.mark_non_differentiable(ce, kl)
        return total, ce, kl

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_kl):
        grads = ctx.grads
        ctx.grads = None
        if not bool(grad_total == 1):
            grads = tuple(None if g is None else g * grad_total for g in grads)
        return (*grads, None, None, None, None, None, None, None, None)


def chunked_distill_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         teacher_ids: torch.Tensor | None, teacher_logprobs: torch.Tensor | None,
                         gamma: float, temperature: float, loss: str = "forward_kl", beta: float = 0.5,
                         skew: float = 0.1, chunk_tokens: int | None = None,
                         bias: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`distill_loss` of ``logits = hidden @ weight.T (+ bias)``, computed over chunks of positions.

    ``hidden [B, T, H]``: the student's final hidden states (after its final norm); ``weight [V, H]``: the output
    projection (``lm_head.weight``, may be tied to the embeddings); ``bias [V]`` optional; the rest as
    :func:`distill_loss`, with the same return value: ``(total, {"ce", "kl"})``, means over all the batch's
    labelled positions. The projection happens inside each chunk of ``chunk_tokens`` flattened positions, so
    neither the full ``[B, T, V]`` logits nor their float32 log-softmax ever exist, forward or backward: the
    gradient is taken chunk by chunk during the forward pass and kept (``[B, T, H]`` for ``hidden``, ``[V, H]``
    for ``weight``) until backward, which only scales it by the incoming gradient. Hence ``total.backward()``
    works once per call, and the gradient is that of ``total`` (``parts`` are detached).
    ``chunk_tokens=None``: :func:`default_chunk_tokens` (V); 0: the plain path (full logits, :func:`distill_loss`).
    Under autocast the chunk's projection runs in the autocast dtype, its reductions in float32, and the
    gradients come back in the inputs' dtypes.
    """
    loss, beta, skew = check_divergence(loss, beta, skew)
    if hidden.dim() != 3 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be [B, T, H] and weight {tuple(weight.shape)} [V, H]")
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias {tuple(bias.shape)} does not match weight {tuple(weight.shape)}")
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(weight.shape[0])
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, numbers.Integral) or chunk_tokens < 0:
        raise ValueError(f"chunk_tokens: must be an integer >= 0 or None, got {chunk_tokens!r}")
    if chunk_tokens == 0:
        return distill_loss(F.linear(hidden, weight, bias), labels, teacher_ids, teacher_logprobs, gamma,
                            temperature, loss, beta, skew)
    kd = not (gamma == 0 or teacher_ids is None or teacher_logprobs is None)
    if kd and (teacher_ids.shape != teacher_logprobs.shape or teacher_ids.shape[:2] != hidden.shape[:2]):
        raise ValueError(f"teacher shapes {tuple(teacher_ids.shape)} / {tuple(teacher_logprobs.shape)} do not "
                         f"match student hidden states {tuple(hidden.shape)}")
    divergence = _divergence(loss, beta, skew) if kd else None
    args = (labels, teacher_ids if kd else None, teacher_logprobs if kd else None, float(gamma),
            float(temperature), divergence, int(chunk_tokens))
    need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and any(need):
        total, ce, kl = _ChunkedLoss.apply(hidden, weight, bias, *args, need)
    else:
        total, ce, kl, *_ = _chunked_pass(hidden, weight, bias, *args, (False, False, False))
    return total, {"ce": ce.detach(), "kl": kl.detach()}
