"""What only Ray shows: DDP across two Ray Train workers (gloo), FSDP2 equal to it, a restarted driver resuming
a run after a worker's death, and teachers routed by domain. Real teacher (hf) and controller servers.

The `ddk train` drivers run against one local Ray cluster that the module starts once (a Ray start costs ~30 s
on 2 cores): the reference and the resumed run's second launch as `ddk train` processes attached to it (their
consoles are the console test's), the resumed run's first launch in this process (``ddk.trainer.launch.main``,
what the CLI calls).
Every run of the module routes math to a specialist teacher (``teacher.routes``; the specialist is the kit's
teacher trained further on math, built once and kept in the kit) and everything else to the kit's teacher, two
teacher processes of the module that keep what they score (``--cache-dir``). The module makes two runs (three
launches) and checks everything on them:

* ``reference``: a 12-step DDK run (K=4, batch 4 per worker, checkpoints every 4 steps), its console at the
  default log level. It is also the routed run: each teacher's store says which blocks it scored, and the
  controller's teacher loss and diagnostics of math are the specialist's. Its evaluations (split over the two
  workers) are checked against a one-rank evaluation;
* ``resumed``: the same run under FSDP2 and another run_id, accumulating (2 micro-batches of 2 per worker and
  step, ``train.grad_accum_steps=2``), where the last worker dies after step 10 with no failures allowed
  (``ray.max_failures=0``: the run stops with an error, exit 1 at the CLI); started again (as `ddk --log-level
  DEBUG train`), it resumes from the step-8 sharded checkpoint and must end like ``reference``, its export loading
  with transformers;
* a route to a teacher of another tokenizer with ``kd.cross_tokenizer: off``: refused before anything starts.

Later runs get the teachers' answers from those stores (the same bytes as the engine's). A worker group
replaced by Ray Train within a DDP run, and a driver killed and restarted, are in tests/e2e/test_chaos.py. Loop-level
properties on one rank (weights follow the controller, CPT, outages, improvement) are in tests/loop/; the
`ddk train` process itself (CLI, exit codes) in the demo and the two-node Ray Job test.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

pytestmark = pytest.mark.slow

STEPS, K, BATCH, WORKERS = 12, 4, 4, 2


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster for the module, its files in a temp dir of its own (worker logs are read there)."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="ddkray-", dir="/tmp")  # short: Ray's socket paths have a limit
    ray.init(num_cpus=WORKERS, include_dashboard=False, _temp_dir=temp_dir,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}, logging_level="WARNING")
    try:
        yield Path(temp_dir)
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def worker_logs(temp_dir: Path) -> str:
    """Everything the cluster's worker processes wrote (each worker's stderr is a file of the session)."""
    return "\n".join(p.read_text(errors="replace") for p in sorted(temp_dir.glob("session_*/logs/worker-*.err")))


def ddk_train(kit: Path, out: Path, run_id: str, teachers: "Teachers", controller: str, *extra: str) -> None:
    """`ddk train kit/train.yaml --set ...`, the driver in this process on the module's Ray cluster, math routed
    to the specialist."""
    from ddk.trainer.launch import main

    sets = [f"run_id={run_id}", f"output_dir={out}", f"controller.url={controller}",
            f"teacher.urls=[{teachers.default}]", f"teacher.routes={{math: [{teachers.math}]}}",
            f"train.steps={STEPS}", f"train.batch_size={BATCH}", "train.lr=2e-3",
            f"mixture.interval_steps={K}", f"checkpoint.every_steps={K}", f"ray.num_workers={WORKERS}",
            "eval.sequences_per_domain=8", f"data.cache_dir={kit.parent / 'token-cache'}", *extra]
    assert main(argparse.Namespace(config=str(kit / "train.yaml"), overrides=sets)) == 0


def ddk_train_cli(kit: Path, out: Path, run_id: str, teachers: "Teachers", controller: str, *extra: str,
                  level: tuple[str, ...] = ()) -> list[str]:
    """The same run as :func:`ddk_train` through the `ddk train` process (attached to the module's cluster), so its
    console is what a user sees: ``level`` is the CLI's ``--log-level``. Returns the console's lines (stdout and
    stderr), also kept beside the run as ``RUN_ID.console``."""
    import os
    import subprocess
    import sys

    import ray

    sets = [f"run_id={run_id}", f"output_dir={out}", f"controller.url={controller}",
            f"teacher.urls=[{teachers.default}]", f"teacher.routes={{math: [{teachers.math}]}}",
            f"train.steps={STEPS}", f"train.batch_size={BATCH}", "train.lr=2e-3",
            f"mixture.interval_steps={K}", f"checkpoint.every_steps={K}", f"ray.num_workers={WORKERS}",
            f"ray.address={ray.get_runtime_context().gcs_address}", "eval.sequences_per_domain=8",
            f"data.cache_dir={kit.parent / 'token-cache'}", *extra]
    env = {k: v for k, v in os.environ.items() if k != "DDK_LOG_DETAIL"}  # a terminal's console, not a log file
    r = subprocess.run([sys.executable, "-m", "ddk.cli", *level, "train", str(kit / "train.yaml"),
                        *(a for s in sets for a in ("--set", s))], capture_output=True, text=True, timeout=400, env=env)
    lines = (r.stdout + r.stderr).splitlines()
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{run_id}.console").write_text("\n".join(lines))
    assert r.returncode == 0, r.stderr[-3000:]
    return lines


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("train-ray")


@dataclass
class Teachers:
    """The module's two teacher servers: the kit's teacher (``default``) and the math specialist (``math``),
    each with the store of what it scored (``--cache-dir``)."""
    default: str
    math: str
    default_store: Path
    math_store: Path


@pytest.fixture(scope="module")
def teacher_procs(kit, workdir):
    """The two teacher processes, started (not yet healthy: they load while Ray starts, see ``teachers``)."""
    import procs

    from ddk.kit.fixtures import build_specialist

    specialist = build_specialist(kit, "math")  # reused when the kit already holds it
    serve = ["teacher", "serve", "--backend", "hf"]
    started = []
    try:
        for name, model in (("default", kit / "teacher"), ("math", specialist)):
            started.append(procs.start(serve + ["--model", str(model), "--cache-dir", str(workdir / f"c-{name}")],
                                       workdir / f"teacher-{name}.log", procs.free_port(), append=False))
        yield started
    finally:
        for proc in started:
            proc.stop()


@pytest.fixture(scope="module")
def teachers(teacher_procs, ray_cluster, workdir) -> Teachers:
    """The two teachers once healthy (after ``ray_cluster``, so that they load while Ray starts)."""
    default, math = (proc.wait_healthy("/healthz", timeout=180) for proc in teacher_procs)
    return Teachers(default.url, math.url, workdir / "c-default", workdir / "c-math")


@dataclass
class Reference:
    out: Path
    history: list[dict]
    console: list[str]  # the `ddk train` process's console, at the default log level

    def __iter__(self):  # out, history = reference
        return iter((self.out, self.history))


@pytest.fixture(scope="module")
def reference(kit, teachers, controller_url, workdir) -> Reference:
    """The reference run, as a `ddk train` process attached to the module's cluster (its console is checked by
    the console test)."""
    out = workdir / "reference"
    console = ddk_train_cli(kit, out, "ray-ref", teachers, controller_url)
    history = httpx.get(f"{controller_url}/v1/runs/ray-ref/history", timeout=10).json()["versions"]
    return Reference(out, history, console)


@dataclass
class Resumed:
    out: Path
    failure: BaseException  # what the first launch raised (the worker's death, max_failures=0)
    first_steps: list[int]  # the steps the first launch logged
    fault_marked: bool      # the dying worker left its .fault-10 marker
    console: list[str]      # the second launch's console: `ddk --log-level DEBUG train`


@pytest.fixture(scope="module")
def resumed(kit, ray_cluster, teachers, controller_url, workdir, reference) -> Resumed:
    """The reference's run under FSDP2 with accumulation (2 micro-batches of 2 per worker and step): the first
    launch (in this process) loses its last worker after step 10 with ``ray.max_failures=0`` and stops with an
    error; the second, a `ddk --log-level DEBUG train` process on the same cluster, resumes from the step-8
    checkpoint."""
    import os

    out = workdir / "resumed"
    accum = ("train.strategy=fsdp", "train.batch_size=2", "train.grad_accum_steps=2")
    os.environ["DDK_FAULT_AT_STEPS"] = "10"
    try:
        with pytest.raises(Exception) as failed:  # the death exceeded max_failures: `ddk train` exits 1
            ddk_train(kit, out, "ray-resume", teachers, controller_url, "ray.max_failures=0", *accum)
    finally:
        del os.environ["DDK_FAULT_AT_STEPS"]
    done = [r["step"] for r in _lines(out) if r["event"] == "step"]
    fault_seen = (out / ".fault-10").exists()
    console = ddk_train_cli(kit, out, "ray-resume", teachers, controller_url, *accum, level=("--log-level", "DEBUG"))
    return Resumed(out, failed.value, done, fault_seen, console)


def test_ddp_run_across_two_workers_follows_the_controller(kit, reference):
    out, history = reference
    # one version per interval: the initial weights, step 0 (before training), then every K steps
    assert [(v["version"], v["step"]) for v in history] == [(0, None), (1, 0), (2, 4), (3, 8), (4, 12)]
    by_step = {v["step"]: v for v in history if v["version"] > 0}
    lines = _lines(out)
    steps = [r for r in lines if r["event"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    for r in steps:  # both ranks drew with rank 0's weights: the rows of the two workers add up
        v = by_step[(r["step"] - 1) // K * K]
        assert r["version"] == v["version"]
        assert r["weights"] == pytest.approx(v["weights"], abs=1e-9)
        assert sum(r["rows"].values()) == BATCH * WORKERS
        assert r["tokens"] == BATCH * WORKERS * 128
        assert r["kl"] > 0 and r["loss"] == pytest.approx(r["ce"] + 0.2 * r["kl"], rel=1e-4)
    assert [r["step"] for r in lines if r["event"] == "eval"] == [0, 4, 8, 12]
    # the driver's outputs
    for png in ("weights.png", "ratios.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["version"] == 4
    final = out / "final"
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()
    assert not list(final.glob("*.bin")) and not list(final.glob("*.pt"))


def test_fsdp_run_resumed_by_a_restarted_driver_ends_like_the_ddp_reference_and_exports(ray_cluster, controller_url,
                                                                                        reference, resumed):
    """train.strategy=fsdp (FSDP2 over gloo, ddk.trainer.parallel) with accumulation: the last worker dies after
    step 10 and, with ``ray.max_failures=0``, the run stops with an error (exit 1 at the CLI); the same command again
    resumes from the step-8 checkpoint (Ray Train reloads the run's checkpoint list from storage; rank 0 wrote the
    full tensors, each rank takes its slice) and the run ends like the uninterrupted DDP reference: the same rows,
    the losses, the controller's versions and weights, and the model, which loads with transformers. (When steps are
    fast, Ray Train may not have registered step 8 before the death at step 10; the worker then finds it in storage,
    checkpoint.resume_point.) Each rank draws the same rows per step and FSDP2 reduce-scatters once, on the last
    micro-batch (set_requires_gradient_sync). Ray Train replacing a dead worker within a run is the chaos test's;
    a resumed run equal to an uninterrupted one on one rank, the loop tests'."""
    ref_out, ref_history = reference
    out = resumed.out
    assert not isinstance(resumed.failure, AssertionError), resumed.failure
    assert resumed.fault_marked
    assert max(resumed.first_steps) == 10 and 12 not in resumed.first_steps
    assert re.search(r"resumed from \S*/ray-resume/step-\d+ at step 8", worker_logs(ray_cluster))
    last = max((out / "ray" / "ray-resume").glob("step-*"))  # the one layout: full tensors, any world size resumes
    assert {"model.safetensors", "state.json", "rank-0.json", "rank-1.json"} <= {p.name for p in last.iterdir()}
    assert not list(last.glob("model-rank*")) and not list(last.glob("optim-rank*"))
    from ddk.trainer import checkpoint as ckpt

    shared, _ = ckpt.load_checkpoint(last, rank=0)
    assert shared["strategy"] == "fsdp" and shared["world_size"] == 2
    assert set(shared["entries"]) == {"trainer", "mixture"}

    # metrics read as one uninterrupted run, with the reference's rows and (to FSDP's rounding) losses
    lines = _lines(out)
    assert [r["step"] for r in lines if r["event"] == "step"] == list(range(1, STEPS + 1))
    for r, ref in zip((r for r in lines if r["event"] == "step"), (r for r in _lines(ref_out) if r["event"] == "step")):
        assert r["rows"] == ref["rows"] and r["tokens"] == ref["tokens"] == BATCH * WORKERS * 128
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-4, abs=1e-5), (r["step"], r["loss"], ref["loss"])
        assert r["kl"] == pytest.approx(ref["kl"], rel=1e-3)
    assert [r["step"] for r in lines if r["event"] == "eval"] == [0, 4, 8, 12]
    # the controller saw the same evaluations and gave the same weights
    history = httpx.get(f"{controller_url}/v1/runs/ray-resume/history", timeout=10).json()["versions"]
    assert [(v["version"], v["step"]) for v in history] == [(v["version"], v["step"]) for v in ref_history]
    for a, b in zip(history, ref_history):
        assert a["weights"] == pytest.approx(b["weights"], abs=1e-4)
    # the same model, exported with its card, loading with transformers. The tolerance: FSDP reduce-scatters and
    # 2 micro-batches of 2 sum the gradient in another order than DDP's 1 of 4, and AdamW's normalisation turns
    # those ~1e-7 differences into up to ~3e-5 in the weights after 12 steps; a lost or repeated step moves weights
    # by the order of the learning rate, 2e-3
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    final = out / "final"
    assert not list(final.glob("*.bin")) and not list(final.glob("*.pt")) and (final / "README.md").is_file()
    model = AutoModelForCausalLM.from_pretrained(final, use_safetensors=True, dtype=torch.float32)
    want = load_file(ref_out / "final" / "model.safetensors")
    state = model.state_dict()
    for k in want:
        torch.testing.assert_close(state[k], want[k], rtol=1e-3, atol=1e-4)


def test_split_evaluation_equals_one_rank_evaluating_everything(kit, reference):
    """The two workers each scored half of every domain's evaluation blocks (the sums all-reduced): the losses
    of the reference's first and last evaluation are those of the initial and the final student evaluated here
    on one rank."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ddk.trainer.config import load_config
    from ddk.data.cache import prepare_domains
    from ddk.data.domains import load_domain_specs
    from ddk.trainer.evaluate import evaluate_domains

    out, _ = reference
    cfg = load_config(kit / "train.yaml", ["eval.sequences_per_domain=8", f"data.cache_dir={kit.parent / 'token-cache'}"])
    tokenizer = AutoTokenizer.from_pretrained(kit / "student")
    domains = prepare_domains(load_domain_specs(cfg.data.source()), tokenizer, cfg.data.seq_len, cfg.data.cache_dir)
    evals = [r for r in _lines(out) if r["event"] == "eval"]
    for record, model_dir in ((evals[0], kit / "student"), (evals[-1], out / "final")):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        want = evaluate_domains(model, domains, cfg.eval.sequences_per_domain, cfg.eval.batch_size)
        assert record["student_loss"] == pytest.approx(want, abs=1e-6)


# ------------------------------------------------------------------------------------------------ routed teachers

def _stored_keys(cache_dir: Path) -> set[bytes]:
    """The sequence keys a teacher's --cache-dir store holds: what that teacher scored."""
    import sqlite3

    with sqlite3.connect(cache_dir / "topk.sqlite") as db:
        return {bytes(row[0]) for row in db.execute("SELECT seq FROM topk")}


def _engine_tokens(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return float(re.search(r"^ddk_teacher_engine_tokens_total (\S+)$", text, re.M).group(1))


def test_math_routed_to_a_specialist_teacher_across_two_workers(kit, teachers, controller_url, reference):
    """teacher.routes, on the reference's run: math's rows, teacher loss and diagnostics come from the
    specialist, the rest from the kit's teacher. Both teachers keep what they score, so their stores say exactly
    which blocks each saw (in every run of the module: all are routed alike)."""
    from transformers import AutoTokenizer

    from ddk.teacher.client import TeacherClient
    from ddk.teacher.store import sequence_key
    from ddk.trainer.config import load_config
    from ddk.data.cache import prepare_domains
    from ddk.data.domains import load_domain_specs
    from ddk.data.evalset import evaluation_set, validation_windows
    from ddk.trainer.evaluate import teacher_answers

    out, history = reference
    cfg = load_config(str(kit / "train.yaml"), [f"data.cache_dir={kit.parent / 'token-cache'}"])
    domains = prepare_domains(load_domain_specs(cfg.data.source()),
                              AutoTokenizer.from_pretrained(kit / "student"), cfg.data.seq_len, cfg.data.cache_dir)
    keys = {n: {sequence_key(b) for b in list(d.train) + list(validation_windows(d).blocks)}
            for n, d in domains.items()}
    assert _engine_tokens(teachers.math) > 0 and _engine_tokens(teachers.default) > 0
    seen_math, seen_default = _stored_keys(teachers.math_store), _stored_keys(teachers.default_store)
    assert seen_math and seen_math <= keys["math"]          # the specialist scored math blocks only
    assert seen_default and not seen_default & keys["math"]  # and the kit's teacher never a math block
    assert seen_default <= set().union(*(keys[n] for n in keys if n != "math"))
    # the controller's teacher loss for math is the specialist's: its mean -target_logprob on the same blocks
    with TeacherClient(teachers.math) as c:
        es = evaluation_set(domains["math"], 8)  # the run's evaluation set (eval.sequences_per_domain=8)
        want = float(teacher_answers(c, es, 1, keep_topk=False).nll.sum()) / es.predictions
    evaluations = [v for v in history if v["version"] > 0]
    assert evaluations[-1]["teacher_loss"]["math"] == pytest.approx(want, rel=1e-6)
    assert want < evaluations[-1]["teacher_loss"]["code"] - 1.0  # not the kit teacher's (math is easier)
    # the diagnostics name the route that served each domain, with the run's tokens so far
    diag = evaluations[-1]["diagnostics"]
    assert diag["math"]["route"] == teachers.math and diag["code"]["route"] == teachers.default
    assert all(0 < diag[n]["topk_mass"] <= 1 and diag[n]["kl"] > 0 for n in diag)
    eval_lines = [r for r in _lines(out) if r["event"] == "eval"]
    assert eval_lines[-1]["diagnostics"]["math"]["tokens"] == diag["math"]["tokens"]
    assert sum(d["tokens"] for d in diag.values()) == STEPS * BATCH * WORKERS * 128


def test_a_route_with_another_tokenizer_is_refused_with_exit_2(kit, tmp_path, teachers, controller_url):
    """`kd.cross_tokenizer: off` and a route whose teacher has another tokenizer: exit 2 before anything starts,
    naming the domain and URL."""
    import subprocess
    import sys

    from procs import service

    other = tmp_path / "other-teacher"
    shutil.copytree(kit / "teacher", other)
    vocab = json.loads((other / "tokenizer.json").read_text())
    vocab["model"]["vocab"]["zzzz-not-in-the-student"] = vocab["model"]["vocab"].pop(
        next(t for t in vocab["model"]["vocab"] if len(t) > 3))
    (other / "tokenizer.json").write_text(json.dumps(vocab))
    with service(["teacher", "serve", "--backend", "hf", "--model", str(other)],
                 log_path=tmp_path / "other.log") as (other_url, _):
        r = subprocess.run([sys.executable, "-m", "ddk.cli", "train", str(kit / "train.yaml"),
                            "--set", f"teacher.urls=[{teachers.default}]", "--set", f"controller.url={controller_url}",
                            "--set", f"teacher.routes={{math: [{other_url}]}}", "--set", f"output_dir={tmp_path / 'o'}",
                            "--set", "kd.cross_tokenizer=off"],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "teacher.routes.math" in last and other_url in last and "fingerprint" in last


# ------------------------------------------------------------------------------------------------ the console

def test_ddk_train_console_is_quiet_across_ray_workers_and_debug_brings_the_lines_back(reference, resumed):
    """Issue 25: `ddk train` (a process, attached to the module's cluster) with 2 Ray workers: the console has no
    per-request `HTTP Request:` line (the workers' httpx, forwarded by Ray) and none of Ray Train's per-report
    lines (`Reporting training result`, `Checkpoint successfully created`), but keeps ddk's own lines and the
    summary table; with `ddk --log-level DEBUG train` both kinds are back. The consoles are the module's own
    launches: the reference (default level) and the resumed run's second launch (DEBUG), math routed as in every
    run of the module."""

    def count(lines: list[str], *marks: str) -> int:
        return sum(any(m in line for m in marks) for line in lines)

    http, ray_report = ("HTTP Request:",), ("Reporting training result", "Checkpoint successfully created")
    quiet = reference.console
    print(f"quiet console: {len(quiet)} lines")
    shown = "\n".join(quiet)[-6000:]
    assert count(quiet, *http) == 0, shown
    assert count(quiet, *ray_report) == 0, shown
    assert count(quiet, "training finished in") == 1 and count(quiet, "RayTrainWorker") >= 1, shown  # ddk's kept
    assert count(quiet, "math") >= 1, shown  # the per-domain summary table
    loud = resumed.console
    print(f"--log-level DEBUG console: {len(loud)} lines")
    shown = "\n".join(loud)[-6000:]
    assert count(loud, *http) >= 1 and count([line for line in loud if "RayTrainWorker" in line], *http) >= 1, shown
    assert count(loud, "Reporting training result") >= 1 and count(loud, "Checkpoint successfully created") >= 1, \
        shown
