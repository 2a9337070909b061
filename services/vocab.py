"""The vocabulary the three services share: one name for one idea (pure, no I/O, no third-party imports).

- **policies**: how the controller turns evaluations into weights; their names are the registry's
  (``ddk.controller.policies.names()``, each policy a plug-in module there), not a list here;
- **arms**: what ``ddk compare`` runs side by side (``ddk.experiments.arms``: the fixed-mixture baselines plus
  every policy that steers);
- **divergences**: the distillation losses ``kd.loss`` names (:data:`DIVERGENCES`; ``ddk.trainer.loss`` computes
  them, the train config and ``ddk compare`` read the names here without importing torch);
- **run_id**: the one rule for a run's name (it is a URL segment, a folder name and Ray Train's run name);
- **ratio**: q = PPL_S / PPL_T per domain, the number the whole method turns on;
- **signals**: what q measures (:data:`SIGNALS`, ``mixture.signal``): the ratio, or the accuracy or on-policy gap;
- **weights version**: ``{version, step, weights, updated_at}``, what the controller serves and the trainer draws with;
- **interval_steps**: K, the optimiser steps between two evaluations (one name in the config, the controller's
  run spec and the API).
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Mapping
from typing import TypedDict

# -- divergences (kd.loss) -----------------------------------------------------------------------------------
# The one list of divergence names: ddk.trainer.loss.LOSSES is this tuple (its functions keyed by these names),
# the train config's kd.loss and ddk compare's POLICY+LOSS arms accept exactly these.
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_rkl", "tvd")

# -- gap signals (mixture.signal) ----------------------------------------------------------------------------
# The one list of what the controller's q per domain measures: the train config's mixture.signal, the API's
# evaluation field ``signal`` and the page's label read these (ddk.trainer.gap_signal computes the non-ratio ones).
#   ratio:    q = PPL_S / PPL_T on the validation blocks (the paper's signal, the default)
#   accuracy: q = (acc_T + eps) / (acc_S + eps), greedy task accuracy on the validation prompts, eps = 1 / (2n)
#   onpolicy: q = exp(mean over the student's own completion tokens of log p_S - log p_T)
SIGNALS = ("ratio", "accuracy", "onpolicy")
SIGNAL_LABELS = {"ratio": "PPL_S/PPL_T", "accuracy": "accuracy gap (acc_T+e)/(acc_S+e)",
                 "onpolicy": "on-policy exp(reverse KL)"}

# -- an on-policy step's numbers (issue 28) --------------------------------------------------------------------
# The fields of the progress report's ``onpolicy`` object, as the trainer's metrics.jsonl ``onpolicy`` record names
# them: seconds in generation, teacher grading and training the rollout rows, rollout tokens per second of
# generation, the engine's weight version lag (steps), and the mean completion length (tokens) per domain. The
# trainer sends them (ddk.trainer.loop.onpolicy_progress), the controller checks and stores them.
ONPOLICY_NUMBERS = ("generation_s", "grading_s", "training_s", "rollout_tokens_per_s")
ONPOLICY_FIELDS = (*ONPOLICY_NUMBERS, "version_lag", "completion_len")

# -- run ids -------------------------------------------------------------------------------------------------
RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
RUN_ID_RULE = "1-128 characters of letters, digits and . _ - (starting with a letter or digit)"
_RUN_ID = re.compile(RUN_ID_PATTERN)


def is_run_id(value: object) -> bool:
    """True when ``value`` is a valid run id (:data:`RUN_ID_RULE`).

    ``fullmatch``, not ``match``: Python's ``$`` also matches before a trailing newline, and ``"run\\n"`` is
    not a name a URL segment or a folder should carry. (JSON Schema and pydantic read :data:`RUN_ID_PATTERN`
    with ``$`` as the end of the text, which is the same rule.)
    """
    return isinstance(value, str) and _RUN_ID.fullmatch(value) is not None


# -- the student/teacher ratio -------------------------------------------------------------------------------
# exp(x) overflows a double just above 709.78; a larger loss gap gives the largest finite double.
MAX_EXP = 709.0


def ratio(student_loss: Mapping[str, float], teacher_loss: Mapping[str, float]) -> dict[str, float]:
    """q[d] = PPL_S[d] / PPL_T[d] = exp(loss_S[d] - loss_T[d]) per domain of ``student_loss``.

    Losses are mean cross-entropies in nats per token. A ratio too large for a double (gap > ~709 nats) is
    clipped to the largest finite double so that it stays JSON-serialisable; the mixture math never uses it.
    """
    out = {}
    for d in student_loss:
        gap = float(student_loss[d]) - float(teacher_loss[d])
        out[d] = math.exp(gap) if gap <= MAX_EXP else sys.float_info.max
    return out


# -- a weights version ---------------------------------------------------------------------------------------
class WeightsVersion(TypedDict):
    """One version of a run's mixture, as the controller serves it (``GET /v1/runs/{run_id}/weights``).

    ``version`` 0 is the initial mixture (``step`` None); version v > 0 answers the evaluation at ``step``.
    ``updated_at`` is when it was recorded: ISO 8601 UTC with milliseconds (``2026-12-01T21:00:00.000Z``).
    """

    version: int
    step: int | None
    weights: dict[str, float]
    updated_at: str


def weights_version(version: int, step: int | None, weights: Mapping[str, float],
                    updated_at: str) -> WeightsVersion:
    """The one constructor of a :class:`WeightsVersion` (plain JSON types, the domains in their order)."""
    return WeightsVersion(version=int(version), step=None if step is None else int(step),
                          weights={d: float(w) for d, w in weights.items()}, updated_at=str(updated_at))
