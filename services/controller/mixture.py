"""The mixture math the policies share (pure functions, no I/O): the overflow-safe "prior times exp(q)"
update and the estimate of each domain's gap. Each policy's own rule lives in its module
(``ddk.controller.policies``); nothing here knows a policy's name.

The DDK paper (Liu et al., NeurIPS 2024, arXiv 2407.16154) re-weights the domains every K steps by how
far the student lags the teacher on each domain's validation set:

    PPL = exp(loss)                  loss: mean cross-entropy in nats per token
    q[i] = PPL_S[i] / PPL_T[i]       = exp(loss_S[i] - loss_T[i])
    first evaluation:   r = softmax(q)
    later evaluations:  psi[i] = r_prev[i] * exp(q[i])
                        r = alpha * psi / sum(psi) + (1 - alpha) / N

Why the log-space care: q itself is an exponential, and softmax(q) exponentiates it again, so a loss gap of
only ~6.6 nats already makes exp(q) overflow a double, and a gap over ~709 nats overflows q. Both updates
are "prior times exp(q), normalised" (:func:`prior_times_exp_q`), computed as

    w[i] ∝ prior[i] * exp(q[i] - q_max)    with   q_max - q[i] = exp(d_max) * (1 - exp(d[i] - d_max)),

d = loss_S - loss_T (the *gap*, log q), computing the (non-negative) gap q_max - q[i] from d directly (expm1, in
log space) so that it never overflows to a NaN: a gap too large for a double is +inf and its weight is exactly 0.
The result is finite, non-negative and sums to 1 for any finite gaps.

The gap estimate (:func:`estimate_gaps`; docs/architecture.md, "The gap estimate"): ``raw`` is d as measured;
``shrunk`` pulls each d[i] towards the mean of the domains by how noisy it is (its standard error, sent by the
trainer) relative to how much the domains really differ (empirical Bayes). The same function says when the
domains' gaps are within their standard errors: the mixture is then steering by noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ddk.vocab import MAX_EXP as _MAX_EXP  # beyond this a q gap is treated as +inf (weight 0)

__all__ = ["GAP_ESTIMATES", "NOISE_WARNING", "GapEstimate", "estimate_gaps", "prior_times_exp_q", "softmax_q",
           "uniform"]

# how a policy reads each domain's gap (the run spec's ``gap_estimate``; the trainer's mixture.gap_estimate)
GAP_ESTIMATES = ("raw", "shrunk")
NOISE_WARNING = "the mixture is steering by noise; raise eval tokens"


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


def softmax_q(gaps: Sequence[float]) -> list[float]:
    """softmax(q) with q = exp(gaps): the paper's first-evaluation rule (and ``ddk_raw``'s every time)."""
    return prior_times_exp_q([1.0] * len(gaps), gaps)


# -- the gap estimate ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GapEstimate:
    """Each domain's gap as a policy should read it, and what the standard errors say about them.

    gaps:      the estimated log-ratios d[i] (``raw``: as measured; ``shrunk``: pulled towards ``mean``);
    mean:      m, the plain mean of the measured gaps;
    tau2:      the between-domain variance max(0, s^2 - mean(se^2)) (None: no standard error was sent);
    noise:     True when the domains' gaps are within their standard errors (tau2 == 0 with a positive se):
               the differences the mixture steers by are noise (:data:`NOISE_WARNING`).
    """

    gaps: list[float]
    mean: float
    tau2: float | None
    noise: bool


def estimate_gaps(gaps: Sequence[float], se: Sequence[float | None] | None = None,
                  how: str = "raw") -> GapEstimate:
    """The gap estimate of docs/architecture.md, "The gap estimate" (pure; the inputs are trusted: finite gaps,
    standard errors finite and >= 0 or None).

    gaps: the measured log-ratios x[i] = loss_S[i] - loss_T[i]; se: the standard error of each (None, or an entry
    None, when unknown: a domain with a single document; taken as 0, i.e. its gap is kept as measured);
    how: ``raw`` (the gaps as measured) or ``shrunk`` (empirical-Bayes shrinkage towards their mean):

        m     = mean(x)
        s^2   = sum((x[i] - m)^2) / (N - 1)        (E[s^2] = tau^2 + mean(se^2) when x[i] = theta[i] + noise)
        tau^2 = max(0, s^2 - mean(se^2))
        x'[i] = m + tau^2 / (tau^2 + se[i]^2) * (x[i] - m)     (a domain with se[i] = 0 keeps x[i])

    With every standard error 0 or missing, x' is x, bit for bit (``shrunk`` is then ``raw``).
    """
    x = [float(g) for g in gaps]
    n = len(x)
    mean = math.fsum(v / n for v in x) if n else 0.0  # divided first: finite gaps near the float limit cannot overflow
    s = [0.0 if v is None else float(v) for v in se] if se is not None else [0.0] * n
    if se is None or not any(v > 0.0 for v in s):
        return GapEstimate(x, mean, None if se is None or n < 2 else _tau2(x, s, mean), False)
    if n < 2:  # one domain: no between-domain variance to estimate, nothing to steer
        return GapEstimate(x, mean, None, False)
    tau2 = _tau2(x, s, mean)
    noise = tau2 == 0.0
    if how == "raw" or math.isinf(tau2):  # gaps spread beyond the float range: nothing to shrink toward
        return GapEstimate(x, mean, tau2, noise)
    if how != "shrunk":
        raise ValueError(f"how: must be one of {list(GAP_ESTIMATES)}, got {how!r}")
    out = []
    for xi, si in zip(x, s):
        denom = tau2 + si * si
        if si == 0.0 or denom == 0.0:  # known exactly (or se^2 below the smallest double): kept as measured
            out.append(xi)
            continue
        b = tau2 / denom
        out.append(mean + b * (xi - mean))
    return GapEstimate(out, mean, tau2, noise)


def _tau2(x: list[float], s: list[float], mean: float) -> float:
    """max(0, s^2 - mean(se^2)); inf when the gaps' spread is beyond the float range (finite gaps of ~1e308: the
    squares overflow), which is a spread and not noise."""
    n = len(x)
    try:
        sample_var = math.fsum((v - mean) * (v - mean) for v in x) / (n - 1)
        return max(0.0, sample_var - math.fsum(v * v for v in s) / n)
    except OverflowError:  # math.fsum's intermediate overflow
        return math.inf
