"""``ddk runs`` and ``ddk weights RUN_ID [--watch]``: the controller's runs and a run's weights, as tables.

Both talk to a running controller (``--controller URL``, default http://127.0.0.1:8200) through
:class:`~ddk.controller.client.ControllerClient`: ``GET /v1/runs``, ``GET /v1/runs/{id}/weights`` and, with
``--watch``, the run's event stream (``GET /v1/runs/{id}/events``), one row per new weights version until
Ctrl-C. Without ``--watch`` the table also has the latest evaluation's ratio PPL_S / PPL_T per domain with its 95 %
interval, exp(log q -/+ 1.96 se) from the evaluation's ``log_ratio_se`` (``GET /v1/runs/{id}/history``), and its
warning when the domains' gaps were within their standard errors. ``--json`` prints the API's JSON instead (one
object per line with ``--watch``). A controller that
cannot be reached, or a run it does not have, is exit 2 with one line naming ``--controller`` or the run.
The formatting (:func:`format_runs`, :func:`format_weights`, :func:`format_version_row`) is pure.
"""

from __future__ import annotations

import json
import logging
import math
import sys

from ddk.errors import UsageError
from ddk.vocab import SIGNAL_LABELS

DEFAULT_CONTROLLER = "http://127.0.0.1:8200"


# ----------------------------------------------------------------------------- formatting (pure)

def _cells(rows: list[list[str]], right: set[int] = frozenset()) -> str:
    """Plain-text columns: the first row is the header, then a rule; columns in ``right`` right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, r in enumerate(rows):
        out.append("  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                   .rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _step(v) -> str:
    return "-" if v is None else str(v)


def format_runs(runs: list[dict]) -> str:
    """The ``GET /v1/runs`` list as a table: one row per run (its state and progress when the controller
    reports them)."""
    if not runs:
        return "no runs"
    rows = [["run_id", "policy", "K", "domains", "version", "step", "state", "updated_at"]]
    for r in runs:
        w = r.get("weights") or {}
        status = r.get("status") or {}
        step = status.get("step")
        total = status.get("total_steps")
        progress = f"{step}/{total}" if step is not None and total else _step(w.get("step"))
        rows.append([str(r.get("run_id")), str(r.get("policy", "")), str(r.get("interval_steps", "")),
                     ",".join(r.get("domains") or []), str(w.get("version", "")), progress,
                     str(status.get("state", "-")), str(status.get("updated_at") or w.get("updated_at")
                                                         or r.get("created_at") or "")])
    return _cells(rows, right={2, 4, 5})


Z95 = 1.96  # the normal quantile of a two-sided 95 % interval


def ratio_interval(ratio: float, se: float | None) -> tuple[float, float] | None:
    """The 95 % interval of q = PPL_S / PPL_T from the standard error of log q: (q e^(-1.96 se), q e^(1.96 se));
    None without a standard error."""
    if se is None:
        return None
    return ratio * math.exp(-Z95 * se), ratio * math.exp(Z95 * se)


def format_weights(run_id: str, weights: dict, evaluation: dict | None = None) -> str:
    """A run's current weights (``GET .../weights``): a heading line, then one row per domain; with ``evaluation``
    (the latest version of ``GET .../history``: the evaluation these weights answer) also each domain's ratio, its
    95 % interval and the standard error of log q (``-`` where the evaluation has none), and the evaluation's
    warning on a last line."""
    w = weights.get("weights") or {}
    head = (f"run {run_id}: version {weights.get('version')}"
            + (" (initial weights)" if weights.get("version") == 0 else f" at step {_step(weights.get('step'))}")
            + f", updated {weights.get('updated_at', '-')}")
    ratios = (evaluation or {}).get("ratio")
    if not ratios:
        rows = [["domain", "weight"]] + [[d, f"{w[d]:.4f}"] for d in sorted(w)]
        return head + "\n" + _cells(rows, right={1})
    se = evaluation.get("log_ratio_se") or {}
    signal = evaluation.get("signal") or "ratio"
    if signal != "ratio":  # mixture.signal: q is another gap than PPL_S / PPL_T (no standard error is sent)
        head += f"\nq is the {SIGNAL_LABELS.get(signal, signal)} (mixture.signal: {signal})"
    rows = [["domain", "weight", "ratio" if signal == "ratio" else "q", "95% interval", "se(log q)"]]
    for d in sorted(w):
        q = ratios.get(d)
        ci = None if q is None else ratio_interval(q, se.get(d))
        rows.append([d, f"{w[d]:.4f}", "-" if q is None else f"{q:.4f}",
                     "-" if ci is None else f"{ci[0]:.4f}-{ci[1]:.4f}",
                     "-" if se.get(d) is None else f"{se[d]:.4f}"])
    out = head + "\n" + _cells(rows, right={1, 2, 4})
    if evaluation.get("warning"):
        out += f"\nwarning: {evaluation['warning']}"
    return out


def version_header(domains: list[str]) -> str:
    """The header of ``--watch``'s table (one column per domain)."""
    return _version_line(["version", "step", "updated_at", *domains], [7, 6, 24] + [_w(d) for d in domains])


def format_version_row(weights: dict, domains: list[str]) -> str:
    """One weights version as a row under :func:`version_header`."""
    w = weights.get("weights") or {}
    cells = [str(weights.get("version")), _step(weights.get("step")), str(weights.get("updated_at", "-"))]
    cells += [f"{w[d]:.4f}" if d in w else "-" for d in domains]
    return _version_line(cells, [7, 6, 24] + [_w(d) for d in domains])


def _w(domain: str) -> int:
    return max(len(domain), 6)


def _version_line(cells: list[str], widths: list[int]) -> str:
    return "  ".join(c.ljust(w) if i == 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()


# ----------------------------------------------------------------------------- commands

def _client(url: str):
    from ddk.controller.client import ControllerClient

    # a console command: fail fast when nothing answers
    return ControllerClient(url, timeout=5.0, max_retries=1, backoff=0.2)


def _call(fn, url: str, run_id: str | None = None, quiet: bool = True):
    """``fn()``, with the controller's failures turned into one-line usage errors (exit 2). ``quiet``: without
    the client's warning per failed attempt (the one line says it)."""
    from ddk.controller.client import ControllerError, ControllerUnavailable

    client_log = logging.getLogger("ddk.controller.client")
    old = client_log.level
    if quiet:
        client_log.setLevel(logging.ERROR)
    try:
        return fn()
    except ControllerUnavailable:
        raise UsageError(f"--controller: cannot reach a controller at {url}") from None
    except ControllerError as e:
        if e.status == 404 and run_id is not None:
            raise UsageError(f"RUN_ID: the controller at {url} has no run {run_id!r} (`ddk runs` lists them)") \
                from None
        raise UsageError(f"--controller: {url} answered {e.status}: {e.detail}") from None
    finally:
        client_log.setLevel(old)


def runs_main(args) -> int:
    """``ddk runs``: every run at the controller."""
    url = args.controller
    with _client(url) as client:
        runs = _call(client.list_runs, url).get("runs", [])
    if args.json:
        print(json.dumps({"runs": runs}, indent=1))
    else:
        print(format_runs(runs))
    return 0


def weights_main(args) -> int:
    """``ddk weights RUN_ID [--watch]``: a run's current weights, or every new version until Ctrl-C."""
    url, run_id = args.controller, args.run_id
    with _client(url) as client:
        if not args.watch:
            weights = _call(lambda: client.get_weights(run_id), url, run_id)
            if args.json:
                print(json.dumps(weights, indent=1))
                return 0
            versions = _call(lambda: client.history(run_id), url, run_id).get("versions") or []
            latest = versions[-1] if versions and versions[-1].get("ratio") else None
            print(format_weights(run_id, weights, latest))
            return 0
        domains = sorted(_call(lambda: client.get_run(run_id), url, run_id).get("domains") or [])
        if not args.json:
            print(version_header(domains), flush=True)
        client.max_retries = 5  # a watch rides out a controller restart
        try:
            events = client.events(run_id)
            while True:
                event = _call(lambda: next(events), url, run_id, quiet=False)  # reconnects are news
                print(json.dumps(event) if args.json else format_version_row(event, domains), flush=True)
        except KeyboardInterrupt:  # Ctrl-C ends a watch: not a failure
            sys.stdout.flush()
            return 0
