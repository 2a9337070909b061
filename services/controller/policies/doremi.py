"""``doremi``: DoReMi's domain-weight update (Xie et al., NeurIPS 2023, Algorithm 1), the teacher as the
reference model.

At each evaluation, with the excess loss clipped at 0 (DoReMi's lambda) and the previous weights alpha_prev
(the run's initial weights before the first evaluation), d the gaps (``Evaluation.gaps``: the run's gap estimate
of loss_S - loss_T):

    excess[i] = max(d[i], 0)
    a[i]      = alpha_prev[i] * exp(eta * excess[i]),  normalised      (exponentiated gradient)
    alpha[i]  = (1 - c) * a[i] + c / N                                 (smoothing: every domain keeps c / N)

Defaults are DoReMi's: eta = 1, c = 1e-3. DoReMi trains the final model with the average of the alphas over
its steps; the state keeps that average (``average``) and the evaluations counted (``evaluations``), so the
history shows it, while the trainer draws with the current alpha (an online run has no second pass).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field

from ddk.controller.policies import Evaluation, Policy, register


class DoremiParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    eta: float = Field(1.0, gt=0, le=1e6, description="step size of the exponentiated-gradient update")
    smoothing: float = Field(1e-3, ge=0, le=1, description="c: mixed-in share of the uniform mixture")


def normalise_log(logw: Sequence[float]) -> list[float]:
    """exp(logw) normalised, without overflow; entries of +inf share the whole mass equally, -inf get 0."""
    top = max(logw)
    if top == math.inf:
        hits = [1.0 if x == math.inf else 0.0 for x in logw]
        return [h / sum(hits) for h in hits]
    w = [math.exp(x - top) for x in logw]
    total = sum(w)
    return [x / total for x in w]


def doremi_weights(prior: Sequence[float], excess: Sequence[float], eta: float, c: float) -> list[float]:
    """(1 - c) * normalise(prior * exp(eta * excess)) + c / N; prior >= 0 with a positive sum, excess >= 0."""
    logw = []
    for p, x in zip(prior, excess):
        step = eta * x
        logw.append(-math.inf if p <= 0 else (math.log(p) + step if math.isfinite(step) else math.inf))
    n = len(prior)
    return [(1.0 - c) * a + c / n for a in normalise_log(logw)]


def update(state, ev: Evaluation, params: DoremiParams):
    excess = [max(g, 0.0) for g in ev.gaps()]
    prior_map: Mapping[str, float] = ev.previous if ev.previous is not None else ev.initial
    alpha = doremi_weights([float(prior_map[d]) for d in ev.domains], excess, params.eta, params.smoothing)
    weights = dict(zip(ev.domains, alpha))
    n_prev = int(state["evaluations"]) if state else 0
    avg_prev = state["average"] if state else None
    average = {d: (weights[d] if avg_prev is None else (avg_prev[d] * n_prev + weights[d]) / (n_prev + 1))
               for d in ev.domains}
    return weights, {"evaluations": n_prev + 1, "average": average}


POLICY = register(Policy("doremi", "DoReMi: exponentiated gradient on the clipped excess loss loss_S - loss_T, "
                                   "smoothed towards uniform", update, params=DoremiParams,
                         run_fields=("gap_estimate",), rank=3))
