"""``ddk``: the paper's smoothed update (ddk.controller.mixture.next_weights, unchanged).

First evaluation r = softmax(q); later psi = r_prev * exp(q), r = alpha * psi / sum(psi) + (1 - alpha) / N.
Stateless: r_prev is the previous version's weights, which the store keeps anyway.
"""

from __future__ import annotations

from ddk.controller import mixture
from ddk.controller.policies import Evaluation, Policy, register


def update(state, ev: Evaluation, params):
    w = mixture.next_weights("ddk", ev.domains, ev.student_loss, ev.teacher_loss, ev.previous, ev.initial, ev.alpha)
    return w, None


POLICY = register(Policy("ddk", "the paper's rule: softmax(q) first, then r_prev*exp(q) smoothed by alpha",
                         update, run_fields=("alpha",)))
