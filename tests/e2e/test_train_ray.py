"""`ddk train` end to end: real Ray Train (2 CPU workers, gloo), real teacher (hf backend) and controller servers.

Ray start costs ~30 s on 2 cores, so the module makes three launches and checks everything on them:

* ``reference``: a 12-step DDK run (K=4, batch 4 per worker, checkpoints every 4 steps);
* ``resumed``: the same run under another run_id, where the last worker dies after step 6 (Ray replaces it
  and resumes from the step-4 checkpoint) and again after step 10 with no failures left
  (``ray.max_failures=1``: the run stops, exit 1), then is started again and resumes from the step-8
  checkpoint -- it must end like ``reference``. (When steps are fast, Ray Train may not have registered
  step 8 before the death at step 10; the worker then finds it in storage, checkpoint.resume_point.)
* a tokenizer mismatch (exit 2 before Ray).

The CPT run (no teacher URL at all) is in test_train_cpt.py, so that `pytest -n 2 --dist loadfile` runs it
beside this module.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from procs import DDK, REPO, service

pytestmark = pytest.mark.slow

STEPS, K, BATCH, WORKERS = 12, 4, 4, 2
TIMEOUT = 420


def _run_train(kit: Path, out: Path, run_id: str, teacher: str | None, controller: str, *extra: str,
               env: dict | None = None) -> subprocess.CompletedProcess:
    sets = [f"run_id={run_id}", f"output_dir={out}", f"controller.url={controller}",
            f"train.steps={STEPS}", f"train.batch_size={BATCH}", "train.lr=2e-3",
            f"mixture.interval_steps={K}", f"checkpoint.every_steps={K}", f"ray.num_workers={WORKERS}",
            "eval.sequences_per_domain=8", f"data.cache_dir={kit.parent / 'token-cache'}",
            f"teacher.urls=[{teacher}]" if teacher else "teacher.urls=[]", *extra]
    argv = DDK + ["train", str(kit / "train.yaml")] + [a for s in sets for a in ("--set", s)]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT,
                          env={**os.environ, **(env or {})})
    (out.parent / f"{run_id}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    return proc


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _val_loss(model_dir: Path, kit: Path, seq_len: int, n: int = 8) -> dict[str, float]:
    """Per domain, the mean next-token CE over its first n validation blocks, computed here from scratch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).float().eval()
    losses = {}
    for val in sorted((kit / "data").glob("*/val.jsonl")):
        ids: list[int] = []
        for line in val.read_text().splitlines():
            ids += tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            if len(ids) > n * (seq_len + 1):
                break
        blocks = torch.tensor(ids[: n * (seq_len + 1)]).view(-1, seq_len + 1)
        with torch.no_grad():
            logits = model(input_ids=blocks[:, :-1]).logits
        losses[val.parent.name] = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1)).item()
    return losses


def _topk_requests(teacher: str) -> float:
    """The teacher's top-k request counter (all statuses) from its Prometheus text."""
    text = httpx.get(teacher + "/metrics", timeout=10).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("ddk_teacher_requests_total")]
    assert values or "ddk_teacher_requests" in text, text[:500]
    return sum(values)


@pytest.fixture(scope="module")
def servers(kit, tmp_path_factory):
    logs = tmp_path_factory.mktemp("train-e2e-logs")
    with service(["teacher", "serve", "--model", str(kit / "teacher"), "--backend", "hf"],
                 log_path=logs / "teacher.log") as (teacher, _), \
            service(["controller", "serve", "--db", str(logs / "controller.sqlite")],
                    log_path=logs / "controller.log") as (controller, _):
        yield teacher, controller


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("train-e2e")


@pytest.fixture(scope="module")
def reference(kit, servers, workdir):
    teacher, controller = servers
    out = workdir / "reference"
    proc = _run_train(kit, out, "e2e-ref", teacher, controller)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = httpx.get(f"{controller}/v1/runs/e2e-ref/history", timeout=10).json()["versions"]
    return out, history


def test_ddk_run_follows_controller_and_improves_student(kit, reference):
    out, history = reference
    # one version per interval: the initial weights, step 0 (before training), then every K steps
    assert [(v["version"], v["step"]) for v in history] == [(0, None), (1, 0), (2, 4), (3, 8), (4, 12)]
    by_step = {v["step"]: v for v in history if v["version"] > 0}

    lines = _lines(out)
    steps = [r for r in lines if r["event"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    for r in steps:  # the batch of step s was drawn with the weights of the evaluation before it
        v = by_step[(r["step"] - 1) // K * K]
        assert r["version"] == v["version"]
        assert r["weights"] == pytest.approx(v["weights"], abs=1e-9)
        assert sum(r["rows"].values()) == BATCH * WORKERS
        assert r["kl"] > 0 and r["loss"] == pytest.approx(r["ce"] + 0.2 * r["kl"], rel=1e-4)
    # the weights were not uniform all along: the controller's DDK update was applied
    assert len({json.dumps(v["weights"], sort_keys=True) for v in history}) > 1
    evals = [r for r in lines if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [0, 4, 8, 12]
    for r in evals:
        assert r["version"] == by_step[r["step"]]["version"]
        for d, q in r["ratio"].items():
            assert q == pytest.approx(math.exp(r["student_loss"][d] - r["teacher_loss"][d]))
            assert q == pytest.approx(by_step[r["step"]]["ratio"][d], rel=1e-6)

    # outputs
    for png in ("weights.png", "ratios.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["version"] == 4
    final = out / "final"
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()
    assert not list(final.glob("*.bin")) and not list(final.glob("*.pt"))
    seq_len = json.loads((out / "config.json").read_text())["data"]["seq_len"]
    before, after = _val_loss(kit / "student", kit, seq_len), _val_loss(final, kit, seq_len)
    # DDK spends most of the 12 steps on the lagging domain, so the unweighted mean over domains may not move
    # (measured: -0.04..+0.01); the loss on the mixture the student was trained on must drop, and the most
    # sampled domain most of all (measured in a plain-PyTorch replay of these settings with the step-1 weights, 4 seeds: -0.08..-0.09 and -0.13..-0.17).
    mixture = {d: float(np.mean([r["weights"][d] for r in steps])) for d in before}
    focus = max(mixture, key=mixture.get)
    assert sum(mixture[d] * (after[d] - before[d]) for d in before) < -0.02, (mixture, before, after)
    assert after[focus] < before[focus] - 0.05, (focus, before, after)


def test_resume_after_worker_death_and_restart_matches_uninterrupted(kit, servers, workdir, reference):
    teacher, controller = servers
    ref_out, ref_history = reference
    out = workdir / "resumed"
    first = _run_train(kit, out, "e2e-resume", teacher, controller, "ray.max_failures=1",
                       env={"DDK_FAULT_AT_STEPS": "6,10"})
    assert first.returncode == 1, first.stderr[-3000:]  # the second death exceeded max_failures
    assert (out / ".fault-6").exists() and (out / ".fault-10").exists()
    done = [r["step"] for r in _lines(out) if r["event"] == "step"]
    assert max(done) == 10 and 12 not in done

    second = _run_train(kit, out, "e2e-resume", teacher, controller)
    assert second.returncode == 0, second.stderr[-3000:]
    assert re.search(r"resumed from .* at step 8", (workdir / "e2e-resume.log").read_text())

    # metrics read as one uninterrupted run
    lines = _lines(out)
    assert [r["step"] for r in lines if r["event"] == "step"] == list(range(1, STEPS + 1))
    assert [r["step"] for r in lines if r["event"] == "eval"] == [0, 4, 8, 12]
    # the controller saw the same evaluations and gave the same weights
    history = httpx.get(f"{controller}/v1/runs/e2e-resume/history", timeout=10).json()["versions"]
    assert [(v["version"], v["step"]) for v in history] == [(v["version"], v["step"]) for v in ref_history]
    for a, b in zip(history, ref_history):
        assert a["weights"] == pytest.approx(b["weights"], abs=1e-5)
    # the same model
    from safetensors.torch import load_file

    got, want = load_file(out / "final" / "model.safetensors"), load_file(ref_out / "final" / "model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)


def test_tokenizer_mismatch_is_refused_before_ray(kit, servers, workdir):
    from transformers import AutoTokenizer

    teacher, controller = servers
    student = workdir / "other-student"
    shutil.copytree(kit / "student", student)
    tok = AutoTokenizer.from_pretrained(student)
    tok.add_tokens(["<not-in-the-teacher>"])
    tok.save_pretrained(student)
    out = workdir / "mismatch"
    proc = _run_train(kit, out, "e2e-mismatch", teacher, controller, f"student.model={student}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "fingerprint" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "ray").exists()
