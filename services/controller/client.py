"""Python client of the controller HTTP API (used by the trainer).

Retries connection errors and 5xx answers with exponential backoff (a controller restart is survivable:
its state is in SQLite); 4xx answers are the caller's mistake and raise :class:`ControllerError` at once.
``post_evaluation`` is safe to retry: the controller refuses a step it has already recorded (409), and
when that happens on a retry (the first attempt was applied but its answer lost), or always for a client made
with ``resolve_conflicts=True`` (the trainer's: a resumed run posts again), the client returns the version recorded
for that step (:meth:`ControllerClient.recorded_version`) instead of failing: the one place a 409 is handled.
"""

from __future__ import annotations

import json
import logging
import numbers
import time
from collections.abc import Iterator

import httpx

from ddk.vocab import WeightsVersion

log = logging.getLogger(__name__)


class ControllerError(Exception):
    """A 4xx answer (bad request, unknown run, conflict); not retried."""

    def __init__(self, status: int, detail):
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


class ControllerUnavailable(Exception):
    """Connection errors or 5xx answers after all retries."""


class ControllerClient:
    def __init__(self, url: str, token: str | None = None, *, timeout: float = 10.0, max_retries: int = 5,
                 backoff: float = 0.5, resolve_conflicts: bool = False):
        self.url = url.rstrip("/")
        self.resolve_conflicts = resolve_conflicts  # every 409 of post_evaluation: the recorded version
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=self._headers)

    # -- plumbing --------------------------------------------------------------------------------------
    def _sleep(self, attempt: int) -> None:
        time.sleep(min(self.backoff * (2 ** attempt), 30.0))

    def _request(self, method: str, path: str, body: dict | None = None, on_conflict=None) -> dict:
        """One call with retries; ``on_conflict(after_failed_attempt)`` may resolve a 409 (the answer to return,
        or None to raise it)."""
        last_error: Exception | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._sleep(attempt - 1)
            try:
                r = self._http.request(method, path, json=body)
            except httpx.TransportError as e:
                last_error = e
                log.warning("controller %s %s: %s (attempt %d)", method, path, e, attempt + 1)
                continue
            if r.status_code >= 500:
                last_error = ControllerError(r.status_code, _detail(r))
                log.warning("controller %s %s: HTTP %d (attempt %d)", method, path, r.status_code, attempt + 1)
                continue
            if r.status_code == 409 and on_conflict is not None:
                resolved = on_conflict(attempt > 0)
                if resolved is not None:
                    return resolved
            if r.status_code >= 400:
                raise ControllerError(r.status_code, _detail(r))
            return r.json()
        raise ControllerUnavailable(f"controller {self.url} {method} {path}: {last_error}")

    # -- API -------------------------------------------------------------------------------------------
    def create_run(self, run_id, domains, policy="ddk", alpha=0.5, interval_steps=1000,
                   initial_weights=None, policy_params=None, gap_estimate=None) -> dict:
        """Create the run, or return it if it exists with the same spec (409 ControllerError otherwise).
        ``policy_params``: the policy's own parameters (``list_policies`` says which); omitted when empty, so an
        older controller still accepts the run; likewise ``gap_estimate`` (``raw`` | ``shrunk``) unless ``shrunk``."""
        body = {"run_id": run_id, "domains": list(domains), "policy": policy, "alpha": alpha,
                "interval_steps": interval_steps}
        if initial_weights is not None:
            body["initial_weights"] = dict(initial_weights)
        if policy_params:
            body["policy_params"] = dict(policy_params)
        if gap_estimate not in (None, "raw"):
            body["gap_estimate"] = gap_estimate
        return self._request("POST", "/v1/runs", body)

    def list_policies(self) -> dict:
        """``{"policies": [{"name", "summary", "needs_teacher", "run_fields", "params"}, ...]}``."""
        return self._request("GET", "/v1/policies")

    def get_run(self, run_id) -> dict:
        return self._request("GET", f"/v1/runs/{run_id}")

    def list_runs(self) -> dict:
        return self._request("GET", "/v1/runs")

    def post_evaluation(self, run_id, step, student_loss: dict,
                        teacher_loss: dict | None = None, tokens: dict | None = None,
                        diagnostics: dict | None = None, log_ratio_se: dict | None = None,
                        signal: str | None = None) -> WeightsVersion:
        """Record an evaluation; returns the new weights {"version", "step", "weights", "updated_at"}.
        ``tokens``: student tokens trained on each domain so far (cumulative), for policies that use them.
        ``diagnostics``: ``{domain: {"kl", "ce", "topk_mass", "tokens", "route"}}``, any of the run's domains and
        fields (None values are left out); stored with the version and shown on the page. Omitted from the body
        when None: a controller from before issue 14 refuses the field (422, unknown field)."""
        body = {"step": int(step), "student_loss": {k: float(v) for k, v in student_loss.items()}}
        if teacher_loss is not None:
            body["teacher_loss"] = {k: float(v) for k, v in teacher_loss.items()}
        if tokens is not None:
            body["tokens"] = {k: float(v) for k, v in tokens.items()}
        if diagnostics is not None:
            body["diagnostics"] = {d: {k: _plain(v) for k, v in fields.items() if v is not None}
                                   for d, fields in diagnostics.items()}
        if log_ratio_se:  # {domain: SE of log(PPL_S / PPL_T)}; left out when empty (older controllers: 422)
            body["log_ratio_se"] = {k: float(v) for k, v in log_ratio_se.items()}
        if signal is not None and signal != "ratio":  # mixture.signal; left out for ratio (older controllers: 422)
            body["signal"] = str(signal)

        def conflict(after_failed_attempt: bool):
            # the one place a 409 is handled: the controller already has this step (or a later one)
            if not (self.resolve_conflicts or after_failed_attempt):
                return None
            recorded = self.recorded_version(run_id, step)
            if recorded.get("step") != int(step) and not self.resolve_conflicts:
                return None  # not our earlier attempt's: the caller gets the 409
            log.info("controller already has the evaluation of step %d: using its version %d", int(step),
                     recorded["version"])
            return recorded

        return self._request("POST", f"/v1/runs/{run_id}/evaluations", body, on_conflict=conflict)

    def recorded_version(self, run_id, step) -> WeightsVersion:
        """The version the controller recorded for the evaluation of ``step`` (its history); the current
        weights when no version has that step."""
        for v in reversed(self.history(run_id).get("versions", [])):
            if v.get("step") == int(step) and v.get("version", 0) > 0:
                return {"version": v["version"], "step": v["step"], "weights": v["weights"],
                        "updated_at": v.get("created_at")}
        return self.get_weights(run_id)

    def post_progress(self, run_id, step, total_steps, loss=None, ce=None, kl=None, tokens_per_s=None,
                      onpolicy=None) -> dict:
        """Report a run's progress (the page's "step of total" and loss curve); returns the stored report.
        ``onpolicy``: an on-policy step's numbers (``generation_s``, ``grading_s``, ``training_s``,
        ``rollout_tokens_per_s``, ``version_lag``, ``completion_len`` {domain: tokens}), any of them; sent only
        when given. Idempotent enough to retry: a repeated report for the same step replaces the first."""
        body = {"step": int(step), "total_steps": int(total_steps)}
        for name, v in (("loss", loss), ("ce", ce), ("kl", kl), ("tokens_per_s", tokens_per_s)):
            if v is not None:
                body[name] = float(v)
        if onpolicy is not None:
            body["onpolicy"] = {k: v for k, v in onpolicy.items() if v is not None}
        return self._request("POST", f"/v1/runs/{run_id}/progress", body)

    def get_progress(self, run_id) -> dict:
        """``{"latest": the last report (with ``onpolicy`` when it had it) or None, "points": [{"step", "loss",
        "ce", "kl"}, ...]}``."""
        return self._request("GET", f"/v1/runs/{run_id}/progress")

    def get_weights(self, run_id) -> WeightsVersion:
        """The current {"version", "step", "weights", "updated_at"}; version 0 = the initial weights."""
        return self._request("GET", f"/v1/runs/{run_id}/weights")

    def history(self, run_id) -> dict:
        return self._request("GET", f"/v1/runs/{run_id}/history")

    def events(self, run_id) -> Iterator[WeightsVersion]:
        """Server-Sent Events: yields the current weights, then each new weights version as it is recorded.

        Reconnects (with backoff, resuming after the last version seen) when the stream drops; raises
        ControllerUnavailable after max_retries consecutive failures and ControllerError on a 4xx.
        """
        last_version = None
        failures = 0
        # no read timeout shorter than the server's keep-alive period (15 s): idle streams are normal
        timeout = httpx.Timeout(self.timeout, read=max(60.0, self.timeout))
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_version is not None:
                headers["Last-Event-ID"] = str(last_version)
            try:
                with self._http.stream("GET", f"/v1/runs/{run_id}/events", headers=headers,
                                       timeout=timeout) as r:
                    if 400 <= r.status_code < 500:
                        r.read()
                        raise ControllerError(r.status_code, _detail(r))
                    if r.status_code != 200:
                        raise httpx.TransportError(f"HTTP {r.status_code}")
                    failures = 0
                    for data in parse_sse(r.iter_lines()):
                        event = json.loads(data)
                        if last_version is not None and event["version"] <= last_version:
                            continue
                        last_version = event["version"]
                        yield event
            except httpx.TransportError as e:
                log.warning("controller events %s: %s", run_id, e)
            failures += 1
            if failures > self.max_retries:
                raise ControllerUnavailable(f"controller {self.url} events for {run_id}: stream keeps failing")
            self._sleep(failures - 1)

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def parse_sse(lines: Iterator[str]) -> Iterator[str]:
    """The ``data`` of each Server-Sent Event (multi-line data joined by newlines); comments are skipped."""
    data: list[str] = []
    for line in lines:
        line = line.rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
            data = []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if field == "data":
                data.append(value)


def _plain(v):
    """A diagnostics value as JSON can carry it (numpy scalars included); anything else is sent as it is, for
    the controller to refuse with a 422 naming the field."""
    if isinstance(v, bool):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    return v


def _detail(r: httpx.Response):
    try:
        return r.json().get("detail", r.text)
    except (ValueError, AttributeError):
        return r.text
