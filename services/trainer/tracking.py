"""Experiment tracking: the records of ``metrics.jsonl``, also sent to TensorBoard, MLflow and Weights & Biases.

What is tracked is exactly what ``metrics.jsonl`` holds: rank 0's :class:`~ddk.trainer.metrics.MetricsWriter` is
wrapped (:func:`tracked_writer`) so that every record it writes also goes to :meth:`Trackers.log`, as scalars at
the record's ``step``. Names are ``<prefix>/<field>`` and ``<prefix>/<field>/<domain>`` for the per-domain ones
(:func:`scalars`), with the prefix ``train`` for ``step`` records and the event's own name for the others:
``train/loss``, ``train/ce``, ``train/kl``, ``train/lr``, ``train/tokens_per_s``, ``train/weights/code``,
``train/rows/code``, ``eval/student_loss/code``, ``eval/teacher_loss/code``, ``eval/ratio/code``,
``eval/weights/code``, ``weights/version`` (a late controller answer), ``end/wall_s`` ...  The config goes once,
at the start (:meth:`Trackers.log_params`).

The backends (``logging.*`` in the config, all off by default) use the libraries' own clients:

* ``logging.tensorboard: true``: ``torch.utils.tensorboard.SummaryWriter`` on ``output_dir/tb`` (needs the
  ``tensorboard`` package); the config as a text summary.
* ``logging.mlflow: {tracking_uri, experiment}``: ``mlflow.tracking.MlflowClient`` (no global active run, so two
  in-process runs do not mix): one MLflow run named after ``run_id``, the config flattened into params.
  No ``tracking_uri``: ``$MLFLOW_TRACKING_URI``, else a file store in ``output_dir/mlruns``. MLflow 3 refuses a
  file store unless ``MLFLOW_ALLOW_FILE_STORE`` is set; a file store named in the config is taken as that opt-in.
* ``logging.wandb: {project, mode}``: ``wandb.init(project, name=run_id, mode, reinit="create_new")``, the run's
  files under ``$WANDB_DIR``, else ``output_dir``; ``mode: offline`` writes them for a later ``wandb sync``.

Each package is an optional extra (``pip install 'ddk[tracking]'``), imported only when configured.
``ddk train`` checks before Ray starts that the configured ones import (:func:`check_packages`: exit 2). A tracker
that fails later (when it starts on the worker, or mid-run) is logged once as a warning and dropped: tracking
never stops training.

A resumed run (restarted from a checkpoint in the same ``output_dir``) continues the same MLflow and W&B runs
(their ids are kept in ``output_dir/tracking.json``), and TensorBoard hides what the interrupted attempt wrote
after the checkpoint (``SummaryWriter(purge_step=step + 1)``).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import time
from collections.abc import Iterable
from numbers import Real
from pathlib import Path
from typing import Any

from ddk.errors import UsageError
from ddk.trainer.config import is_local_path

log = logging.getLogger("ddk.trainer")

INSTALL_HINT = "pip install 'ddk[tracking]'"
MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # logging key -> package
TB_DIR = "tb"
STATE_FILE = "tracking.json"  # the MLflow and W&B run ids, for a resumed run
PREFIX = {"step": "train"}  # the event -> name prefix; other events are their own prefix
DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow stores that need SQLAlchemy (full mlflow)


def configured(cfg) -> list[str]:
    """The trackers a config turns on (``cfg`` a TrainConfig), in a fixed order."""
    lg = cfg.logging
    return [name for name, on in (("tensorboard", lg.tensorboard), ("mlflow", lg.mlflow is not None),
                                  ("wandb", lg.wandb is not None)) if on]


def check_packages(cfg) -> None:
    """Each configured tracker's package imports (UsageError -> exit 2 otherwise): the driver, before Ray."""
    for name in configured(cfg):
        module = MODULES[name]
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is None or e.name.split(".")[0] == module:
                raise UsageError(f"logging.{name}: the {module} package is not installed ({INSTALL_HINT})") from None
            raise UsageError(f"logging.{name}: {module} cannot be imported ({e})") from None
        except Exception as e:  # noqa: BLE001 -- a broken install is bad input too
            raise UsageError(f"logging.{name}: {module} cannot be imported ({type(e).__name__}: {e})") from None
    if cfg.logging.mlflow is not None:
        uri = cfg.logging.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
        if uri.split(":", 1)[0].split("+", 1)[0] in DB_SCHEMES:
            try:
                importlib.import_module("sqlalchemy")
            except ImportError:
                raise UsageError(f"logging.mlflow.tracking_uri: {uri.split(':', 1)[0]}: a database store needs "
                                 "the full mlflow package (pip install mlflow); mlflow-skinny has no SQLAlchemy") \
                    from None


# ----------------------------------------------------------------------------------------------------------
# records -> scalars (pure)

def _segment(name: Any) -> str:
    """A name part every backend takes as it is (MLflow is the strictest: no path tricks, few characters)."""
    s = re.sub(r"[^A-Za-z0-9_\-. ]", "_", str(name))
    return "_" if s in ("", ".", "..") else s


def _number(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def scalars(record: dict) -> tuple[int, dict[str, float]] | None:
    """A metrics.jsonl record -> (step, {name: value}): every number in it, the per-domain dicts flattened.
    None for a record without an event or an integer step. Null values are left out."""
    event, step = record.get("event"), record.get("step")
    if not isinstance(event, str) or not _number(step) or int(step) != step:
        return None
    prefix = _segment(PREFIX.get(event, event))
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in ("event", "step"):
            continue
        if isinstance(value, dict):
            for sub, v in value.items():
                if _number(v):
                    out[f"{prefix}/{_segment(key)}/{_segment(sub)}"] = float(v)
        elif _number(value):
            out[f"{prefix}/{_segment(key)}"] = float(value)
    return int(step), out


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """A nested config dict -> {"train.steps": "4", ...}; lists as JSON, None as "null" (MLflow's params)."""
    out: dict[str, str] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, str) else json.dumps(v)
    return out


def config_dict(config: Any) -> dict:
    """A TrainConfig (or an already plain dict) as plain JSON data."""
    return config.model_dump(mode="json") if hasattr(config, "model_dump") else dict(config)


# ----------------------------------------------------------------------------------------------------------
# the backends: name, log(step, values), log_params(config dict), close(finished), state()

class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, out_dir: Path, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # a resumed attempt rewrites what came after its checkpoint: hide the earlier attempt's events from then
        self.writer = SummaryWriter(log_dir=str(out_dir / TB_DIR),
                                    purge_step=resume_step + 1 if resume_step is not None else None)

    def log(self, step: int, values: dict[str, float]) -> None:
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, global_step=step)

    def log_params(self, config: dict) -> None:
        text = json.dumps(config, indent=1)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "), global_step=0)  # a code block

    def close(self, finished: bool) -> None:
        self.writer.close()

    def state(self) -> dict:
        return {}


class MLflowTracker:
    name = "mlflow"

    def __init__(self, section, run_name: str, out_dir: Path, previous: dict) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = section.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or (out_dir / "mlruns").as_uri()
        if uri.startswith("file:") or is_local_path(uri):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's opt-in: a file store was asked for
        self.uri, self.experiment = uri, section.experiment
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(section.experiment)
        if exp is not None:
            exp_id = exp.experiment_id
        else:
            try:
                exp_id = self.client.create_experiment(section.experiment)
            except MlflowException:  # created meanwhile by another run
                exp_id = self.client.get_experiment_by_name(section.experiment).experiment_id
        self.run_id = None
        if previous.get("run_id") and previous.get("tracking_uri") == uri \
                and previous.get("experiment") == section.experiment:
            try:
                self.client.update_run(previous["run_id"], status="RUNNING")
                self.run_id = previous["run_id"]
            except MlflowException as e:
                log.warning("logging.mlflow: cannot continue MLflow run %s (%s); starting a new one",
                            previous["run_id"], e)
        if self.run_id is None:
            self.run_id = self.client.create_run(exp_id, run_name=run_name,
                                                 tags={"ddk.run_id": run_name}).info.run_id
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        self._max_len, self._per_batch = MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH
        log.info("logging.mlflow: run %s in experiment %s at %s", self.run_id, section.experiment, uri)

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def log_params(self, config: dict) -> None:
        from mlflow.entities import Param

        params = {re.sub(r"[^A-Za-z0-9_\-. /]", "_", k): v[:self._max_len] for k, v in flatten(config).items()}
        have = self.client.get_run(self.run_id).data.params  # a resumed run has them (MLflow's are write-once)
        changed = sorted(k for k in params if k in have and have[k] != params[k])
        if changed:
            log.info("logging.mlflow: resumed run keeps its first values of %s", ", ".join(changed))
        todo = [Param(k, v) for k, v in params.items() if k not in have]
        for i in range(0, len(todo), self._per_batch):
            self.client.log_batch(self.run_id, params=todo[i:i + self._per_batch])

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if finished else "FAILED")

    def state(self) -> dict:
        return {"run_id": self.run_id, "tracking_uri": self.uri, "experiment": self.experiment}


class WandbTracker:
    name = "wandb"

    def __init__(self, section, run_name: str, out_dir: Path, previous: dict) -> None:
        import wandb

        run_id = previous.get("run_id") if previous.get("project") == section.project else None
        self.project = section.project
        # console="off": the process's stdout is left alone (the trainer's log is Ray's or the caller's)
        self.run = wandb.init(project=section.project, name=run_name, id=run_id,  # None: a new id
                              resume="allow", mode=section.mode,
                              dir=None if os.environ.get("WANDB_DIR") else str(out_dir),  # None: wandb's own
                              reinit="create_new", settings=wandb.Settings(console="off"))
        log.info("logging.wandb: run %s in project %s (%s), files in %s", self.run.id, section.project,
                 self.run.settings.mode, self.run.dir)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def log_params(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)

    def state(self) -> dict:
        return {"run_id": self.run.id, "project": self.project}


def _build(name: str, cfg, out_dir: Path, resume_step: int | None, previous: dict):
    if name == "tensorboard":
        return TensorBoardTracker(out_dir, resume_step)
    if name == "mlflow":
        return MLflowTracker(cfg.logging.mlflow, cfg.run_id, out_dir, previous)
    return WandbTracker(cfg.logging.wandb, cfg.run_id, out_dir, previous)


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


# ----------------------------------------------------------------------------------------------------------
# all of them

class Trackers:
    """The configured trackers of one run (rank 0 only). Every call goes to each; one that raises is logged
    once and dropped, so none of these methods raises."""

    def __init__(self, backends: Iterable[Any] = ()) -> None:
        self.backends = list(backends)
        self.finished = False  # an ``end`` record was logged: the trackers close the run as finished

    @classmethod
    def from_config(cls, cfg, resume_step: int | None = None) -> "Trackers":
        """Start the trackers ``cfg.logging`` turns on; ``resume_step``: the checkpoint a resumed run restarted
        from (None: a fresh start), which continues the MLflow and W&B runs of ``output_dir/tracking.json``."""
        out = Path(cfg.output_dir)
        saved = _read_state(out) if resume_step is not None else {}
        backends = []
        for name in configured(cfg):
            try:
                backends.append(_build(name, cfg, out, resume_step, saved.get(name) or {}))
            except Exception as e:  # noqa: BLE001 -- tracking never stops training
                log.warning("logging.%s: could not start (%s); the run goes on without it", name, _why(e))
        trackers = cls(backends)
        trackers._save_state(out, saved)
        return trackers

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.backends]

    def __bool__(self) -> bool:
        return bool(self.backends)

    def log(self, record: dict) -> None:
        """One metrics.jsonl record, as scalars at its step."""
        got = scalars(record)
        if got is None:
            return
        if record.get("event") == "end":
            self.finished = True
        step, values = got
        if values:
            self._each("log", step, values)

    def log_params(self, config: Any) -> None:
        """The run's config (a TrainConfig or its plain dict), once at the start."""
        self._each("log_params", config_dict(config))

    def close(self) -> None:
        for b in list(self.backends):
            try:
                b.close(self.finished)
            except Exception as e:  # noqa: BLE001
                log.warning("logging.%s: closing failed (%s)", b.name, _why(e))
        self.backends = []

    def _each(self, method: str, *args) -> None:
        for b in list(self.backends):
            try:
                getattr(b, method)(*args)
            except Exception as e:  # noqa: BLE001 -- tracking never stops training
                self.backends.remove(b)
                log.warning("logging.%s: %s failed (%s); the run goes on without %s", b.name, method, _why(e),
                            b.name)
                try:
                    b.close(False)
                except Exception:  # noqa: BLE001 -- it is gone already
                    pass

    def _save_state(self, out: Path, saved: dict) -> None:
        state = {**saved, **{b.name: b.state() for b in self.backends if b.state()}}
        if not state:
            return
        try:
            tmp = out / (STATE_FILE + ".tmp")
            tmp.write_text(json.dumps(state, indent=1), encoding="utf-8")
            os.replace(tmp, out / STATE_FILE)
        except OSError as e:
            log.warning("logging: cannot write %s (%s); a resumed run will start new tracker runs",
                        out / STATE_FILE, e)


def _read_state(out: Path) -> dict:
    try:
        state = json.loads((out / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


class TrackedWriter:
    """A :class:`~ddk.trainer.metrics.MetricsWriter` whose every record also goes to the trackers."""

    def __init__(self, writer, trackers: Trackers) -> None:
        self.writer, self.trackers = writer, trackers

    def write(self, record: dict) -> None:
        self.writer.write(record)
        self.trackers.log(record)

    def close(self) -> None:
        try:
            self.writer.close()
        finally:
            self.trackers.close()

    def __getattr__(self, name: str) -> Any:  # path and the rest of the writer
        return getattr(self.writer, name)


def tracked_writer(writer, cfg, resume_step: int | None = None):
    """``writer`` itself when no tracker is configured; else a :class:`TrackedWriter` over the started
    trackers, the config already logged to them."""
    if not configured(cfg):
        return writer
    trackers = Trackers.from_config(cfg, resume_step)
    trackers.log_params(cfg)
    return TrackedWriter(writer, trackers)
