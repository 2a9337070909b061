"""``fixed``: the run's initial weights forever (the KD and CPT baselines); teacher losses optional."""

from __future__ import annotations

from ddk.controller.policies import Evaluation, Policy, register


def update(state, ev: Evaluation, params):
    return dict(ev.initial), None


POLICY = register(Policy("fixed", "the initial weights forever (the KD and CPT baselines)", update,
                         needs_teacher=False, rank=2))
