"""The controller's mixture policies as plug-ins: one small pure module per policy, registered by name.

A policy is a :class:`Policy`: a name, a pydantic model of its own parameters (``policy_params`` of
``POST /v1/runs``, every field with a default), and one pure function

    update(state, evaluation, params) -> (weights, state)

``state`` is what the policy kept from its previous evaluation (None on the run's first, and on runs recorded
before states were stored); it must be plain JSON (dicts, lists, strings, finite numbers, None), because the
store writes it next to each version in SQLite, which is how a restarted controller continues a run.
``evaluation`` (:class:`Evaluation`) is this evaluation's losses plus what the run already knows: its domains,
initial weights, ``alpha``, ``gap_estimate`` and the weights of the previous evaluation; a policy reads each
domain's gap through :meth:`Evaluation.gaps` (the run's gap estimate, ``ddk.controller.mixture.estimate_gaps``).
``weights`` must be finite, non-negative and sum to 1 over the run's domains. The inputs are checked once, where
they enter (``spec.check_evaluation``): a policy trusts them.

The registry finds the policies by itself: every module of this package that calls :func:`register` at import.
It is the one list of policy names: the controller's run spec, the train config (``mixture.policy``) and
``ddk compare``'s arms read :func:`names` and :func:`steered`. Adding one is one file here; docs/architecture.md,
"Policies and formulas", has an example.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

from ddk.controller.mixture import GapEstimate, estimate_gaps

State = Any  # plain JSON, or None


@dataclass(frozen=True)
class Evaluation:
    """One evaluation as a policy sees it. Losses in nats per token, keyed by the run's domains.

    teacher_loss: None only for a policy with ``needs_teacher=False`` that never got one.
    tokens:       student tokens trained on each domain so far (cumulative, from the trainer), or None when
                  the trainer did not send them (older trainers).
    previous:     the weights of the previous evaluation, or None on the run's first evaluation.
    initial:      the run's initial weights (version 0).
    alpha:        the run's top-level ``alpha`` (the paper's smoothing; read by the policies that use it).
    log_ratio_se: per domain the standard error of log(PPL_S / PPL_T) (any of the domains), or None.
    gap_estimate: the run's ``gap_estimate``: how :meth:`gaps` reads the gaps (``raw`` or ``shrunk``).
    """

    step: int
    domains: tuple[str, ...]
    student_loss: Mapping[str, float]
    teacher_loss: Mapping[str, float] | None
    tokens: Mapping[str, float] | None
    previous: Mapping[str, float] | None
    initial: Mapping[str, float]
    alpha: float = 0.5
    log_ratio_se: Mapping[str, float] | None = None
    gap_estimate: str = "raw"

    @cached_property
    def estimate(self) -> GapEstimate:
        """The gap estimate of this evaluation (needs the teacher's losses)."""
        measured = [float(self.student_loss[d]) - float(self.teacher_loss[d]) for d in self.domains]
        se = None if self.log_ratio_se is None else [self.log_ratio_se.get(d) for d in self.domains]
        return estimate_gaps(measured, se, self.gap_estimate)

    def gaps(self) -> list[float]:
        """Each domain's gap log q = loss_S - loss_T as the run's gap estimate reads it, in the domains' order."""
        return list(self.estimate.gaps)


class NoParams(BaseModel):
    """The parameters of a policy that has none (``policy_params`` must be empty)."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class UpdateFn(Protocol):
    def __call__(self, state: State, evaluation: Evaluation, params: BaseModel) -> tuple[dict[str, float], State]:
        ...


@dataclass(frozen=True)
class Policy:
    """A registered policy. ``params``: a pydantic model whose fields all have defaults (extra="forbid");
    ``needs_teacher``: the run's first evaluation must carry teacher losses, and the policy steers the mixture by
    them (:func:`steered`); ``run_fields``: the top-level run spec fields it reads (``alpha``, ``gap_estimate``),
    listed by ``GET /v1/policies``; ``rank``: where :func:`names` lists it (then by name)."""

    name: str
    summary: str
    update: UpdateFn
    params: type[BaseModel] = NoParams
    needs_teacher: bool = True
    run_fields: tuple[str, ...] = field(default_factory=tuple)
    rank: int = 1000


_REGISTRY: dict[str, Policy] = {}


def register(policy: Policy) -> Policy:
    """Add a policy under its name (once: a second one with the same name is an error)."""
    if policy.name in _REGISTRY and _REGISTRY[policy.name] is not policy:
        raise ValueError(f"policy {policy.name!r} is registered twice")
    for name, f in policy.params.model_fields.items():
        if f.is_required():
            raise ValueError(f"policy {policy.name!r}: parameter {name!r} needs a default")
    _REGISTRY[policy.name] = policy
    return policy


def get(name: str) -> Policy:
    """The policy called ``name``; ValueError naming the known ones otherwise."""
    _discover()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"policy: must be one of {list(names())}, got {name!r}") from None


def names() -> tuple[str, ...]:
    """Every registered policy, by its ``rank`` (the built-in ones in the order they were added), then by name."""
    _discover()
    return tuple(sorted(_REGISTRY, key=lambda n: (_REGISTRY[n].rank, n)))


def steered() -> tuple[str, ...]:
    """The policies that steer the mixture by the teacher's losses (all but ``fixed``): they need a teacher and a
    controller in a train config, and each is an arm of ``ddk compare``."""
    return tuple(n for n in names() if _REGISTRY[n].needs_teacher)


def check_params(name: str, raw: Mapping[str, Any] | None) -> dict[str, Any]:
    """``policy_params`` for policy ``name``, validated and with the defaults filled in (plain JSON).

    Raises ValueError whose message starts with the field, e.g. ``policy_params.eta: ...``.
    """
    policy = get(name)
    if raw is not None and not isinstance(raw, Mapping):
        raise ValueError("policy_params: must be an object")
    try:
        model = policy.params.model_validate(dict(raw or {}))
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err.get("loc", ()))
        raise ValueError(f"policy_params{'.' + loc if loc else ''}: {err.get('msg')} (policy {name})") from None
    return model.model_dump(mode="json")


def params_of(name: str, resolved: Mapping[str, Any] | None) -> BaseModel:
    """The params model instance of stored (already checked) ``policy_params``."""
    return get(name).params.model_validate(dict(resolved or {}))


def describe() -> list[dict]:
    """What ``GET /v1/policies`` lists: each policy with its parameters (type, default, bounds, meaning)."""
    out = []
    for p in (get(n) for n in names()):
        schema = p.params.model_json_schema()
        params = {}
        for pname, prop in schema.get("properties", {}).items():
            params[pname] = {k: prop[k] for k in ("type", "default", "description", "minimum", "maximum",
                                                   "exclusiveMinimum", "exclusiveMaximum") if k in prop}
        out.append({"name": p.name, "summary": p.summary, "needs_teacher": p.needs_teacher,
                    "run_fields": list(p.run_fields), "params": params})
    return out


def check_weights(name: str, weights: Mapping[str, float], domains) -> dict[str, float]:
    """A policy's answer, checked: exactly the domains, finite, >= 0, summing to 1 (to 1e-9)."""
    if set(weights) != set(domains):
        raise RuntimeError(f"policy {name}: weights for {sorted(weights)}, not the run's domains")
    w = {d: float(weights[d]) for d in domains}
    if any(not math.isfinite(v) or v < 0 for v in w.values()) or abs(sum(w.values()) - 1.0) > 1e-9:
        raise RuntimeError(f"policy {name}: weights are not a distribution: {w}")
    return w


_discovered = False


def _discover() -> None:
    """Import every module of this package once (each registers its policy)."""
    global _discovered
    if _discovered:
        return
    _discovered = True  # first: the modules import this package, which must not start over
    found = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    try:
        for mod in found:
            importlib.import_module(f"{__name__}.{mod}")
    except BaseException:
        _discovered = False
        raise
