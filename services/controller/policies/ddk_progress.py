"""``ddk_progress``: the paper's rule, with each domain's boost discounted by how little its gap closed per token
trained on it (ddk's own policy, for distillation). The rule and its reasoning: docs/architecture.md,
"Policies and formulas".

With d[i] the gap (``Evaluation.gaps``: the run's gap estimate of loss_S[i] - loss_T[i]), q[i] = exp(d[i]),
and, since the previous evaluation, n[i] student tokens trained on domain i and a gap change d_prev[i] - d[i]:

    rate[i] = (d_prev[i] - d[i]) / n[i]                  nats of gap closed per token (domains with n[i] > 0)
    m[i]    = clip(rate[i] / max_j rate[j], m_min, 1)    learnability relative to the fastest domain
    b[i]    = m[i] * (q[i] - 1)   if q[i] > 1,  else  q[i] - 1
    psi[i]  = r_prev[i] * exp(b[i]);    r = alpha * psi / sum(psi) + (1 - alpha) / N

m[i] = 1 (no discount) for a domain without tokens in the interval, and for every domain when no domain's
gap closed (max rate <= 0), when the evaluation carries no ``tokens`` or when the previous one did not
(the fallback). With m = 1 everywhere, psi is r_prev * exp(q) up to a constant factor, so the rule is exactly
``ddk``'s; the first evaluation is ``ddk``'s too (softmax(q)). State: the gaps and cumulative tokens of the
last evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field

from ddk.controller import mixture
from ddk.controller.policies import Evaluation, Policy, register
from ddk.controller.policies.doremi import normalise_log
from ddk.vocab import MAX_EXP


class ProgressParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    min_learnability: float = Field(0.0, ge=0, le=1, description="m_min: the smallest discount factor "
                                    "(1 turns the discount off: ddk)")


def learnability(gaps: Sequence[float], prev_gaps: Sequence[float] | None, tokens: Sequence[float] | None,
                 prev_tokens: Sequence[float] | None, m_min: float = 0.0) -> list[float]:
    """m[i] in [m_min, 1]: gap closed per token of domain i, relative to the fastest-closing domain (pure)."""
    n = len(gaps)
    if prev_gaps is None or tokens is None or prev_tokens is None:
        return [1.0] * n
    rates: list[float | None] = []
    for g, gp, t, tp in zip(gaps, prev_gaps, tokens, prev_tokens):
        trained = t - tp
        rates.append((gp - g) / trained if trained > 0 else None)
    measured = [r for r in rates if r is not None and math.isfinite(r)]
    best = max(measured, default=0.0)
    if best <= 0.0:
        return [1.0] * n
    return [1.0 if r is None or not math.isfinite(r) else min(1.0, max(m_min, r / best)) for r in rates]


def progress_weights(previous: Sequence[float], gaps: Sequence[float], m: Sequence[float],
                     alpha: float) -> list[float]:
    """alpha * normalise(r_prev * exp(b)) + (1 - alpha) / N with b as in the module docstring (pure)."""
    n = len(gaps)
    if all(x == 1.0 for x in m):  # no discount: exactly the paper's update (overflow-safe in mixture)
        psi = mixture.prior_times_exp_q(list(previous), list(gaps))
    else:
        logw = []
        for p, d, mi in zip(previous, gaps, m):
            if p <= 0:
                logw.append(-math.inf)
                continue
            excess = math.expm1(d) if d <= MAX_EXP else math.inf  # q - 1, without overflow
            b = excess if excess <= 0 else (0.0 if mi == 0 else mi * excess)
            logw.append(math.log(p) + b)
        psi = normalise_log(logw)
    floor = (1.0 - alpha) / n
    return [alpha * x + floor for x in psi]


def _vec(m: Mapping | None, domains) -> list[float] | None:
    return None if m is None else [float(m[d]) for d in domains]


def update(state, ev: Evaluation, params: ProgressParams):
    domains = ev.domains
    gaps = ev.gaps()
    new_state = {"gap": dict(zip(domains, gaps)),
                 "tokens": None if ev.tokens is None else {d: float(ev.tokens[d]) for d in domains}}
    if ev.previous is None:  # first evaluation: ddk's softmax(q)
        return dict(zip(domains, mixture.softmax_q(gaps))), new_state
    st = state or {}
    m = learnability(gaps, _vec(st.get("gap"), domains), _vec(ev.tokens, domains), _vec(st.get("tokens"), domains),
                     params.min_learnability)
    w = progress_weights([float(ev.previous[d]) for d in domains], gaps, m, ev.alpha)
    return dict(zip(domains, w)), {**new_state, "learnability": dict(zip(domains, m))}


POLICY = register(Policy("ddk_progress", "ddk, with each domain's boost discounted by how little its gap closed "
                                         "per token trained on it (no tokens: ddk)", update,
                         params=ProgressParams, run_fields=("alpha", "gap_estimate"), rank=4))
