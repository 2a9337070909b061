"""``ddk``: the paper's smoothed update (Liu et al. 2024, arXiv 2407.16154).

With q[i] = exp(d[i]), d the gaps (``Evaluation.gaps``: the run's gap estimate of loss_S - loss_T):

    first evaluation:   r = softmax(q)
    later evaluations:  psi[i] = r_prev[i] * exp(q[i]);   r = alpha * psi / sum(psi) + (1 - alpha) / N

Stateless: r_prev is the previous version's weights, which the store keeps anyway. Overflow-safe through
``ddk.controller.mixture.prior_times_exp_q``.
"""

from __future__ import annotations

from collections.abc import Sequence

from ddk.controller import mixture
from ddk.controller.policies import Evaluation, Policy, register


def ddk_weights(gaps: Sequence[float], previous: Sequence[float] | None, alpha: float) -> list[float]:
    """The paper's rule (pure): softmax(q) when ``previous`` is None, else alpha * normalise(r_prev * exp(q)) +
    (1 - alpha) / N. ``previous`` >= 0 with a positive sum, ``alpha`` in [0, 1] (checked by the run spec)."""
    if previous is None:
        return mixture.softmax_q(gaps)
    psi = mixture.prior_times_exp_q(previous, gaps)
    floor = (1.0 - alpha) / len(gaps)
    return [alpha * p + floor for p in psi]


def update(state, ev: Evaluation, params):
    previous = None if ev.previous is None else [float(ev.previous[d]) for d in ev.domains]
    return dict(zip(ev.domains, ddk_weights(ev.gaps(), previous, ev.alpha))), None


POLICY = register(Policy("ddk", "the paper's rule: softmax(q) first, then r_prev*exp(q) smoothed by alpha",
                         update, run_fields=("alpha", "gap_estimate"), rank=0))
