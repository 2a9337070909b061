"""``ddk_raw``: r = softmax(q) at every evaluation (the paper's ablation without smoothing). Stateless."""

from __future__ import annotations

from ddk.controller import mixture
from ddk.controller.policies import Evaluation, Policy, register


def update(state, ev: Evaluation, params):
    w = mixture.next_weights("ddk_raw", ev.domains, ev.student_loss, ev.teacher_loss, ev.previous, ev.initial)
    return w, None


POLICY = register(Policy("ddk_raw", "softmax(q) at every evaluation (the paper's ablation without smoothing)",
                         update))
