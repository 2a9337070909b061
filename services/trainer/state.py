"""The trainer's own state: what a checkpoint must hold besides the model, optimiser, schedule and RNG.

:class:`TrainState` is plain data (no torch): ``state_dict()`` gives JSON-able values, ``load_state_dict()``
puts them back; :func:`ddk.trainer.checkpoint.save_training` / :func:`~ddk.trainer.checkpoint.load_training`
write and read it in the checkpoint's safetensors + JSON files (no pickle).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainState:
    """One rank's training state after ``step`` optimiser steps.

    ``weights``/``version``: the mixture the next batches are drawn with (rank 0's, broadcast every step).
    ``teacher_loss``: the teacher's per-domain validation losses (the first student evaluation for CPT).
    ``pending``: the evaluation rank 0 has not yet got through to the controller,
    ``{"step", "student_loss", "teacher_loss"}``, a list of them oldest first when several intervals went
    unposted, or None. ``sampler``: this rank's sampler state after the
    last batch trained on (``DomainSampler.state_dict()``), None before the first save. ``tokens``: student
    tokens trained on each domain so far, all ranks together (sent with each evaluation, for the controller's
    ``ddk_progress`` policy); in ``state_dict()`` only once non-empty, so older checkpoints load as {}.
    ``scaler``: the fp16 GradScaler's state (``train.precision: fp16``); in ``state_dict()`` only when set.
    """

    step: int = 0
    weights: dict[str, float] = field(default_factory=dict)
    version: int = 0
    teacher_loss: dict[str, float] | None = None
    pending: dict[str, Any] | list[dict[str, Any]] | None = None
    sampler: dict[str, Any] | None = None
    tokens: dict[str, float] = field(default_factory=dict)
    scaler: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (copies: later changes to this state do not reach the result)."""
        out = {"step": int(self.step), "weights": {k: float(v) for k, v in self.weights.items()},
               "version": int(self.version),
               "teacher_loss": None if self.teacher_loss is None else {k: float(v) for k, v in
                                                                       self.teacher_loss.items()},
               "pending": copy.deepcopy(self.pending), "sampler": copy.deepcopy(self.sampler)}
        if self.tokens:
            out["tokens"] = {k: float(v) for k, v in self.tokens.items()}
        if self.scaler is not None:
            out["scaler"] = copy.deepcopy(self.scaler)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace every field from ``state`` (as :meth:`state_dict` returns it; the last five may be absent)."""
        self.step = int(state["step"])
        self.weights = {k: float(v) for k, v in state["weights"].items()}
        self.version = int(state["version"])
        tl = state.get("teacher_loss")
        self.teacher_loss = None if tl is None else {k: float(v) for k, v in tl.items()}
        self.pending = copy.deepcopy(state.get("pending"))
        self.sampler = copy.deepcopy(state.get("sampler"))
        self.tokens = {k: float(v) for k, v in (state.get("tokens") or {}).items()}
        self.scaler = copy.deepcopy(state.get("scaler"))
