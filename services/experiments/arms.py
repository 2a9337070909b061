"""The arms of ``ddk compare`` (pure): what runs side by side, each a policy plus a loss and a starting mixture.

The fixed-mixture baselines are compare's own (``cpt``: CE only; ``kd``: the fixed natural mixture;
``kd_uniform``: the fixed uniform one); every other arm is a policy that steers the mixture, as the controller's
registry lists them (``ddk.controller.policies.steered()``), so a new policy is an arm without touching this file.
``POLICY+LOSS`` (``ddk+jsd``) is that arm with ``kd.loss: LOSS``, a divergence of ``ddk.vocab.DIVERGENCES``.
"""

from __future__ import annotations

BASELINE_ARMS = ("cpt", "kd", "kd_uniform")
PAPER_ARMS = ("cpt", "kd", "ddk_raw", "ddk")  # the paper's comparison, ddk compare's default


def steered() -> tuple[str, ...]:
    """The arms that are controller policies (the registry's, in its order)."""
    from ddk.controller.policies import steered as registered

    return registered()


def arms() -> tuple[str, ...]:
    """Every arm: the baselines, then every policy that steers."""
    return BASELINE_ARMS + steered()
