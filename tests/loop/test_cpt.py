"""`ddk train` in CPT mode (the paper's CE-only baseline) end to end: no teacher URL, so no teacher call.

A teacher is running anyway, so that its request counter can show that nobody asked it anything.
Its own module so that `pytest -n 2 --dist loadfile` runs it beside test_train_e2e.py.
"""

from __future__ import annotations

import httpx
import pytest

from procs import service
from test_train_e2e import _lines, _run_train, _topk_requests

pytestmark = pytest.mark.slow


def test_cpt_makes_no_teacher_calls(kit, tmp_path):
    logs = tmp_path
    with service(["teacher", "serve", "--model", str(kit / "teacher"), "--backend", "hf"],
                 log_path=logs / "teacher.log") as (teacher, _), \
            service(["controller", "serve", "--db", str(logs / "controller.sqlite")],
                    log_path=logs / "controller.log") as (controller, _):
        _check_cpt(kit, tmp_path, teacher, controller)


def _check_cpt(kit, workdir, teacher, controller):
    before = _topk_requests(teacher)
    out = workdir / "cpt"
    proc = _run_train(kit, out, "e2e-cpt", None, controller, "kd.gamma=0", "mixture.policy=fixed",
                      "ray.num_workers=1", "train.steps=4", "mixture.interval_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _topk_requests(teacher) == before
    history = httpx.get(f"{controller}/v1/runs/e2e-cpt/history", timeout=10).json()["versions"]
    assert [v["step"] for v in history] == [None, 0, 2, 4]
    first = history[1]
    assert first["teacher_loss"] == pytest.approx(first["student_loss"])  # documented CPT convention
    assert all(v["weights"] == history[0]["weights"] for v in history)
    steps = [r for r in _lines(out) if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and all(r["kl"] == 0 for r in steps)
    assert (out / "final" / "model.safetensors").is_file()
