"""Experiment tracking in a real run: one short in-process DDK run (inproc.py) with TensorBoard, MLflow (a local
file store) and W&B (offline) all on, each read back with its own reader and compared with metrics.jsonl, value for
value at the same steps. A fourth tracker that fails mid-run is dropped and the run finishes.

The pure parts (names, config section, package check, resume): tests/unit/test_tracking.py.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from inproc import lines, train

pytestmark = pytest.mark.slow

RUN = "loop-tracking"
STEPS, K = 4, 2


def expected(records: list[dict]) -> dict[str, dict[int, float]]:
    """{name: {step: value}} of every number in the metrics lines, by the names of docs/training.md."""
    out: dict[str, dict[int, float]] = {}
    for r in records:
        prefix = "train" if r["event"] == "step" else r["event"]
        for k, v in r.items():
            if k in ("event", "step"):
                continue
            items = v.items() if isinstance(v, dict) else [(None, v)]
            for d, x in items:
                if isinstance(x, (int, float)) and not isinstance(x, bool):
                    out.setdefault(f"{prefix}/{k}" + (f"/{d}" if d else ""), {})[r["step"]] = float(x)
    return out


def wandb_history(run_dir: Path) -> dict[int, dict]:
    """The history rows ({_step: row}) of an offline W&B run's ``run-<id>.wandb``: wandb's record log (a
    ``:W&B`` header, then 32 KiB blocks of chunks with a 7-byte header: crc32, length, type) of protobuf
    ``Record``s. wandb ships the message types, no longer a reader."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    rows, pos, chunk, block = {}, 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, size, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if size == 0 and kind == 0:
            break
        chunk += data[pos + 7:pos + 7 + size]
        pos += 7 + size
        if kind in (1, 4):  # full, last
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
                rows[row["_step"]] = row
    return rows


class FailingTracker:
    """A tracker whose backend goes away after step 2."""

    name = "failing"

    def __init__(self):
        self.steps = []

    def log(self, step, values):
        if step > 2:
            raise ConnectionError("tracking server went away")
        self.steps.append(step)

    def log_params(self, config):
        pass

    def close(self, finished):
        pass

    def state(self):
        return {}


def test_trackers_hold_what_metrics_jsonl_holds(kit, teacher_url, controller_url, tmp_path, monkeypatch, ddk_log):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ddk.trainer import tracking

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    for var, sub in (("WANDB_CACHE_DIR", "wandb-cache"), ("WANDB_CONFIG_DIR", "wandb-config")):  # not in ~
        monkeypatch.setenv(var, str(tmp_path / sub))
    (tmp_path / "wandb").mkdir()
    failing = FailingTracker()
    start = tracking.Trackers.from_config.__func__

    def with_a_failing_one(cls, cfg, resume_step=None):
        trackers = start(cls, cfg, resume_step)
        trackers.backends.append(failing)
        return trackers

    monkeypatch.setattr(tracking.Trackers, "from_config", classmethod(with_a_failing_one))
    uri = (tmp_path / "mlruns").as_uri()
    out = tmp_path / "run"
    summary = train(kit, out, RUN, teacher_url, controller_url, f"train.steps={STEPS}",
                    f"mixture.interval_steps={K}", "train.batch_size=4", "eval.sequences_per_domain=4",
                    "logging.tensorboard=true", f"logging.mlflow.tracking_uri={uri}",
                    "logging.mlflow.experiment=ddk-tests", "logging.wandb={project: ddk-tests, mode: offline}")
    assert summary["step"] == STEPS

    records = lines(out)
    want = expected(records)
    assert [r["step"] for r in records if r["event"] == "eval"] == [0, 2, 4]
    domains = sorted(records[0]["student_loss"])
    for name in ["train/loss", "train/ce", "train/kl", "train/lr", "train/tokens_per_s", "eval/version"] + [
            f"{k}/{d}" for k in ("train/weights", "eval/ratio", "eval/student_loss", "eval/teacher_loss")
            for d in domains]:
        assert name in want, name
    assert sorted(want["train/loss"]) == [1, 2, 3, 4] and sorted(want["eval/ratio/" + domains[0]]) == [0, 2, 4]

    # the failing tracker: dropped at step 3 with one warning; the others got everything
    assert failing.steps == [0, 1, 2, 2]  # eval 0, steps 1-2, eval 2
    warnings = [line for line in ddk_log.text().splitlines() if "logging.failing" in line]
    assert warnings == [("WARNING ddk.trainer: logging.failing: log failed (ConnectionError: tracking server went "
                         "away); the run goes on without failing")]

    # TensorBoard: event files in output_dir/tb (float32 values)
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == set(want)
    for name, by_step in want.items():
        got = {e.step: e.value for e in acc.Scalars(name)}
        assert got == pytest.approx(by_step, rel=1e-6), name

    # MLflow: the run in the file store, its metric histories and params
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ddk-tests").experiment_id])
    assert run.info.run_name == RUN and run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == str(STEPS) and run.data.params["logging.tensorboard"] == "true"
    assert set(run.data.metrics) == set(want)
    for name, by_step in want.items():
        assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)} == by_step, name

    # W&B offline: the run's folder under $WANDB_DIR, its history rows by step
    (run_dir,) = (tmp_path / "wandb" / "wandb").glob("offline-run-*")
    rows = wandb_history(run_dir)
    assert sorted(rows) == [0, 1, 2, 3, 4]
    for name, by_step in want.items():
        assert {s: rows[s][name] for s in rows if name in rows[s]} == pytest.approx(by_step, rel=1e-12), name
    assert json.loads((out / "tracking.json").read_text())["wandb"]["project"] == "ddk-tests"
