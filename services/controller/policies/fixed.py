"""``fixed``: the run's initial weights forever (the KD and CPT baselines); teacher losses optional."""

from __future__ import annotations

from ddk.controller import mixture
from ddk.controller.policies import Evaluation, Policy, register


def update(state, ev: Evaluation, params):
    return mixture.next_weights("fixed", ev.domains, ev.student_loss, ev.teacher_loss, ev.previous, ev.initial), None


POLICY = register(Policy("fixed", "the initial weights forever (the KD and CPT baselines)", update,
                         needs_teacher=False))
