"""``ddk_raw``: r = softmax(q) at every evaluation, q = exp(gap) (the paper's ablation without smoothing).
Stateless."""

from __future__ import annotations

from ddk.controller import mixture
from ddk.controller.policies import Evaluation, Policy, register


def update(state, ev: Evaluation, params):
    return dict(zip(ev.domains, mixture.softmax_q(ev.gaps()))), None


POLICY = register(Policy("ddk_raw", "softmax(q) at every evaluation (the paper's ablation without smoothing)",
                         update, run_fields=("gap_estimate",), rank=1))
