"""The controller's state in one SQLite file: runs, and every weights version with its evaluation.

Why SQLite with WAL: one file that survives a crash or restart, readers never block the writer, and several
threads (or even several server processes on the same file) can record evaluations safely. Each evaluation
is one ``BEGIN IMMEDIATE`` transaction -- take the write lock, read the last version, compute the next
weights, insert -- so two concurrent evaluations can never both build on the same previous version, and a
retried POST for a step that was already recorded is refused instead of applied twice.

Version 0 of a run holds its initial weights (step NULL, no losses); version n >= 1 is the n-th evaluation.
Each version also keeps the policy's state after it (JSON, ``ddk.controller.policies``) and the evaluation's
cumulative per-domain ``tokens``, when sent, so that a restarted controller continues a stateful policy where
it was, and the evaluation's per-domain distillation ``diagnostics`` (issue 14) and standard errors of the
log-ratio ``log_ratio_se`` (issue 24), when sent, for the history and the page, with the ``warning`` the
evaluation's answer carried (the mixture steering by noise), and the evaluation's ``signal`` (what its q measures,
``ddk.vocab.SIGNALS``; NULL: ``ratio``). A run keeps its ``gap_estimate`` (NULL: ``raw``) and the ``signal`` of its
last evaluation (NULL: ``ratio``).
Files written before those columns existed get them (NULL) when opened: see :data:`MIGRATIONS`.

Besides the versions, each run may have a trainer's progress (the page's "step of total" and loss curve): the
latest report in ``progress`` (with an on-policy step's numbers, ``onpolicy``, when it had them) and a bounded
loss history in ``loss_points``. At most :data:`LOSS_POINTS` points
are kept per run: when there would be more, every second one is dropped and the run's ``stride`` (the fewest
steps between two kept points) doubles, so the curve keeps covering the whole run at an even spacing.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from ddk.controller import policies
from ddk.controller.mixture import NOISE_WARNING
from ddk.controller.policies import State
from ddk.controller.spec import Invalid, RunSpec, check_evaluation, check_progress
from ddk.vocab import ONPOLICY_FIELDS, ONPOLICY_NUMBERS, WeightsVersion, ratio, weights_version

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id          TEXT PRIMARY KEY,
    domains         TEXT NOT NULL,      -- JSON list, in order
    policy          TEXT NOT NULL,
    alpha           REAL NOT NULL,
    interval_steps  INTEGER NOT NULL,
    initial_weights TEXT,               -- JSON object or NULL (uniform)
    created_at      TEXT NOT NULL,
    policy_params   TEXT,               -- JSON object (defaults filled in) or NULL (a policy without params)
    gap_estimate    TEXT,               -- raw | shrunk (ddk.controller.mixture.GAP_ESTIMATES); NULL: raw
    signal          TEXT                -- what its last evaluation's q measures (ddk.vocab.SIGNALS); NULL: ratio
);
CREATE TABLE IF NOT EXISTS versions (
    run_id        TEXT NOT NULL REFERENCES runs(run_id),
    version       INTEGER NOT NULL,
    step          INTEGER,              -- NULL for version 0
    student_loss  TEXT,                 -- JSON objects {domain: value}; NULL for version 0
    teacher_loss  TEXT,
    ratio         TEXT,
    weights       TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    state         TEXT,                 -- the policy's state after this version (JSON) or NULL
    tokens        TEXT,                 -- the evaluation's cumulative tokens per domain (JSON) or NULL
    diagnostics   TEXT,                 -- the evaluation's {domain: {kl, ce, topk_mass, tokens, route}} (JSON) or NULL
    log_ratio_se  TEXT,                 -- the evaluation's {domain: standard error of log q} (JSON) or NULL
    warning       TEXT,                 -- the warning the evaluation's answer carried, or NULL
    signal        TEXT,                 -- what the evaluation's q measures (ddk.vocab.SIGNALS); NULL: ratio
    PRIMARY KEY (run_id, version)
);
CREATE TABLE IF NOT EXISTS progress (   -- the latest progress report of a run (none before its first)
    run_id        TEXT PRIMARY KEY REFERENCES runs(run_id),
    step          INTEGER NOT NULL,
    total_steps   INTEGER NOT NULL,
    loss          REAL,
    ce            REAL,
    kl            REAL,
    tokens_per_s  REAL,
    stride        INTEGER NOT NULL,     -- fewest steps between two kept loss points (doubles on thinning)
    seq           INTEGER NOT NULL,     -- reports so far: what the all-runs event stream compares
    updated_at    TEXT NOT NULL,
    onpolicy      TEXT                  -- an on-policy step's numbers (JSON, check_onpolicy) or NULL
);
CREATE TABLE IF NOT EXISTS loss_points (  -- the loss curve, at most LOSS_POINTS rows per run
    run_id        TEXT NOT NULL REFERENCES runs(run_id),
    step          INTEGER NOT NULL,
    loss          REAL NOT NULL,
    ce            REAL,
    kl            REAL,
    PRIMARY KEY (run_id, step)
);
"""

# Columns added after the first release: (table, column, declaration). An older file gets them (NULL) when a
# Store opens it; CREATE TABLE above already has them for a new file. Append only.
MIGRATIONS = (
    ("runs", "policy_params", "TEXT"),
    ("versions", "state", "TEXT"),
    ("versions", "tokens", "TEXT"),
    ("versions", "diagnostics", "TEXT"),
    ("runs", "gap_estimate", "TEXT"),
    ("versions", "log_ratio_se", "TEXT"),
    ("versions", "warning", "TEXT"),
    ("runs", "signal", "TEXT"),
    ("versions", "signal", "TEXT"),
    ("progress", "onpolicy", "TEXT"),
)

LOSS_POINTS = 1024  # loss points kept per run (a chart a few hundred pixels wide needs fewer)



class NotFound(LookupError):
    """Unknown run (-> 404)."""


class Conflict(Exception):
    """A different spec for an existing run, or an evaluation for an old step (-> 409)."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _non_negative(name: str, v) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
        raise Invalid(f"{name}: must be a finite number >= 0, got {v!r}")
    return float(v)


def check_onpolicy(onpolicy, domains) -> dict | None:
    """A progress report's ``onpolicy`` object: every field optional (:data:`ONPOLICY_FIELDS`), the numbers finite
    and >= 0, ``version_lag`` an integer, ``completion_len`` keyed by the run's ``domains``. The plain record
    without its null fields (None when nothing is left). Pure."""
    if onpolicy is None:
        return None
    if not isinstance(onpolicy, Mapping):
        raise Invalid(f"onpolicy: must be an object, got {onpolicy!r}")
    unknown = sorted(set(onpolicy) - set(ONPOLICY_FIELDS))
    if unknown:
        raise Invalid(f"onpolicy.{unknown[0]}: unknown field (known: {', '.join(ONPOLICY_FIELDS)})")
    out: dict = {}
    for name in ONPOLICY_NUMBERS:
        if onpolicy.get(name) is not None:
            out[name] = _non_negative(f"onpolicy.{name}", onpolicy[name])
    lag = onpolicy.get("version_lag")
    if lag is not None:
        if not isinstance(lag, int) or isinstance(lag, bool) or lag < 0:
            raise Invalid(f"onpolicy.version_lag: must be an integer >= 0, got {lag!r}")
        out["version_lag"] = lag
    lengths = onpolicy.get("completion_len")
    if lengths is not None:
        if not isinstance(lengths, Mapping):
            raise Invalid(f"onpolicy.completion_len: must be an object {{domain: tokens}}, got {lengths!r}")
        for d in lengths:
            if d not in domains:
                raise Invalid(f"onpolicy.completion_len.{d}: not a domain of the run ({', '.join(domains)})")
        out["completion_len"] = {d: _non_negative(f"onpolicy.completion_len.{d}", lengths[d]) for d in domains
                                 if d in lengths}
    return out or None


def _loads(text: str | None):
    return None if text is None else json.loads(text)


class Store:
    """SQLite-backed store. Thread-safe: each thread uses its own connection."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(SCHEMA)
            _migrate(con)

    # -- connections -----------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        # one connection per thread, reused (opening one per call costs ~0.1 ms, but re-reading the schema
        # every time is wasteful); autocommit mode, so transactions are exactly the ones we BEGIN below
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=True)
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA foreign_keys=ON")
            con.execute("PRAGMA busy_timeout=30000")
            self._local.con = con
        return con

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction holding SQLite's write lock from the start (no lost updates)."""
        con = self._connect()
        con.execute("BEGIN IMMEDIATE")
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")

    # -- runs ------------------------------------------------------------------------------------------
    def create_run(self, spec: RunSpec) -> tuple[dict, bool]:
        """Create a run (version 0 = its initial weights); return (run, created).

        The same spec again returns the existing run with created=False; a different one raises Conflict.
        """
        with self._write() as con:
            row = con.execute("SELECT * FROM runs WHERE run_id = ?", (spec.run_id,)).fetchone()
            if row is not None:
                existing = _spec(row)
                if not existing.same_as(spec):
                    raise Conflict(f"run_id: run {spec.run_id!r} exists with a different spec "
                                   f"(domains {list(existing.domains)}, policy {existing.policy!r}, "
                                   f"alpha {existing.alpha}, interval_steps {existing.interval_steps}, "
                                   f"policy_params {existing.effective_policy_params()}, "
                                   f"gap_estimate {existing.gap_estimate!r})")
                created = False
            else:
                ts = now()
                con.execute(
                    "INSERT INTO runs (run_id, domains, policy, alpha, interval_steps, initial_weights, created_at, "
                    "policy_params, gap_estimate) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (spec.run_id, json.dumps(list(spec.domains)), spec.policy, spec.alpha, spec.interval_steps,
                     None if spec.initial_weights is None else json.dumps(spec.initial_weights), ts,
                     json.dumps(spec.policy_params) if spec.policy_params else None,
                     None if spec.gap_estimate == "raw" else spec.gap_estimate))
                con.execute(
                    "INSERT INTO versions (run_id, version, step, weights, created_at) VALUES (?, 0, NULL, ?, ?)",
                    (spec.run_id, json.dumps(spec.effective_initial_weights()), ts))
                created = True
                log.info("created run %s: %d domains, policy %s", spec.run_id, len(spec.domains), spec.policy)
        return self.get_run(spec.run_id), created

    def get_spec(self, run_id: str) -> RunSpec:
        row = self._connect().execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise NotFound(f"run_id: no run {run_id!r}")
        return _spec(row)

    def get_run(self, run_id: str) -> dict:
        """The run object: its spec, created_at and current weights."""
        row = self._connect().execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise NotFound(f"run_id: no run {run_id!r}")
        return self._run_object(row)

    def list_runs(self, status: bool = False) -> list[dict]:
        """Every run object, oldest first; with ``status``, each with its :meth:`status` too."""
        rows = self._connect().execute("SELECT * FROM runs ORDER BY created_at, run_id").fetchall()
        runs = [self._run_object(r) for r in rows]
        if status:
            for run in runs:
                run["status"] = self.status(run["run_id"], run["weights"], run["created_at"])
        return runs

    def _run_object(self, row: sqlite3.Row) -> dict:
        run = {
            "run_id": row["run_id"],
            "domains": json.loads(row["domains"]),
            "policy": row["policy"],
            "alpha": row["alpha"],
            "interval_steps": row["interval_steps"],
            "initial_weights": _loads(row["initial_weights"]),
            "created_at": row["created_at"],
            "weights": self.weights(row["run_id"]),
        }
        params = _loads(row["policy_params"])
        if params:  # only policies with parameters have the key (the run object of the others is unchanged)
            run["policy_params"] = params
        if row["gap_estimate"] is not None:  # likewise only a run that does not read the gaps raw
            run["gap_estimate"] = row["gap_estimate"]
        if row["signal"] is not None:  # and only a run whose gaps are not PPL ratios (mixture.signal)
            run["signal"] = row["signal"]
        return run

    # -- evaluations -----------------------------------------------------------------------------------
    def add_evaluation(self, run_id: str, step: int, student_loss: Mapping[str, float],
                       teacher_loss: Mapping[str, float] | None = None,
                       tokens: Mapping[str, float] | None = None,
                       diagnostics: Mapping[str, Mapping] | None = None,
                       log_ratio_se: Mapping[str, float] | None = None, signal: str | None = None) -> dict:
        """Record one evaluation and the weights it yields, atomically; return the weights object, with a
        ``warning`` when the domains' gaps are within their standard errors (:data:`NOISE_WARNING`, for the
        policies that steer by the gaps).

        Teacher losses are required on a run's first evaluation (except for ``fixed``, whose weights do not
        depend on them, so a CPT baseline without a teacher can still report) and reused until sent again.
        ``tokens`` (optional): the student tokens trained on each domain so far, for the policies that use them.
        ``diagnostics`` (optional): per domain the distillation diagnostics (``spec.check_diagnostics``), kept with
        the version for the history and the page; no policy reads them.
        ``log_ratio_se`` (optional): per domain (any of the run's) the standard error of log(PPL_S / PPL_T), which
        the run's ``gap_estimate`` uses and which says when the gaps are noise.
        ``signal`` (optional): what the losses' q measures (``ddk.vocab.SIGNALS``: ``ratio``, the default, or the
        ``accuracy`` / ``onpolicy`` gap mapped onto losses by the trainer); kept with the version and the run.
        Every field is checked here, once (``spec.check_evaluation``), against the run's domains.
        The weights are the run's policy's (``ddk.controller.policies``), given the state it left with the
        previous version; its new state is stored with the new version.
        """
        with self._write() as con:
            row = con.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                raise NotFound(f"run_id: no run {run_id!r}")
            spec = _spec(row)
            ev = check_evaluation(spec.domains, step, student_loss, teacher_loss, tokens, diagnostics, log_ratio_se,
                                  signal)
            step, student, teacher, toks, diag = ev.step, ev.student_loss, ev.teacher_loss, ev.tokens, ev.diagnostics
            policy = policies.get(spec.policy)

            last = con.execute("SELECT * FROM versions WHERE run_id = ? ORDER BY version DESC LIMIT 1",
                               (run_id,)).fetchone()
            first = last["version"] == 0
            if not first and step <= last["step"]:
                raise Conflict(f"step: {step} is not after the last recorded step {last['step']} "
                               f"(version {last['version']}); evaluations must come in increasing steps")
            if teacher is None and not first:
                teacher = _loads(last["teacher_loss"])  # reuse the teacher's losses from the last evaluation
            if teacher is None and policy.needs_teacher:
                raise Invalid("teacher_loss: required on the first evaluation of a run")

            evaluation = policies.Evaluation(
                step, spec.domains, student, teacher, toks, previous=None if first else json.loads(last["weights"]),
                initial=spec.effective_initial_weights(), alpha=spec.alpha, log_ratio_se=ev.log_ratio_se,
                gap_estimate=spec.gap_estimate)
            weights, state = policy.update(_loads(last["state"]), evaluation,
                                           policies.params_of(spec.policy, spec.policy_params))
            weights = policies.check_weights(spec.policy, weights, spec.domains)
            noisy = (policy.needs_teacher and teacher is not None and ev.log_ratio_se is not None
                     and evaluation.estimate.noise)
            warning = NOISE_WARNING if noisy else None
            try:
                state_text = None if state is None else json.dumps(state, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise RuntimeError(f"policy {spec.policy}: state is not plain JSON ({e})") from None
            q = None if teacher is None else ratio(student, teacher)
            version = last["version"] + 1
            ts = now()
            con.execute(
                "INSERT INTO versions (run_id, version, step, student_loss, teacher_loss, ratio, weights, "
                "created_at, state, tokens, diagnostics, log_ratio_se, warning, signal) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, version, step, json.dumps(student), None if teacher is None else json.dumps(teacher),
                 None if q is None else json.dumps(q), json.dumps(weights), ts, state_text,
                 None if toks is None else json.dumps(toks),
                 None if diag is None else json.dumps(diag, allow_nan=False),
                 None if ev.log_ratio_se is None else json.dumps(ev.log_ratio_se), warning, _signal_column(ev.signal)))
            if _signal_column(ev.signal) != row["signal"]:
                con.execute("UPDATE runs SET signal = ? WHERE run_id = ?", (_signal_column(ev.signal), run_id))
        log.info("run %s step %d -> version %d", run_id, step, version)
        out = weights_version(version, step, weights, ts)
        if warning is not None:
            log.warning("run %s step %d: %s", run_id, step, warning)
            return {**out, "warning": warning}
        return out

    # -- progress --------------------------------------------------------------------------------------
    def add_progress(self, run_id: str, step: int, total_steps: int, loss: float | None = None,
                     ce: float | None = None, kl: float | None = None,
                     tokens_per_s: float | None = None, onpolicy: Mapping | None = None) -> dict:
        """Record a trainer's progress report; return the progress object (:meth:`progress`'s ``latest``).
        ``onpolicy``: an on-policy step's numbers (:func:`check_onpolicy`), kept with the latest report only.

        The latest report replaces the previous one. Its loss joins the curve when it is at least ``stride``
        steps after the last point (the last step of a run always does). A report for an earlier step than
        the curve's last point (a run resumed from an older checkpoint) drops the points after it first, as
        the trainer's ``metrics.jsonl`` does.
        """
        rec = check_progress(step, total_steps, loss, ce, kl, tokens_per_s)
        with self._write() as con:
            run = con.execute("SELECT domains FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if run is None:
                raise NotFound(f"run_id: no run {run_id!r}")
            onp = check_onpolicy(onpolicy, json.loads(run["domains"]))
            prev = con.execute("SELECT stride, seq FROM progress WHERE run_id = ?", (run_id,)).fetchone()
            stride, seq = (prev["stride"], prev["seq"] + 1) if prev is not None else (1, 1)
            con.execute("DELETE FROM loss_points WHERE run_id = ? AND step > ?", (run_id, step))
            if rec["loss"] is not None:
                last = con.execute("SELECT MAX(step) FROM loss_points WHERE run_id = ?", (run_id,)).fetchone()[0]
                if last is None or step == last or step - last >= stride or step == total_steps:
                    con.execute("INSERT OR REPLACE INTO loss_points VALUES (?, ?, ?, ?, ?)",
                                (run_id, step, rec["loss"], rec["ce"], rec["kl"]))
                    n = con.execute("SELECT COUNT(*) FROM loss_points WHERE run_id = ?", (run_id,)).fetchone()[0]
                    if n > LOSS_POINTS:  # every second point goes (never the last), the spacing doubles
                        con.execute(
                            "DELETE FROM loss_points WHERE run_id = ? AND step IN (SELECT step FROM "
                            "(SELECT step, ROW_NUMBER() OVER (ORDER BY step) AS i FROM loss_points "
                            "WHERE run_id = ?) WHERE i % 2 = 0 AND i < ?)", (run_id, run_id, n))
                        stride *= 2
            ts = now()
            con.execute(
                "INSERT OR REPLACE INTO progress (run_id, step, total_steps, loss, ce, kl, tokens_per_s, stride, "
                "seq, updated_at, onpolicy) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, step, total_steps, rec["loss"], rec["ce"], rec["kl"], rec["tokens_per_s"], stride, seq,
                 ts, None if onp is None else json.dumps(onp)))
        return {**rec, "updated_at": ts, **({"onpolicy": onp} if onp is not None else {})}

    def progress(self, run_id: str) -> dict:
        """``{"latest": progress object or None, "points": [{"step", "loss", "ce", "kl"}, ...]}`` in step order;
        the progress object has ``onpolicy`` when its report did."""
        con = self._connect()
        if con.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is None:
            raise NotFound(f"run_id: no run {run_id!r}")
        points = con.execute("SELECT step, loss, ce, kl FROM loss_points WHERE run_id = ? ORDER BY step",
                             (run_id,)).fetchall()
        return {"latest": self.latest_progress(run_id), "points": [dict(p) for p in points]}

    def latest_progress(self, run_id: str) -> dict | None:
        row = self._connect().execute("SELECT * FROM progress WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            return None
        out = {k: row[k] for k in ("step", "total_steps", "loss", "ce", "kl", "tokens_per_s", "updated_at")}
        if row["onpolicy"] is not None:  # an on-policy step's numbers, only when the report had them
            out["onpolicy"] = json.loads(row["onpolicy"])
        return out

    def status(self, run_id: str, weights: WeightsVersion | None = None, created_at: str | None = None) -> dict:
        """A run at a glance: ``{"state", "step", "total_steps", "loss", "tokens_per_s", "version",
        "updated_at"}``. ``state`` is ``created`` (no progress yet), ``training`` or ``finished`` (step =
        total_steps); ``updated_at`` is the latest of its creation, last version and last progress report."""
        if weights is None or created_at is None:
            run = self.get_run(run_id)
            weights, created_at = run["weights"], run["created_at"]
        p = self.latest_progress(run_id)
        state = "created" if p is None else "finished" if p["step"] >= p["total_steps"] else "training"
        stamps = [created_at, weights["updated_at"]] + ([p["updated_at"]] if p else [])
        return {"state": state, "step": p and p["step"], "total_steps": p and p["total_steps"],
                "loss": p and p["loss"], "tokens_per_s": p and p["tokens_per_s"], "version": weights["version"],
                "updated_at": max(stamps)}  # one ISO format throughout, so the text order is the time order

    def marks(self) -> dict[str, tuple[int, int]]:
        """run_id -> (last version, progress reports so far), oldest run first: what the all-runs event stream
        compares to find what changed (in this process or in another one writing the same file)."""
        rows = self._connect().execute(
            "SELECT r.run_id, (SELECT MAX(version) FROM versions v WHERE v.run_id = r.run_id) AS version, "
            "COALESCE(p.seq, 0) AS seq FROM runs r LEFT JOIN progress p ON p.run_id = r.run_id "
            "ORDER BY r.created_at, r.run_id").fetchall()
        return {r["run_id"]: (r["version"], r["seq"]) for r in rows}

    # -- reads -----------------------------------------------------------------------------------------
    def weights(self, run_id: str) -> WeightsVersion:
        """The current weights object: {"version", "step", "weights", "updated_at"}."""
        row = self._connect().execute(
            "SELECT version, step, weights, created_at FROM versions WHERE run_id = ? "
            "ORDER BY version DESC LIMIT 1", (run_id,)).fetchone()
        if row is None:
            raise NotFound(f"run_id: no run {run_id!r}")
        return _weights_version(row)

    def history(self, run_id: str) -> list[dict]:
        """Every version in order, with its step, losses, ratios and weights; also ``tokens``, ``diagnostics``,
        ``log_ratio_se`` and ``signal`` (not ``ratio``) when the evaluation carried them, ``warning`` when its answer had one and ``policy_state``
        when the policy keeps one."""
        rows = self._connect().execute("SELECT * FROM versions WHERE run_id = ? ORDER BY version",
                                       (run_id,)).fetchall()
        if not rows:
            raise NotFound(f"run_id: no run {run_id!r}")
        out = []
        for r in rows:
            v = {"version": r["version"], "step": r["step"], "student_loss": _loads(r["student_loss"]),
                 "teacher_loss": _loads(r["teacher_loss"]), "ratio": _loads(r["ratio"]),
                 "weights": json.loads(r["weights"]), "created_at": r["created_at"]}
            if r["tokens"] is not None:
                v["tokens"] = json.loads(r["tokens"])
            if r["diagnostics"] is not None:
                v["diagnostics"] = json.loads(r["diagnostics"])
            if r["log_ratio_se"] is not None:
                v["log_ratio_se"] = json.loads(r["log_ratio_se"])
            if r["warning"] is not None:
                v["warning"] = r["warning"]
            if r["signal"] is not None:
                v["signal"] = r["signal"]
            if r["state"] is not None:
                v["policy_state"] = json.loads(r["state"])
            out.append(v)
        return out

    def policy_state(self, run_id: str) -> State:
        """The policy's state after the run's last version (None: none kept, or no evaluation yet)."""
        row = self._connect().execute("SELECT state FROM versions WHERE run_id = ? ORDER BY version DESC LIMIT 1",
                                      (run_id,)).fetchone()
        if row is None:
            raise NotFound(f"run_id: no run {run_id!r}")
        return _loads(row["state"])

    def weights_since(self, run_id: str, version: int) -> list[WeightsVersion]:
        """Weights objects of the versions after ``version``, in order (the SSE push catches up with these)."""
        rows = self._connect().execute(
            "SELECT version, step, weights, created_at FROM versions WHERE run_id = ? AND version > ? "
            "ORDER BY version", (run_id, version)).fetchall()
        return [_weights_version(r) for r in rows]

    def counts(self) -> dict:
        """Totals for /metrics: runs and evaluations (versions >= 1)."""
        con = self._connect()
        runs = con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        evals = con.execute("SELECT COUNT(*) FROM versions WHERE version > 0").fetchone()[0]
        return {"runs": runs, "evaluations": evals}

    def current_all(self) -> list[tuple[str, WeightsVersion]]:
        """(run_id, weights object) for every run, for /metrics."""
        rows = self._connect().execute(
            "SELECT v.run_id, v.version, v.step, v.weights, v.created_at FROM versions v "
            "JOIN (SELECT run_id, MAX(version) AS m FROM versions GROUP BY run_id) l "
            "ON v.run_id = l.run_id AND v.version = l.m ORDER BY v.run_id").fetchall()
        return [(r["run_id"], _weights_version(r)) for r in rows]

    def ping(self) -> None:
        self._connect().execute("SELECT 1").fetchone()


def _signal_column(signal: str | None) -> str | None:
    """What the signal columns hold: NULL for ``ratio`` (as rows written before the column), else the name."""
    return None if signal in (None, "ratio") else signal


def _weights_version(row: sqlite3.Row) -> WeightsVersion:
    """A versions row -> the weights object the API serves (the row's created_at is its updated_at)."""
    return weights_version(row["version"], row["step"], json.loads(row["weights"]), row["created_at"])


def _spec(row: sqlite3.Row) -> RunSpec:
    return RunSpec(row["run_id"], tuple(json.loads(row["domains"])), row["policy"], row["alpha"],
                   row["interval_steps"], _loads(row["initial_weights"]), _loads(row["policy_params"]),
                   row["gap_estimate"] or "raw")


def _migrate(con: sqlite3.Connection) -> None:
    """Add the :data:`MIGRATIONS` columns a file lacks (a file from an older controller keeps working)."""
    for table, column, decl in MIGRATIONS:
        have = {r[1] for r in con.execute(f"PRAGMA table_info({table})").fetchall()}
        if column not in have:
            try:
                con.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
                log.info("database: added column %s.%s", table, column)
            except sqlite3.OperationalError as e:  # another process added it first
                if "duplicate column" not in str(e):
                    raise
