"""The arms of ``ddk compare`` (pure): what runs side by side, each a policy plus a loss and a starting mixture.

The fixed-mixture baselines are compare's own (``cpt``: CE only; ``kd``: the fixed natural mixture;
``kd_uniform``: the fixed uniform one; ``seqkd``: CE only on the teacher's own greedy answers,
ddk.experiments.seqkd); every other arm is a policy that steers the mixture, as the controller's
registry lists them (``ddk.controller.policies.steered()``), so a new policy is an arm without touching this file.
``POLICY+LOSS`` (``ddk+jsd``) is that arm with ``kd.loss: LOSS``, a divergence of ``ddk.vocab.DIVERGENCES``.
``ARM@MODIFIER`` is that arm changed by a modifier of :data:`MODIFIERS`: ``@onpolicy`` (``ddk@onpolicy``,
``kd_uniform@onpolicy``) is the arm with ``kd.on_policy: 1`` and ``rollout.engine: hf`` (every row's completion
written by the current student and graded by the teacher; ddk.trainer's on-policy distillation).
"""

from __future__ import annotations

from ddk.errors import UsageError

BASELINE_ARMS = ("cpt", "kd", "kd_uniform", "seqkd")
PAPER_ARMS = ("cpt", "kd", "ddk_raw", "ddk")  # the paper's comparison, ddk compare's default
# arm modifiers: the config changes each adds to its arm
MODIFIERS = {"onpolicy": {"kd.on_policy": 1, "rollout.engine": "hf"}}
NO_TEACHER_ARMS = ("cpt", "seqkd")  # CE only: no modifier that needs the teacher's grading applies


def steered() -> tuple[str, ...]:
    """The arms that are controller policies (the registry's, in its order)."""
    from ddk.controller.policies import steered as registered

    return registered()


def arms() -> tuple[str, ...]:
    """Every arm: the baselines, then every policy that steers."""
    return BASELINE_ARMS + steered()


def split_modifier(arm: str) -> tuple[str, str | None]:
    """``("ddk+jsd", "onpolicy")`` from ``"ddk+jsd@onpolicy"``; ``(arm, None)`` without one. An unknown modifier,
    or one on a CE-only arm, is exit 2 listing the allowed ones."""
    if "@" not in arm:
        return arm, None
    base, _, mod = arm.partition("@")
    if mod not in MODIFIERS:
        raise UsageError(f"--policies: unknown arm modifier @{mod} in {arm!r} (choose from "
                         f"{', '.join('@' + m for m in MODIFIERS)}, e.g. ddk@onpolicy)")
    if base.partition("+")[0] in NO_TEACHER_ARMS:
        raise UsageError(f"--policies: {arm!r}: {base} trains on CE only, so @{mod} does not apply (use it on "
                         f"{', '.join(a for a in arms() if a not in NO_TEACHER_ARMS)})")
    return base, mod


def base_policy(arm: str) -> str:
    """The policy of an arm without its divergence and modifier (``ddk`` of ``ddk+jsd@onpolicy``). Pure."""
    return arm.partition("@")[0].partition("+")[0]


def is_variant(arm: str) -> bool:
    """Whether an arm is a distillation method beside the mixture baselines (``seqkd`` or an ``@`` modifier's),
    which compare pairs with ``kd`` and ``ddk`` whatever its mixture. Pure."""
    return "@" in arm or base_policy(arm) == "seqkd"
