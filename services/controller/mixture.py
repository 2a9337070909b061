"""DDK domain-mixture math (pure functions, no I/O).

The DDK paper (Liu et al., NeurIPS 2024, arXiv 2407.16154) re-weights the domains every K steps by how
far the student lags the teacher on each domain's validation set:

    PPL = exp(loss)                  loss: mean cross-entropy in nats per token
    q[i] = PPL_S[i] / PPL_T[i]       = exp(loss_S[i] - loss_T[i])
    first evaluation:   r = softmax(q)
    later evaluations:  psi[i] = r_prev[i] * exp(q[i])
                        r = alpha * psi / sum(psi) + (1 - alpha) / N

``ddk_raw`` (the paper's ablation without smoothing) uses r = softmax(q) at every evaluation, and
``fixed`` (the KD and CPT baselines) keeps the initial weights forever.

Why the log-space care: q itself is an exponential, and softmax(q) exponentiates it again, so a loss gap of
only ~6.6 nats already makes exp(q) overflow a double, and a gap over ~709 nats overflows q. Both updates
are "prior times exp(q), normalised", so we write them as

    w[i] ∝ prior[i] * exp(q[i] - q_max)    with   q_max - q[i] = exp(d_max) * (1 - exp(d[i] - d_max)),

d = loss_S - loss_T, computing the (non-negative) gap q_max - q[i] from d directly (expm1, in log space) so
that it never overflows to a NaN: a gap too large for a double is +inf and its weight is exactly 0. The
result is finite, non-negative and sums to 1 for any finite losses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

# The policy names and q = PPL_S / PPL_T (for display and the history) are the shared vocabulary's; they are
# re-exported here for the callers that read them as mixture.POLICIES / mixture.ratio.
from ddk.vocab import MAX_EXP as _MAX_EXP  # beyond this a q gap is treated as +inf (weight 0)
from ddk.vocab import POLICIES, ratio

__all__ = ["POLICIES", "next_weights", "prior_times_exp_q", "ratio", "uniform"]


def uniform(domains: Sequence[str]) -> dict[str, float]:
    """Equal weight on every domain (the default initial mixture)."""
    return {d: 1.0 / len(domains) for d in domains}


def _exp_q_gaps(gaps: Sequence[float], support: Sequence[bool]) -> list[float]:
    """q_max - q[i] >= 0 for q = exp(gaps), where q_max is taken over the indices in ``support``.

    Computed as exp(d_max + log(1 - exp(d[i] - d_max))) so that neither q nor the difference overflows;
    a gap too large for a double comes back as +inf. Indices with d[i] > d_max (outside the support) are
    never used by the caller, so they get 0.
    """
    d_max = max(d for d, s in zip(gaps, support) if s)
    out = []
    for d in gaps:
        if d >= d_max:
            out.append(0.0)
            continue
        log_gap = d_max + math.log(-math.expm1(d - d_max))
        out.append(math.exp(log_gap) if log_gap <= _MAX_EXP else math.inf)
    return out


def prior_times_exp_q(prior: Sequence[float], gaps: Sequence[float]) -> list[float]:
    """Normalise prior[i] * exp(q[i]) with q[i] = exp(gaps[i]); prior >= 0 with a positive sum.

    With a uniform prior this is softmax(q). Domains with prior 0 stay at 0.
    """
    support = [p > 0.0 for p in prior]
    if not any(support):
        raise ValueError("prior has no positive entry")
    q_gaps = _exp_q_gaps(gaps, support)
    # log-weights shifted by log-max so the largest term is exp(0) = 1 and nothing overflows
    logw = [math.log(p) - g if s else -math.inf for p, g, s in zip(prior, q_gaps, support)]
    top = max(logw)
    w = [math.exp(lw - top) for lw in logw]
    total = sum(w)  # >= 1: the argmax contributes exp(0)
    return [x / total for x in w]


def _check_losses(name: str, losses: Mapping[str, float], domains: Sequence[str]) -> None:
    if set(losses) != set(domains):
        missing = sorted(set(domains) - set(losses))
        unknown = sorted(set(losses) - set(domains))
        raise ValueError(f"{name}: missing domains {missing}, unknown domains {unknown}")
    for d, v in losses.items():
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0.0):
            raise ValueError(f"{name}.{d}: must be a finite non-negative number, got {v!r}")


def next_weights(
    policy: str,
    domains: Sequence[str],
    student_loss: Mapping[str, float],
    teacher_loss: Mapping[str, float] | None,
    previous: Mapping[str, float] | None,
    initial: Mapping[str, float] | None = None,
    alpha: float = 0.5,
) -> dict[str, float]:
    """The mixture for the next interval, given this evaluation's losses.

    policy:   "ddk" | "ddk_raw" | "fixed" (computed here), or another registered policy (ddk.controller.policies),
              called with no state and its default parameters
    previous: the weights from the previous *evaluation* (r_prev), or None when this is the run's first
              evaluation (the initial weights of version 0 are not r_prev: the paper starts from softmax(q)).
    initial:  the run's initial weights (``fixed`` keeps them; uniform when None).
    """
    if policy not in POLICIES:
        raise ValueError(f"policy: must be one of {list(POLICIES)}, got {policy!r}")
    if policy not in _OWN:  # a plug-in policy (ddk.controller.policies), stateless here: its default params
        return _plugin_weights(policy, domains, student_loss, teacher_loss, previous, initial, alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: must be in [0, 1], got {alpha!r}")
    if policy == "fixed":
        return dict(initial) if initial is not None else uniform(domains)
    if teacher_loss is None:
        raise ValueError("teacher_loss: required for policy " + policy)
    _check_losses("student_loss", student_loss, domains)
    _check_losses("teacher_loss", teacher_loss, domains)

    gaps = [student_loss[d] - teacher_loss[d] for d in domains]  # log q
    n = len(domains)
    if policy == "ddk_raw" or previous is None:
        r = prior_times_exp_q([1.0] * n, gaps)  # softmax(q)
        return dict(zip(domains, r))

    # ddk, later evaluations: psi = r_prev * exp(q), then smooth towards uniform
    prev = [float(previous[d]) for d in domains]
    psi = prior_times_exp_q(prev, gaps)
    floor = (1.0 - alpha) / n
    return {d: alpha * p + floor for d, p in zip(domains, psi)}


_OWN = ("ddk", "ddk_raw", "fixed")  # the policies computed in this module; the plug-ins call next_weights


def _plugin_weights(policy, domains, student_loss, teacher_loss, previous, initial, alpha) -> dict[str, float]:
    from ddk.controller import policies

    p = policies.get(policy)
    if teacher_loss is None and p.needs_teacher:
        raise ValueError("teacher_loss: required for policy " + policy)
    _check_losses("student_loss", student_loss, domains)
    if teacher_loss is not None:
        _check_losses("teacher_loss", teacher_loss, domains)
    ev = policies.Evaluation(0, tuple(domains), dict(student_loss),
                             None if teacher_loss is None else dict(teacher_loss), None,
                             None if previous is None else dict(previous),
                             dict(initial) if initial is not None else uniform(domains), alpha)
    weights, _ = p.update(None, ev, p.params())
    return weights
