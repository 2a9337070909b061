"""The Trainer's own state: what a checkpoint must hold besides the model, optimiser, schedule and RNG, the
mixture (ddk.trainer.mixture_sync.MixtureSync) and each rank's sampler position (the teacher feed's).

:class:`TrainState` is plain data (no torch): ``state_dict()`` gives JSON-able values, ``load_state_dict()``
puts them back. It is the ``trainer`` entry of a checkpoint (ddk.trainer.parallel.Distributed), beside the
``mixture`` entry and each rank's ``sampler`` entry.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainState:
    """One rank's training state after ``step`` optimiser steps.

    ``teacher_loss``: the teacher's per-domain validation losses (the first student evaluation for CPT).
    ``tokens``: student tokens trained on each domain so far, all ranks together (sent with each evaluation, for
    the controller's ``ddk_progress`` policy); in ``state_dict()`` only once non-empty. ``scaler``: the fp16
    GradScaler's state (``train.precision: fp16``); in ``state_dict()`` only when set.
    """

    step: int = 0
    teacher_loss: dict[str, float] | None = None
    tokens: dict[str, float] = field(default_factory=dict)
    scaler: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (copies: later changes to this state do not reach the result)."""
        out: dict[str, Any] = {"step": int(self.step),
                               "teacher_loss": None if self.teacher_loss is None else
                               {k: float(v) for k, v in self.teacher_loss.items()}}
        if self.tokens:
            out["tokens"] = {k: float(v) for k, v in self.tokens.items()}
        if self.scaler is not None:
            out["scaler"] = copy.deepcopy(self.scaler)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace every field from ``state`` (as :meth:`state_dict` returns it; all but ``step`` may be absent)."""
        self.step = int(state["step"])
        tl = state.get("teacher_loss")
        self.teacher_loss = None if tl is None else {k: float(v) for k, v in tl.items()}
        self.tokens = {k: float(v) for k, v in (state.get("tokens") or {}).items()}
        self.scaler = copy.deepcopy(state.get("scaler"))
