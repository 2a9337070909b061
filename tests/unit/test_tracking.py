"""Experiment tracking (ddk.trainer.tracking): metrics records -> scalars, the ``logging`` config section, the
package check (exit 2 before Ray), trackers that fail (dropped, the run goes on) and a resumed run's trackers.

A real run read back with the libraries' own readers (TensorBoard, MLflow, W&B offline):
tests/loop/test_tracking_run.py.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import yaml

from ddk.errors import UsageError
from ddk.trainer import tracking
from ddk.trainer.config import load_config, validate_config
from ddk.trainer.tracking import TrackedWriter, Trackers, check_packages, configured, flatten, scalars

STEP = {"event": "step", "step": 3, "loss": 2.5, "ce": 2.0, "kl": 2.5, "lr": 1e-3, "tokens": 512,
        "tokens_per_s": 1000.0, "step_s": 0.5, "teacher_wait_s": 0.0, "version": 1,
        "weights": {"code": 0.75, "prose": 0.25}, "rows": {"code": 3, "prose": 1}}
EVAL = {"event": "eval", "step": 4, "student_loss": {"code": 3.0, "prose": 4.0},
        "teacher_loss": {"code": 2.0, "prose": 2.5}, "ratio": {"code": 2.718, "prose": 4.48},
        "version": 2, "weights": {"code": 0.4, "prose": 0.6}}


def test_scalars_of_a_step_line():
    step, values = scalars(STEP)
    assert step == 3
    assert values == {"train/loss": 2.5, "train/ce": 2.0, "train/kl": 2.5, "train/lr": 1e-3, "train/tokens": 512.0,
                      "train/tokens_per_s": 1000.0, "train/step_s": 0.5, "train/teacher_wait_s": 0.0,
                      "train/version": 1.0, "train/weights/code": 0.75, "train/weights/prose": 0.25,
                      "train/rows/code": 3.0, "train/rows/prose": 1.0}


def test_scalars_of_eval_weights_and_end_lines():
    step, values = scalars(EVAL)
    assert step == 4 and values["eval/student_loss/prose"] == 4.0 and values["eval/teacher_loss/code"] == 2.0
    assert values["eval/ratio/code"] == 2.718 and values["eval/weights/prose"] == 0.6 and values["eval/version"] == 2
    assert len(values) == 9
    # the controller unreachable: version and weights null, left out
    assert scalars({**EVAL, "version": None, "weights": None})[1].keys() == {
        f"eval/{k}/{d}" for k in ("student_loss", "teacher_loss", "ratio") for d in ("code", "prose")}
    assert scalars({"event": "weights", "step": 5, "eval_step": 4, "version": 3, "weights": {"code": 1.0}}) == (
        5, {"weights/eval_step": 4.0, "weights/version": 3.0, "weights/weights/code": 1.0})
    assert scalars({"event": "end", "step": 8, "wall_s": 9.5, "weights": {"code": 1.0}})[1] == {
        "end/wall_s": 9.5, "end/weights/code": 1.0}


def test_scalars_skip_what_is_not_a_number_and_make_names_safe():
    record = {"event": "eval", "step": 2, "flag": True, "note": "x", "ratio": {"a/b": 1.0, "..": 2.0, "x:y": 3,
                                                                                "ok": "no"}}
    assert scalars(record) == (2, {"eval/ratio/a_b": 1.0, "eval/ratio/_": 2.0, "eval/ratio/x_y": 3.0})
    assert scalars({"step": 1, "loss": 1.0}) is None
    assert scalars({"event": "step", "step": 1.5}) is None
    assert scalars({"event": "step", "step": True}) is None


def test_flatten_gives_mlflow_params():
    assert flatten({"train": {"steps": 4, "lr": 0.001}, "teacher": {"urls": ["http://a"]}, "logging": {"mlflow": None},
                    "run_id": "r", "mixture": {"initial_weights": {}}}) == {
        "train.steps": "4", "train.lr": "0.001", "teacher.urls": '["http://a"]', "logging.mlflow": "null",
        "run_id": "r", "mixture.initial_weights": "{}"}


# ----------------------------------------------------------------------------------------------------------
# the logging section

@pytest.fixture
def conf(tmp_path, monkeypatch):
    """A train.yaml next to a student dir and a data.yaml (paths resolve, nothing is loaded); the cwd is tmp."""
    d = tmp_path / "conf"
    (d / "student").mkdir(parents=True)
    (d / "data.yaml").write_text("domains: []\n")
    monkeypatch.chdir(tmp_path)

    def write(**sections) -> Path:
        raw = {"run_id": "r1", "student": {"model": "student"}, "data": {"file": "data.yaml"},
               "train": {"steps": 10}, "kd": {"gamma": 0}, "mixture": {"policy": "fixed"}, **sections}
        (d / "train.yaml").write_text(yaml.safe_dump(raw))
        return d / "train.yaml"

    return d, write


def test_logging_is_off_by_default_and_switches_on(conf):
    _, write = conf
    cfg = load_config(str(write()))
    assert (cfg.logging.tensorboard, cfg.logging.mlflow, cfg.logging.wandb) == (False, None, None)
    assert configured(cfg) == []
    cfg = load_config(str(write()), ["logging.tensorboard=true", "logging.wandb=true", "logging.mlflow.experiment=e"])
    assert configured(cfg) == ["tensorboard", "mlflow", "wandb"]
    assert (cfg.logging.wandb.project, cfg.logging.wandb.mode) == ("ddk", None)
    assert (cfg.logging.mlflow.experiment, cfg.logging.mlflow.tracking_uri) == ("e", None)
    cfg = load_config(str(write(logging={"wandb": {"project": "p", "mode": "offline"}, "mlflow": False})))
    assert configured(cfg) == ["wandb"] and cfg.logging.wandb.mode == "offline"


@pytest.mark.parametrize("overrides, key", [
    (["logging.tensorbord=true"], "logging.tensorbord: unknown key"),
    (["logging.tensorboard=maybe"], "logging.tensorboard:"),
    (["logging.wandb.mode=sometimes"], "logging.wandb.mode:"),
    (["logging.wandb.projct=x"], "logging.wandb.projct: unknown key"),
    (["logging.mlflow={experiment: ''}"], "logging.mlflow.experiment:"),
    (["logging.mlflow.uri=http://x"], "logging.mlflow.uri: unknown key"),
    (["logging=3"], "logging:"),
])
def test_logging_errors_name_the_key(conf, overrides, key):
    _, write = conf
    with pytest.raises(UsageError) as e:
        load_config(str(write()), overrides)
    assert str(e.value).startswith(key), str(e.value)


def test_a_tracking_uri_that_is_a_path_resolves_like_one(conf, tmp_path):
    d, write = conf
    cfg = load_config(str(write(logging={"mlflow": {"tracking_uri": "mlruns"}})))
    assert cfg.logging.mlflow.tracking_uri == str(d / "mlruns")                      # in the file: its dir
    cfg = load_config(str(write()), ["logging.mlflow.tracking_uri=./here"])
    assert cfg.logging.mlflow.tracking_uri == str(tmp_path / "here")                 # --set: the cwd
    for uri in ("http://mlflow:5000", "file:///tmp/mlruns", "databricks", "sqlite:///mlflow.db"):
        assert load_config(str(write()), [f"logging.mlflow.tracking_uri={uri}"]).logging.mlflow.tracking_uri == uri


# ----------------------------------------------------------------------------------------------------------
# a missing package: exit 2 before anything starts

@pytest.mark.parametrize("key, module, setting", [
    ("tensorboard", "tensorboard", "logging.tensorboard=true"),
    ("mlflow", "mlflow", "logging.mlflow=true"),
    ("wandb", "wandb", "logging.wandb={mode: offline}"),
])
def test_a_missing_package_is_exit_2_up_front(conf, monkeypatch, capsys, key, module, setting):
    from ddk.cli import main

    _, write = conf
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if it were not installed
    message = f"logging.{key}: the {module} package is not installed (pip install 'ddk[tracking]')"
    with pytest.raises(UsageError) as e:
        check_packages(load_config(str(write()), [setting]))
    assert str(e.value) == message
    # `ddk train`: exit 2 with that line, before the student is even read (its directory is empty here)
    assert main(["train", str(write()), "--set", setting]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"ddk: error: {message}"


def test_installed_packages_pass_and_a_database_store_needs_sqlalchemy(conf, monkeypatch):
    _, write = conf
    check_packages(load_config(str(write())))  # nothing configured: nothing imported
    check_packages(load_config(str(write()), ["logging.tensorboard=true", "logging.mlflow=true",
                                              "logging.wandb=true"]))
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    with pytest.raises(UsageError, match=r"^logging.mlflow.tracking_uri: sqlite: a database store needs"):
        check_packages(load_config(str(write()), ["logging.mlflow.tracking_uri=sqlite:///x.db"]))


# ----------------------------------------------------------------------------------------------------------
# failing trackers

class FakeTracker:
    def __init__(self, name: str, fail_at: int | None = None, fail_params: bool = False) -> None:
        self.name, self.fail_at, self.fail_params = name, fail_at, fail_params
        self.logged: list[tuple[int, dict]] = []
        self.params = None
        self.closed: bool | None = None

    def log(self, step, values):
        if self.fail_at is not None and step >= self.fail_at:
            raise ConnectionError("backend down\nsecond line")
        self.logged.append((step, values))

    def log_params(self, config):
        if self.fail_params:
            raise ValueError("bad param")
        self.params = config

    def close(self, finished):
        self.closed = finished

    def state(self):
        return {}


def _warnings(caplog, name):
    return [r for r in caplog.records if r.levelno == logging.WARNING and f"logging.{name}" in r.getMessage()]


def test_a_tracker_that_fails_mid_run_is_dropped_once_and_the_others_go_on(caplog):
    bad, good, params_bad = FakeTracker("mlflow", fail_at=2), FakeTracker("tensorboard"), FakeTracker("wandb",
                                                                                                     fail_params=True)
    trackers = Trackers([bad, good, params_bad])
    with caplog.at_level(logging.WARNING, logger="ddk.trainer"):
        trackers.log_params({"train": {"steps": 4}})
        for s in range(1, 5):
            trackers.log({**STEP, "step": s})
        trackers.log({"event": "end", "step": 4, "wall_s": 1.0})
        trackers.close()
    assert trackers.names == [] and good.params == {"train": {"steps": 4}}
    assert [s for s, _ in bad.logged] == [1] and bad.closed is False
    assert [s for s, _ in good.logged] == [1, 2, 3, 4, 4] and good.closed is True   # the end line: finished
    assert params_bad.closed is False and params_bad.logged == []
    (warn,) = _warnings(caplog, "mlflow")
    assert warn.getMessage() == ("logging.mlflow: log failed (ConnectionError: backend down); "
                                 "the run goes on without mlflow")
    assert len(_warnings(caplog, "wandb")) == 1 and _warnings(caplog, "tensorboard") == []


def test_the_metrics_file_is_written_whatever_the_trackers_do(tmp_path):
    from ddk.trainer.metrics import MetricsWriter, read_metrics

    fake = FakeTracker("mlflow", fail_at=2)
    writer = TrackedWriter(MetricsWriter(tmp_path / "metrics.jsonl"), Trackers([fake]))
    for s in range(1, 4):
        writer.write({**STEP, "step": s})
    writer.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert writer.path == tmp_path / "metrics.jsonl" and fake.closed is False


def _cfg(tmp_path: Path, **logging_section):
    return validate_config({"run_id": "unit-run", "student": {"model": str(tmp_path)}, "data": {"file": "x"},
                            "train": {"steps": 4}, "kd": {"gamma": 0}, "mixture": {"policy": "fixed"},
                            "output_dir": str(tmp_path / "out"), "logging": logging_section})


def test_a_tracker_that_cannot_start_is_left_out(tmp_path, monkeypatch, caplog):
    (tmp_path / "out").mkdir()

    def build(name, cfg, out, resume_step, previous):
        if name == "wandb":
            raise RuntimeError("api_key not configured (no-tty)")
        return FakeTracker(name)

    monkeypatch.setattr(tracking, "_build", build)
    with caplog.at_level(logging.WARNING, logger="ddk.trainer"):
        trackers = Trackers.from_config(_cfg(tmp_path, tensorboard=True, wandb={"mode": "online"}))
    assert trackers.names == ["tensorboard"]
    (warn,) = _warnings(caplog, "wandb")
    assert "could not start (RuntimeError: api_key not configured (no-tty))" in warn.getMessage()


def test_no_tracker_configured_leaves_the_writer_as_it_is(tmp_path):
    from ddk.trainer.metrics import MetricsWriter

    writer = MetricsWriter(tmp_path / "m.jsonl")
    assert tracking.tracked_writer(writer, _cfg(tmp_path)) is writer
    writer.close()


# ----------------------------------------------------------------------------------------------------------
# a resumed run's trackers (real MLflow file store and TensorBoard files)

def test_a_resumed_run_continues_its_mlflow_run_and_tensorboard_hides_the_lost_steps(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # the tracker opts in for a file store itself
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "out").mkdir()
    uri = (tmp_path / "mlruns").as_uri()
    cfg = _cfg(tmp_path, tensorboard=True, mlflow={"tracking_uri": uri, "experiment": "unit"})

    first = tracking.tracked_writer(_ListWriter(), cfg)
    for s in (1, 2, 3):
        first.write({"event": "step", "step": s, "loss": 10.0 + s})
    first.close()  # no end line: the MLflow run is FAILED, to be resumed
    run_id = json.loads((tmp_path / "out" / tracking.STATE_FILE).read_text())["mlflow"]["run_id"]
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "FAILED"
    assert client.get_run(run_id).data.params["train.steps"] == "4"

    # resumed from the checkpoint at step 1: steps 2 and 3 again, then the end
    cfg.train.steps = 5  # a changed param keeps its first value (MLflow params are write-once)
    second = tracking.tracked_writer(_ListWriter(), cfg, resume_step=1)
    for s in (2, 3):
        second.write({"event": "step", "step": s, "loss": 20.0 + s})
    second.write({"event": "end", "step": 3, "wall_s": 1.0})
    second.close()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "unit-run"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [
        (1, 11.0), (2, 12.0), (3, 13.0), (2, 22.0), (3, 23.0)]  # MLflow keeps both attempts' values
    assert run.data.params["train.steps"] == "4"

    acc = EventAccumulator(str(tmp_path / "out" / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 11.0), (2, 22.0), (3, 23.0)]

    # a fresh start in the same output_dir (no checkpoint): a new MLflow run
    third = tracking.tracked_writer(_ListWriter(), cfg)
    third.close()
    assert json.loads((tmp_path / "out" / tracking.STATE_FILE).read_text())["mlflow"]["run_id"] != run_id


class _ListWriter:
    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record)

    def close(self):
        pass
