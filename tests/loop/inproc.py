"""The Trainer in-process (one rank, LocalContext, no Ray) against real teacher and controller servers.

What a loop-level property needs is the loop, the teacher client and the controller client, all real;
Ray adds only the process around it (tests/e2e/test_train_ray.py keeps what only Ray shows). ``train`` runs
the same steps as ``ddk train`` does: ``load_config`` -> ``prepare`` (checks, data cache, teacher losses,
the run at the controller) -> ``Trainer(job, LocalContext(output_dir)).fit()``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import httpx

TIMEOUT = 600  # one run on a loaded 2-core machine


def config(kit: Path, out: Path, run_id: str, teacher: str | None, controller: str | None, *sets: str):
    """The kit's train.yaml with the test's overrides, validated as `ddk train` validates it."""
    from ddk.trainer.config import load_config

    base = [f"run_id={run_id}", f"output_dir={out}", f"data.cache_dir={kit.parent / 'token-cache'}",
            f"teacher.urls=[{teacher}]" if teacher else "teacher.urls=[]",
            f"controller.url={controller}" if controller else "controller.url=null",
            "eval.sequences_per_domain=8"]
    return load_config(kit / "train.yaml", [*base, *sets])


def train(kit: Path, out: Path, run_id: str, teacher: str | None, controller: str | None, *sets: str,
          fault_at_steps: list[int] | None = None) -> dict:
    """One in-process run to the end; the Trainer's summary."""
    from ddk.trainer.launch import prepare
    from ddk.trainer.loop import LocalContext, Trainer

    cfg = config(kit, out, run_id, teacher, controller, *sets)
    job = prepare(cfg)
    if fault_at_steps is not None:
        job.fault_at_steps = list(fault_at_steps)
    return Trainer(job, LocalContext(cfg.output_dir)).fit()


def lines(out: Path) -> list[dict]:
    """metrics.jsonl, a line being written skipped."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


def steps_of(records: list[dict]) -> list[int]:
    return [r["step"] for r in records if r["event"] == "step"]


def history(controller: str, run_id: str) -> list[dict]:
    return httpx.get(f"{controller}/v1/runs/{run_id}/history", timeout=10).json()["versions"]


def topk_requests(teacher: str) -> float:
    """The teacher's top-k request counter (all statuses) from its Prometheus text."""
    text = httpx.get(teacher + "/metrics", timeout=10).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("ddk_teacher_requests_total")]
    assert values or "ddk_teacher_requests" in text, text[:500]
    return sum(values)


class LogCapture(logging.Handler):
    """Every record of the ``ddk`` loggers while installed, as text (the in-process run's log)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[str] = []
        self._lock_ = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock_:
            self.records.append(f"{record.levelname} {record.name}: {record.getMessage()}")

    def text(self) -> str:
        with self._lock_:
            return "\n".join(self.records)


def preload() -> None:
    """Import what a run imports, in the calling thread: transformers resolves its lazy attributes on first
    use, which is not thread-safe (two runs starting at once in two threads saw "cannot import name
    AutoConfig"). Call it before starting runs from several threads."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import ddk.trainer.launch  # noqa: F401
    import ddk.trainer.loop  # noqa: F401


class Background:
    """``train(...)`` in a thread, with a view on its metrics.jsonl while it runs."""

    def __init__(self, kit: Path, out: Path, run_id: str, teacher, controller, *sets: str):
        self.out, self.run_id = out, run_id
        self.summary: dict | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(kit, out, run_id, teacher, controller, *sets),
                                        name=f"train-{run_id}", daemon=True)

    def _run(self, *args) -> None:
        try:
            self.summary = train(*args)
        except BaseException as e:  # noqa: BLE001 -- handed to the test by wait()
            self.error = e

    def start(self) -> "Background":
        self._thread.start()
        return self

    def lines(self) -> list[dict]:
        return lines(self.out)

    def wait_for(self, what: str, predicate, timeout: float = TIMEOUT) -> dict:
        """The first metrics line matching ``predicate``; fails if the run ends or times out first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for r in self.lines():
                if predicate(r):
                    return r
            if not self._thread.is_alive():
                raise AssertionError(f"the run ended ({self.error!r}) before {what}")
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")

    def seen_before(self, predicate, deadline: float) -> bool:
        """Whether a metrics line matches ``predicate`` before ``deadline`` (``time.monotonic()``); fails if the
        run ends first."""
        while time.monotonic() < deadline:
            if any(predicate(r) for r in self.lines()):
                return True
            if not self._thread.is_alive():
                raise AssertionError(f"the run ended ({self.error!r}) while waiting")
            time.sleep(0.1)
        return any(predicate(r) for r in self.lines())

    def wait(self, timeout: float = TIMEOUT) -> dict:
        """The run's summary; re-raises what ended it."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"run {self.run_id} still running after {timeout}s"
        if self.error is not None:
            raise self.error
        return self.summary


def run_train_argv(run_id: str, argv: list[str]) -> int:
    """``ddk train CONFIG --set ...`` (an argv as ``ddk compare`` builds it) in-process: the driver's steps
    without Ray (prepare, the Trainer under LocalContext, the driver's outputs)."""
    from ddk.cli import build_parser
    from ddk.trainer.config import load_config
    from ddk.trainer.launch import finish, prepare
    from ddk.trainer.loop import LocalContext, Trainer

    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    Trainer(prepare(cfg), LocalContext(cfg.output_dir)).fit()
    finish(Path(cfg.output_dir))
    return 0
