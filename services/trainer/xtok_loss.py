"""The cross-tokenizer distillation loss on aligned groups (issue 29): a divergence on the shared tokens plus ULD.

Inputs come from ``ddk.trainer.align``: for each *compared* group (its end is a byte both tokenisations stop at,
and both sides have a next-token distribution there) the student's flat position of its last token and the
teacher's top-k at its own last token, in the teacher's ids. The two distributions are over different
vocabularies; they are compared in two parts (GOLD's hybrid ULD loss, Patiño et al. 2025 / TRL ``ULDLoss``, on the
served top-k instead of full logits):

(a) **common support** (``parts["match"]``): each teacher id in the top-k that has a student counterpart
    (``teacher_to_student``, the shared vocabulary) keeps its probability on that student id; the teacher's
    top-k ids without one join the tail bucket. This is exactly ``ddk.trainer.loss``'s k + 1 buckets with the
    unmapped entries moved into the tail: teacher ``p`` = its mapped top-k probabilities plus
    ``1 - sum(mapped)``, student ``q`` = its probabilities at the mapped student ids plus ``1 - sum`` of them,
    both normalised, both over the same events ("the next token is this shared string" / "anything else"). The
    divergence is ``kd.loss``'s (the same six functions, temperature and floors as the same-tokenizer loss).
(b) **ULD** (``parts["uld"]``; Boizard et al. 2024): the L1 distance between the sorted probabilities of what is
    not shared: the teacher's top-k probabilities at its unmapped ids (mapped entries set to 0, sorted
    descending, so the vector is zero-padded to k) and the student's k largest probabilities over its
    non-shared ids (sorted, zero-padded to k when it has fewer). 0 when the two sorted vectors are equal. Both
    sides at temperature T: the student's ``softmax(z / T)``, the teacher's k + 1 buckets at T as ``loss.py``
    takes them (:func:`teacher_probs_at`).

The weights are GOLD's: ``kd = w_match * match + w_uld * uld`` with, by default, GOLD's adaptive weights
``w_match = |shared| / V_teacher`` (the share of the teacher's vocabulary with a counterpart) and
``w_uld = 1 - w_match``; both can be given (GOLD's ``uld_hybrid_matched_weight`` / ``uld_hybrid_unmatched_weight``).
The whole term is multiplied by T^2 and averaged over the compared groups; the CE is the student's own, over its
labelled positions, as in :func:`ddk.trainer.loss.distill_loss`: ``total = ce + gamma * kl``.

With one tokenizer on both sides every token is shared (w_match = 1, no unmapped id, no non-shared student id),
every token is its own group, and this is :func:`ddk.trainer.loss.distill_loss` exactly.
"""

from __future__ import annotations

from typing import Callable

import torch

from ddk.trainer.loss import (IGNORE_INDEX, Buckets, buckets_from_student_logp, check_divergence,
                              cross_entropy, forward_kl, generalized_jsd, reverse_kl, skew_kl, skew_rkl, tvd)

_ABSENT_LOGQ = -1.0e4  # the student's log-probability written at an unmapped top-k slot: exp() is exactly 0
_TAIL_NOISE = 1e-6  # as loss.py: a teacher tail below this is rounding noise of sum(exp(logprobs))


def divergence_fn(loss: str, beta: float = 0.5, skew: float = 0.1) -> Callable[[Buckets], torch.Tensor]:
    """``kd.loss``'s divergence as a function of :class:`~ddk.trainer.loss.Buckets` (checked names and ranges)."""
    loss, beta, skew = check_divergence(loss, beta, skew)
    return {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": lambda b: generalized_jsd(b, beta),
            "skew_kl": lambda b: skew_kl(b, skew), "skew_rkl": lambda b: skew_rkl(b, skew), "tvd": tvd}[loss]


def gold_weights(n_shared: int, teacher_vocab_size: int) -> tuple[float, float]:
    """GOLD's adaptive weights ``(w_match, w_uld)``: the shared share of the teacher's vocabulary, and the rest."""
    if teacher_vocab_size < 1 or not 0 <= n_shared <= teacher_vocab_size:
        raise ValueError(f"need 0 <= n_shared <= teacher_vocab_size, got {n_shared}, {teacher_vocab_size}")
    w = n_shared / teacher_vocab_size
    return w, 1.0 - w


def teacher_probs_at(teacher_logprobs: torch.Tensor, temperature: float) -> torch.Tensor:
    """The teacher's top-k probabilities at temperature T, ``[..., k]``, as ``loss.py`` takes them: ``log p / T``
    for the k entries and ``log tail / T`` for the rest, normalised over the k + 1 buckets (exp(logprobs) at T=1)."""
    T = float(temperature)
    t_logp = teacher_logprobs.float()
    tail = (1.0 - t_logp.double().exp().sum(-1, keepdim=True)).float()
    tail = torch.where(tail < _TAIL_NOISE, torch.zeros_like(tail), tail)
    return torch.softmax(torch.cat([t_logp, tail.log()], dim=-1) / T, dim=-1)[..., :-1]


def uld_sorted_l1(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """ULD's term: sum |sort(s) - sort(t)| per row, both sorted descending and zero-padded to the longer.

    ``student_probs [..., a]``, ``teacher_probs [..., b]``; returns ``[...]``. Differentiable in both."""
    a, b = student_probs.shape[-1], teacher_probs.shape[-1]
    s = student_probs.sort(dim=-1, descending=True).values
    t = teacher_probs.sort(dim=-1, descending=True).values
    n = max(a, b)
    if a < n:
        s = torch.nn.functional.pad(s, (0, n - a))
    if b < n:
        t = torch.nn.functional.pad(t, (0, n - b))
    return (s - t).abs().sum(-1)


def xtok_terms(student_logp: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
               teacher_to_student: torch.Tensor, student_shared: torch.Tensor, temperature: float,
               divergence: Callable[[Buckets], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per compared group: ``(match [C], uld [C])`` (not T^2-scaled).

    ``student_logp [C, V_S]``: the student's log-probabilities at temperature T at each group's last token;
    ``teacher_ids``, ``teacher_logprobs [C, k]``: the teacher's top-k there (its ids; natural-log probabilities at
    T = 1); ``teacher_to_student [V_T]`` (-1: no counterpart); ``student_shared [V_S]`` bool.
    """
    C, V_S = student_logp.shape
    k = teacher_ids.shape[-1]
    t_ids = teacher_ids.to(student_logp.device, torch.long)
    t_logp = teacher_logprobs.to(student_logp.device, torch.float32)
    s_ids = teacher_to_student.to(student_logp.device)[t_ids]                       # [C, k], -1 = unmapped
    mapped = s_ids >= 0
    # (a) the k + 1 buckets over the mapped entries; an unmapped entry weighs 0 on both sides, its teacher mass
    # falls into the tail (1 - sum of the mapped entries)
    log_q = student_logp.gather(-1, s_ids.clamp_min(0))
    log_q = torch.where(mapped, log_q, torch.full_like(log_q, _ABSENT_LOGQ))
    t_mapped = torch.where(mapped, t_logp, torch.full_like(t_logp, float("-inf")))
    full = k >= V_S and bool(mapped.all())
    match = divergence(buckets_from_student_logp(log_q, t_mapped, temperature, full=full))
    # (b) ULD on what is not shared
    t_unshared = torch.where(mapped, torch.zeros_like(t_logp), teacher_probs_at(t_logp, temperature))
    n_free = int((~student_shared).sum())
    if n_free == 0:
        s_unshared = student_logp.new_zeros(C, 0)
    else:
        masked = student_logp.masked_fill(student_shared.to(student_logp.device), float("-inf"))
        s_unshared = masked.topk(min(k, n_free), dim=-1).values.exp()
    uld = uld_sorted_l1(s_unshared, t_unshared)
    return match, uld


def xtok_distill_loss(student_logits: torch.Tensor, labels: torch.Tensor, student_positions: torch.Tensor,
                      teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_to_student: torch.Tensor,
                      student_shared: torch.Tensor, gamma: float, temperature: float = 1.0,
                      loss: str = "forward_kl", beta: float = 0.5, skew: float = 0.1,
                      weights: tuple[float, float] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(total, {"ce", "kl", "match", "uld"})`` with ``total = ce + gamma * kl`` and
    ``kl = T^2 * mean over groups (w_match * match + w_uld * uld)``; plain CE when gamma == 0 or no group.

    ``student_logits [B, T, V_S]``, ``labels [B, T]`` (-100 = ignore; the CE's, as today);
    ``student_positions [C]``: flat indices (``b * T + t``) of the compared groups' last student tokens
    (``ddk.trainer.align.compared_positions``); ``teacher_ids``, ``teacher_logprobs [C, k]``: the teacher's top-k at
    its last token of each group; ``teacher_to_student [V_T]`` and ``student_shared [V_S]``: the shared vocabulary
    (``SharedVocab.teacher_to_student``, ``.student_mask``). ``weights``: ``(w_match, w_uld)``; None: GOLD's
    adaptive ones (:func:`gold_weights`).
    """
    div = divergence_fn(loss, beta, skew)
    B, T_len, V_S = student_logits.shape
    if labels.shape != (B, T_len):
        raise ValueError(f"labels {tuple(labels.shape)} do not match student logits {tuple(student_logits.shape)}")
    if teacher_ids.shape != teacher_logprobs.shape or teacher_ids.dim() != 2 \
            or teacher_ids.shape[0] != student_positions.shape[0]:
        raise ValueError(f"teacher shapes {tuple(teacher_ids.shape)} / {tuple(teacher_logprobs.shape)} do not match "
                         f"{tuple(student_positions.shape)} compared positions")
    if student_shared.shape != (V_S,):
        raise ValueError(f"student_shared {tuple(student_shared.shape)} does not match vocabulary {V_S}")
    if weights is None:
        weights = gold_weights(int((teacher_to_student >= 0).sum()), int(teacher_to_student.shape[0]))
    w_match, w_uld = (float(w) for w in weights)
    ce = cross_entropy(student_logits, labels)
    zero = torch.zeros((), device=ce.device)
    C = int(student_positions.shape[0])
    if gamma == 0 or C == 0:
        return ce, {"ce": ce.detach(), "kl": zero, "match": zero, "uld": zero}
    Tt = float(temperature)
    flat = student_logits.reshape(B * T_len, V_S)[student_positions.to(student_logits.device, torch.long)]
    s_logp = torch.log_softmax(flat.float() / Tt, dim=-1)                             # [C, V_S]
    match, uld = xtok_terms(s_logp, teacher_ids, teacher_logprobs, teacher_to_student, student_shared, Tt, div)
    per_group = w_match * match + w_uld * uld if w_uld != 0 else w_match * match
    kl = per_group.sum() / float(C) * (Tt * Tt)
    return ce + gamma * kl, {"ce": ce.detach(), "kl": kl.detach(), "match": match.mean().detach(),
                             "uld": uld.mean().detach()}


def identity_positions(labels: torch.Tensor) -> torch.Tensor:
    """The compared positions of the identity alignment (one tokenizer on both sides): every labelled one."""
    return torch.nonzero(labels.reshape(-1) != IGNORE_INDEX).reshape(-1)


def _fit(mask_or_map: torch.Tensor, size: int, fill) -> torch.Tensor:
    """A ``[n]`` table cut or padded (with ``fill``) to ``size`` (the student's logits may be wider than its
    tokenizer: padded embedding rows, which no teacher id maps to)."""
    n = int(mask_or_map.shape[0])
    if n >= size:
        return mask_or_map[:size]
    return torch.cat([mask_or_map, mask_or_map.new_full((size - n,), fill)])


def xtok_batch_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher_ids: torch.Tensor,
                    teacher_logprobs: torch.Tensor, compared: torch.Tensor, family: torch.Tensor, families,
                    gamma: float, temperature: float = 1.0, loss: str = "forward_kl", beta: float = 0.5,
                    skew: float = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`xtok_distill_loss` for a batch in the student's layout whose rows may come from teachers of
    different tokenizers (``ddk.trainer.xtok_teacher``): ``teacher_ids``/``teacher_logprobs [B, T, k]`` (each row's
    teacher's ids) read where ``compared [B, T]``; row b's teacher is ``families[family[b]]`` (its
    ``teacher_to_student``, ``student_shared`` and ``weights``). ``kl = T^2 * mean over all compared groups`` of
    each group's family-weighted term; one family is :func:`xtok_distill_loss` exactly."""
    div = divergence_fn(loss, beta, skew)
    B, T_len, V_S = student_logits.shape
    ce = cross_entropy(student_logits, labels)
    zero = torch.zeros((), device=ce.device)
    device = student_logits.device
    keep = compared.to(device, torch.bool) & (labels != IGNORE_INDEX)
    C = int(keep.sum())
    if gamma == 0 or C == 0:
        return ce, {"ce": ce.detach(), "kl": zero, "match": zero, "uld": zero}
    Tt = float(temperature)
    row_family = family.to(device, torch.long)[:, None].expand(B, T_len)[keep]        # [C]
    flat_pos = torch.nonzero(keep.reshape(-1)).reshape(-1)
    k = teacher_ids.shape[-1]
    g_ids = teacher_ids.reshape(B * T_len, k)[flat_pos.to(teacher_ids.device)]
    g_lp = teacher_logprobs.reshape(B * T_len, k)[flat_pos.to(teacher_logprobs.device)]
    total = torch.zeros((), device=device, dtype=torch.float32)
    match_sum, uld_sum = zero.clone(), zero.clone()
    for f in torch.unique(row_family).tolist():
        fam = families[f]
        sel = torch.nonzero(row_family == f).reshape(-1)
        logits_f = student_logits.reshape(B * T_len, V_S)[flat_pos[sel]]
        s_logp = torch.log_softmax(logits_f.float() / Tt, dim=-1)
        t2s = fam.teacher_to_student.to(device)
        shared = _fit(fam.student_shared.to(device), V_S, False)
        match, uld = xtok_terms(s_logp, g_ids[sel.to(g_ids.device)], g_lp[sel.to(g_lp.device)], t2s, shared, Tt, div)
        w_match, w_uld = (float(w) for w in fam.weights)
        total = total + (w_match * match + w_uld * uld if w_uld != 0 else w_match * match).sum()
        match_sum, uld_sum = match_sum + match.detach().sum(), uld_sum + uld.detach().sum()
    kl = total / float(C) * (Tt * Tt)
    return ce + gamma * kl, {"ce": ce.detach(), "kl": kl.detach(), "match": match_sum / C, "uld": uld_sum / C}
