"""Validation of a run's spec and of an evaluation (pure, no I/O).

Every check raises :class:`Invalid` whose message starts with the offending field, so the HTTP layer can
answer 422 ``{"detail": "<field>: <why>"}`` and the user knows what to fix.

An evaluation is checked once, here (:func:`check_evaluation`, called by the store with the run's domains, for
the HTTP API and for Python callers alike): the HTTP layer's model only checks the JSON's shape, and the mixture
math and the policies trust what they get.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from ddk.controller import policies
from ddk.controller.mixture import GAP_ESTIMATES, uniform

# run ids appear in URLs, folder names and Ray Train's run name: the one rule is ddk.vocab's (RUN_ID_RULE),
# checked here when a run is created; reads of an unknown id are simply 404
from ddk.vocab import RUN_ID_RULE, SIGNALS, is_run_id

MAX_DOMAINS = 1024
MAX_DOMAIN_NAME = 200
MAX_ROUTE = 2048  # a diagnostics route: a teacher URL or a name
# initial weights must sum to 1 within this (they are then renormalised exactly)
SUM_TOLERANCE = 1e-6


class Invalid(ValueError):
    """Bad input; the message names the field (-> HTTP 422)."""


@dataclass(frozen=True)
class RunSpec:
    run_id: str
    domains: tuple[str, ...]
    policy: str = "ddk"
    alpha: float = 0.5
    interval_steps: int = 1000
    initial_weights: dict[str, float] | None = None  # None: uniform
    policy_params: dict | None = None  # the policy's own parameters, defaults filled in (None: all defaults)
    gap_estimate: str = "raw"  # how the policies read each domain's gap (ddk.controller.mixture.GAP_ESTIMATES)

    def effective_policy_params(self) -> dict:
        """The policy's parameters with the defaults filled in (what its ``update`` gets)."""
        return policies.check_params(self.policy, self.policy_params)

    def effective_initial_weights(self) -> dict[str, float]:
        return dict(self.initial_weights) if self.initial_weights is not None else uniform(self.domains)

    def same_as(self, other: RunSpec) -> bool:
        """Same run: used to tell an idempotent re-create (200) from a conflicting one (409)."""
        if (self.run_id, self.domains, self.policy, self.interval_steps, self.gap_estimate) != (
                other.run_id, other.domains, other.policy, other.interval_steps, other.gap_estimate):
            return False
        if not math.isclose(self.alpha, other.alpha, rel_tol=0, abs_tol=1e-12):
            return False
        if self.effective_policy_params() != other.effective_policy_params():
            return False
        a, b = self.effective_initial_weights(), other.effective_initial_weights()
        return all(math.isclose(a[d], b[d], rel_tol=0, abs_tol=1e-9) for d in self.domains)


def _finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_run_spec(run_id: str, domains: Sequence[str], policy: str = "ddk", alpha: float = 0.5,
                   interval_steps: int = 1000,
                   initial_weights: Mapping[str, float] | None = None,
                   policy_params: Mapping | None = None, gap_estimate: str = "raw") -> RunSpec:
    """Validate a run spec and return it normalised (initial weights rescaled to sum exactly 1, the policy's
    parameters checked by the policy's own model, defaults filled in)."""
    if not is_run_id(run_id):
        raise Invalid(f"run_id: {RUN_ID_RULE}")
    if not isinstance(domains, (list, tuple)) or not domains:
        raise Invalid("domains: must be a non-empty list of names")
    if len(domains) > MAX_DOMAINS:
        raise Invalid(f"domains: at most {MAX_DOMAINS}")
    for d in domains:
        if not isinstance(d, str) or not d.strip() or len(d) > MAX_DOMAIN_NAME:
            raise Invalid(f"domains: each name must be a non-empty string of at most {MAX_DOMAIN_NAME} characters")
    if len(set(domains)) != len(domains):
        dupes = sorted({d for d in domains if list(domains).count(d) > 1})
        raise Invalid(f"domains: duplicate names {dupes}")
    if policy not in policies.names():
        raise Invalid(f"policy: must be one of {list(policies.names())}, got {policy!r}")
    if not _finite_number(alpha) or not 0.0 <= alpha <= 1.0:
        raise Invalid(f"alpha: must be a number in [0, 1], got {alpha!r}")
    if not isinstance(interval_steps, int) or isinstance(interval_steps, bool) or interval_steps < 1:
        raise Invalid(f"interval_steps: must be an integer >= 1, got {interval_steps!r}")
    if gap_estimate not in GAP_ESTIMATES:
        raise Invalid(f"gap_estimate: must be one of {list(GAP_ESTIMATES)}, got {gap_estimate!r}")
    weights = None
    if initial_weights is not None:
        weights = _check_distribution("initial_weights", initial_weights, domains)
    try:
        params = policies.check_params(policy, policy_params)
    except ValueError as e:
        raise Invalid(str(e)) from None
    return RunSpec(run_id, tuple(domains), policy, float(alpha), int(interval_steps), weights, params or None,
                   gap_estimate)


def _check_distribution(field: str, weights: Mapping[str, float], domains: Sequence[str]) -> dict[str, float]:
    check_domains(field, weights, domains)
    for d in domains:
        w = weights[d]
        if not _finite_number(w) or w < 0:
            raise Invalid(f"{field}.{d}: must be a finite number >= 0, got {w!r}")
    total = sum(float(weights[d]) for d in domains)
    if abs(total - 1.0) > SUM_TOLERANCE:
        raise Invalid(f"{field}: must sum to 1 (got {total!r})")
    return {d: float(weights[d]) / total for d in domains}


def check_domains(field: str, values: Mapping[str, object], domains: Sequence[str]) -> None:
    """The keys must be exactly the run's domains."""
    if not isinstance(values, Mapping):
        raise Invalid(f"{field}: must be an object {{domain: number}}")
    unknown = [k for k in values if k not in domains]
    if unknown:
        raise Invalid(f"{field}: unknown domain {unknown[0]!r} (run domains: {list(domains)})")
    missing = [d for d in domains if d not in values]
    if missing:
        raise Invalid(f"{field}: missing domain {missing[0]!r}")


def check_losses(field: str, losses: Mapping[str, float], domains: Sequence[str]) -> dict[str, float]:
    """Per-domain losses in nats per token: exactly the run's domains, finite and >= 0."""
    check_domains(field, losses, domains)
    out = {}
    for d in domains:
        v = losses[d]
        if not _finite_number(v) or v < 0:
            raise Invalid(f"{field}.{d}: must be a finite number >= 0 (nats per token), got {v!r}")
        out[d] = float(v)
    return out


def check_tokens(tokens: Mapping[str, float] | None, domains: Sequence[str]) -> dict[str, float] | None:
    """An evaluation's optional ``tokens``: student tokens trained on each domain so far (cumulative), exactly the
    run's domains, finite and >= 0; None when absent."""
    if tokens is None:
        return None
    check_domains("tokens", tokens, domains)
    out = {}
    for d in domains:
        v = tokens[d]
        if not _finite_number(v) or v < 0:
            raise Invalid(f"tokens.{d}: must be a finite number >= 0 (tokens trained so far), got {v!r}")
        out[d] = float(v)
    return out


def check_log_ratio_se(se: Mapping[str, float] | None, domains: Sequence[str]) -> dict[str, float] | None:
    """An evaluation's optional ``log_ratio_se``: per domain the standard error of log(PPL_S / PPL_T), any of the
    run's domains (a domain evaluated on a single document has none), finite and >= 0. Returns them in the run's
    domain order; None when absent or empty."""
    if se is None:
        return None
    if not isinstance(se, Mapping):
        raise Invalid("log_ratio_se: must be an object {domain: number}")
    for d in se:
        if d not in domains:
            raise Invalid(f"log_ratio_se.{d}: unknown domain (run domains: {list(domains)})")
    out = {}
    for d in domains:
        if d in se:
            v = se[d]
            if not _finite_number(v) or v < 0:
                raise Invalid(f"log_ratio_se.{d}: must be a finite number >= 0 (standard error of the log-ratio), "
                              f"got {v!r}")
            out[d] = float(v)
    return out or None


def check_signal(signal) -> str | None:
    """An evaluation's optional ``signal``: what its q measures, one of :data:`ddk.vocab.SIGNALS` (None: ratio)."""
    if signal is None:
        return None
    if not isinstance(signal, str) or signal not in SIGNALS:
        raise Invalid(f"signal: must be one of {list(SIGNALS)}, got {signal!r}")
    return signal


@dataclass(frozen=True)
class CheckedEvaluation:
    """An evaluation after :func:`check_evaluation`: plain values, keyed by the run's domains in their order."""

    step: int
    student_loss: dict[str, float]
    teacher_loss: dict[str, float] | None
    tokens: dict[str, float] | None
    diagnostics: dict[str, dict] | None
    log_ratio_se: dict[str, float] | None
    signal: str | None = None  # what q measures (ddk.vocab.SIGNALS); None: ratio


def check_evaluation(domains: Sequence[str], step, student_loss, teacher_loss=None, tokens=None,
                     diagnostics=None, log_ratio_se=None, signal=None) -> CheckedEvaluation:
    """The one check of an evaluation against its run's domains: every field, each error naming it."""
    return CheckedEvaluation(
        check_step(step), check_losses("student_loss", student_loss, domains),
        None if teacher_loss is None else check_losses("teacher_loss", teacher_loss, domains),
        check_tokens(tokens, domains), check_diagnostics(diagnostics, domains),
        check_log_ratio_se(log_ratio_se, domains), check_signal(signal))


def _whole_number(v):
    """``tokens`` of a diagnostics entry: an integer, or a float with no fractional part (a trainer that counts
    in floats); not a bool, not a numeric string (pydantic's lax mode would take both)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError("must be an integer")
    if isinstance(v, float) and not (math.isfinite(v) and v.is_integer()):
        raise ValueError("must be an integer")
    return int(v)


def _real_number(v):
    """A float field of a diagnostics entry: a JSON number (not a numeric string or a bool); the range is the
    field's own check."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError("must be a number")
    return v


class DomainDiagnostics(BaseModel):
    """One domain's distillation diagnostics at an evaluation (issue 14), every field optional:

    kl:        the loss's divergence term on the domain's validation blocks (nats per token), a finite number;
    ce:        the student's cross-entropy there (nats per token), finite and >= 0;
    topk_mass: the teacher's mean top-k probability mass (how much of the distribution its k tokens cover), in [0, 1];
    tokens:    student tokens trained on the domain so far, an integer >= 0;
    route:     which teacher route served the domain (a URL or a name).
    """
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    # the range before the validator, so that the schema has it as minimum / maximum
    kl: Annotated[float, BeforeValidator(_real_number)] | None = None
    ce: Annotated[float, Field(ge=0), BeforeValidator(_real_number)] | None = None
    topk_mass: Annotated[float, Field(ge=0, le=1), BeforeValidator(_real_number)] | None = None
    tokens: Annotated[int, Field(ge=0, le=2**53), BeforeValidator(_whole_number)] | None = None
    route: str | None = Field(default=None, max_length=MAX_ROUTE)


DIAGNOSTICS_FIELDS = tuple(DomainDiagnostics.model_fields)


def check_diagnostics(diagnostics: Mapping[str, Mapping] | None,
                      domains: Sequence[str]) -> dict[str, dict] | None:
    """An evaluation's optional ``diagnostics``: ``{domain: {"kl", "ce", "topk_mass", "tokens", "route"}}``,
    any of the run's domains (not necessarily all), each field optional and checked by
    :class:`DomainDiagnostics`. Returns the plain record in the run's domain order, each domain with only the
    fields it was sent; None when absent or empty."""
    if diagnostics is None:
        return None
    if not isinstance(diagnostics, Mapping):
        raise Invalid("diagnostics: must be an object {domain: {kl, ce, topk_mass, tokens, route}}")
    for d in diagnostics:
        if d not in domains:
            raise Invalid(f"diagnostics.{d}: unknown domain (run domains: {list(domains)})")
    out = {}
    for d in domains:
        if d not in diagnostics:
            continue
        entry = diagnostics[d]
        if isinstance(entry, DomainDiagnostics):
            entry = entry.model_dump(exclude_none=True)
        try:
            checked = DomainDiagnostics.model_validate(entry)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err.get("loc", ()))
            raise Invalid(f"diagnostics.{d}{'.' + where if where else ''}: {err.get('msg')}, "
                          f"got {err.get('input')!r}") from None
        out[d] = checked.model_dump(exclude_none=True)
    return out or None


def check_step(step) -> int:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise Invalid(f"step: must be an integer >= 0, got {step!r}")
    return step


MAX_STEPS = 2**53  # steps of a progress report: exact in a JavaScript number (the page) and in SQLite


def check_progress(step, total_steps, loss=None, ce=None, kl=None, tokens_per_s=None) -> dict:
    """A trainer's progress report: ``0 <= step <= total_steps``, ``total_steps >= 1``; the losses (nats per
    token: the step's mean loss and its CE and KL parts) and ``tokens_per_s`` finite numbers or None,
    ``tokens_per_s`` >= 0. Returns the plain record."""
    check_step(step)
    if not isinstance(total_steps, int) or isinstance(total_steps, bool) or not 1 <= total_steps <= MAX_STEPS:
        raise Invalid(f"total_steps: must be an integer in 1..{MAX_STEPS}, got {total_steps!r}")
    if step > total_steps:
        raise Invalid(f"step: {step} is greater than total_steps {total_steps}")
    out = {"step": step, "total_steps": total_steps}
    for name, v in (("loss", loss), ("ce", ce), ("kl", kl), ("tokens_per_s", tokens_per_s)):
        if v is not None and (not _finite_number(v) or (name == "tokens_per_s" and v < 0)):
            raise Invalid(f"{name}: must be a finite number{' >= 0' if name == 'tokens_per_s' else ''} or null, "
                          f"got {v!r}")
        out[name] = None if v is None else float(v)
    return out
