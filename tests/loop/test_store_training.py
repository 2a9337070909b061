"""Training from a top-k store (``ddk teacher precompute`` + ``cache.dir``), in-process runs (the Trainer under
LocalContext, as inproc.py) against a teacher process of this module's own, which the last test stops.

The data is a slice of the quick kit's (8 training and 3 validation documents per domain: about 200 blocks), so
that precomputing it takes seconds; the blocks are the trainer's own packed blocks of that slice.

* precompute, SIGKILLed after some blocks and run again: the second run scores only the rest and ends with every
  block in the store and the manifest an uninterrupted run writes;
* a store that does not fit the run is refused up front, naming what differs: missing blocks (and how many),
  kd.top_k above the store's k, another data.seq_len, no manifest (exit 2 in `ddk train`);
* with teacher.urls set too, the blocks the store lacks go to the teacher and are written back;
* an 8-step DDK run from the store alone, the teacher stopped, has the loss curve, teacher losses and weights of
  the same run against the live teacher (same seed); a store of another tokenizer is exit 2.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import yaml

import procs
from inproc import lines
from procs import DDK, REPO, free_port

pytestmark = pytest.mark.slow

DOCS = {"train": 8, "val": 3}
STEPS, K = 8, 4


@pytest.fixture(scope="module")
def small(kit, tmp_path_factory) -> Path:
    """A train config over a slice of the kit's data (its own token cache)."""
    d = tmp_path_factory.mktemp("store-small")
    domains = []
    for dom in sorted(p for p in (kit / "data").iterdir() if p.is_dir()):
        files = {}
        for split, n in DOCS.items():
            target = d / "data" / dom.name / f"{split}.jsonl"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("\n".join((dom / f"{split}.jsonl").read_text().splitlines()[:n]) + "\n")
            files[split] = str(target)
        domains.append({"name": dom.name, "files": [files["train"]], "val_files": [files["val"]]})
    raw = yaml.safe_load((kit / "train.yaml").read_text())
    raw.update(student={"model": str(kit / "student")}, output_dir=str(d / "runs"),
               data={"domains": domains, "seq_len": 128, "cache_dir": str(d / "tokens")},
               eval={"sequences_per_domain": 8}, checkpoint={"every_steps": 100},
               ray={"num_workers": 1, "address": "", "use_gpu": False})
    (d / "small.yaml").write_text(yaml.safe_dump(raw))
    return d / "small.yaml"


@pytest.fixture(scope="module")
def teacher(kit, tmp_path_factory):
    """`ddk teacher serve` (hf) of this module: test_offline_run_equals_the_live_run stops it."""
    d = tmp_path_factory.mktemp("store-teacher")
    proc = procs.start(["teacher", "serve", "--model", str(kit / "teacher"), "--backend", "hf"], d / "teacher.log",
                       free_port())
    try:
        proc.wait_healthy(timeout=180)
        yield proc
    finally:
        proc.stop()


def config(small: Path, run_id: str, *sets: str):
    from ddk.trainer.config import load_config

    return load_config(str(small), [f"run_id={run_id}", f"output_dir={small.parent / 'runs' / run_id}", *sets])


def domains_of(cfg):
    from ddk.data.cache import prepare_data
    from ddk.data.tokenizer import student_tokenizer

    tok, _ = student_tokenizer(cfg)
    return tok, prepare_data(cfg, tok)


def entries(store_dir: Path) -> int:
    from ddk.teacher.store import TopkStore

    with TopkStore(store_dir / "topk.sqlite") as s:
        return s.stats()["entries"]


def precompute_inproc(small: Path, url: str, out: Path) -> str:
    """`ddk teacher precompute` in this process (its command function, without the CLI's logging setup)."""
    from ddk.cli import build_parser

    args = build_parser().parse_args(["teacher", "precompute", str(small), "--teacher", url, "--out", str(out),
                                      "--quiet"])
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert args.func(args) == 0
    return buf.getvalue()


@pytest.fixture(scope="module")
def store(small, teacher, tmp_path_factory) -> dict:
    """The slice precomputed by a `ddk teacher precompute` SIGKILLed after some blocks, then run again."""
    out = tmp_path_factory.mktemp("store") / "topk"
    argv = DDK + ["teacher", "precompute", str(small), "--teacher", teacher.url, "--out", str(out), "--quiet",
                  "--batch-size", "4", "--concurrency", "1"]
    proc = subprocess.Popen(argv, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "topk.sqlite").exists() and entries(out) >= 24:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"precompute ended before the kill: {proc.stderr.read().decode()[-2000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stderr.close()
    killed = {"entries": entries(out), "manifest": json.loads((out / "manifest.json").read_text())}
    printed = precompute_inproc(small, teacher.url, out)
    return {"dir": out, "killed": killed, "printed": printed}


def test_precompute_resumes_after_a_kill(store, small, teacher):
    import httpx

    from ddk.data.topk_manifest import manifest_for

    out, killed = store["dir"], store["killed"]
    _, domains = domains_of(config(small, "store-resume"))
    from ddk.data.evalset import validation_windows

    total = sum(len(d.train) + len(validation_windows(d)) for d in domains.values())  # validation: every window
    assert 24 <= killed["entries"] < total and killed["manifest"]["complete"] is False
    # the second run scored only what the first left
    assert f"{total} blocks of 4 domains" in store["printed"]
    assert f"({total - killed['entries']} scored now, {killed['entries']} there before" in store["printed"]
    assert entries(out) == total
    info = httpx.get(teacher.url + "/v1/info", timeout=10).json()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == manifest_for(info, 16, 128, "float16", domains, complete=True)  # as an uninterrupted run's
    assert manifest["blocks"] == total and manifest["model_fingerprint"] == info["model_fingerprint"]
    # a third run finds everything there
    assert f"(0 scored now, {total} there before" in precompute_inproc(small, teacher.url, out)


def copy_store(src: Path, dst: Path, drop: int = 0) -> Path:
    """A copy of a store folder, the first ``drop`` entries (code's first training blocks) deleted."""
    shutil.copytree(src, dst)
    if drop:
        db = sqlite3.connect(dst / "topk.sqlite")
        db.execute("DELETE FROM topk WHERE id IN (SELECT id FROM topk ORDER BY id LIMIT ?)", (drop,))
        db.commit()
        db.close()
    return dst


def test_a_store_that_does_not_fit_is_refused(store, small, tmp_path):
    from ddk.errors import UsageError
    from ddk.trainer.launch import prepare

    offline = ["teacher.urls=[]", "controller.url=null", "mixture.policy=fixed"]
    gappy = copy_store(store["dir"], tmp_path / "gappy", drop=5)
    with pytest.raises(UsageError, match=r"cache\.dir: 5 of the \d+ blocks the run needs are not in the store .*code 5"):
        prepare(config(small, "store-gaps", f"cache.dir={gappy}", *offline))
    with pytest.raises(UsageError, match=r"cache\.dir: .*top-16.*fewer than kd\.top_k 32"):
        prepare(config(small, "store-k", f"cache.dir={store['dir']}", "kd.top_k=32", *offline))
    with pytest.raises(UsageError, match=r"cache\.dir: .*seq_len 128.*data\.seq_len is 64"):
        prepare(config(small, "store-len", f"cache.dir={store['dir']}", "data.seq_len=64", *offline))
    with pytest.raises(UsageError, match=r"cache\.dir: no manifest\.json"):
        prepare(config(small, "store-none", f"cache.dir={tmp_path / 'empty'}", *offline))


def test_misses_go_to_the_teacher_and_are_written_back(store, small, teacher, tmp_path):
    import torch

    from ddk.teacher.client import TeacherClient
    from ddk.trainer.topk_source import checked_store_source

    gappy = copy_store(store["dir"], tmp_path / "gappy", drop=5)
    cfg = config(small, "store-writeback", f"cache.dir={gappy}", f"teacher.urls=[{teacher.url}]")
    tok, domains = domains_of(cfg)
    source = checked_store_source(cfg, tok, domains, TeacherClient([teacher.url]))
    rows = torch.from_numpy(np.asarray(domains["code"].train[:12], dtype=np.int64))
    try:
        got = source.topk(rows, 8)
        assert (source.hits, source.misses) == (7, 5)
        assert source.store.has_many(source.fingerprint, list(rows.numpy()), 16) == [True] * 12  # written back, k 16
        with TeacherClient([teacher.url]) as live:
            want = live.topk(rows, 8)
        assert torch.equal(got.ids[:, :, 0], want.ids[:, :, 0])
        torch.testing.assert_close(got.logprobs, want.logprobs, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(got.target_logprob, want.target_logprob, rtol=2e-3, atol=2e-3)
        source.topk(rows, 8)
        assert (source.hits, source.misses) == (19, 5)  # the second time all from the store
    finally:
        source.close()


def run(cfg) -> dict:
    from ddk.trainer.launch import prepare
    from ddk.trainer.loop import LocalContext, Trainer

    return Trainer(prepare(cfg), LocalContext(cfg.output_dir)).fit()


def test_offline_run_equals_the_live_run(store, small, teacher, controller_url, tmp_path):
    common = [f"train.steps={STEPS}", f"mixture.interval_steps={K}", "mixture.policy=ddk",
              f"controller.url={controller_url}", "train.lr=2e-3", "seed=3"]
    live = config(small, "store-live", f"teacher.urls=[{teacher.url}]", *common)
    run(live)
    teacher.stop()  # from here on there is no teacher at all
    offline = config(small, "store-offline", "teacher.urls=[]", f"cache.dir={store['dir']}", *common)
    run(offline)

    a, b = lines(Path(live.output_dir)), lines(Path(offline.output_dir))
    steps_a, steps_b = [r for r in a if r["event"] == "step"], [r for r in b if r["event"] == "step"]
    assert [r["step"] for r in steps_b] == list(range(1, STEPS + 1))
    for x, y in zip(steps_a, steps_b, strict=True):  # same batches, same teacher outputs up to float16 rounding
        assert y["rows"] == x["rows"]
        for key in ("loss", "ce", "kl"):
            assert y[key] == pytest.approx(x[key], rel=1e-3, abs=1e-4), (x["step"], key)
        assert y["weights"] == pytest.approx(x["weights"], abs=1e-4)
    evals_a, evals_b = [r for r in a if r["event"] == "eval"], [r for r in b if r["event"] == "eval"]
    assert [r["step"] for r in evals_b] == [0, 4, 8]
    for x, y in zip(evals_a, evals_b, strict=True):
        assert y["teacher_loss"] == pytest.approx(x["teacher_loss"], rel=1e-3)
        assert y["student_loss"] == pytest.approx(x["student_loss"], rel=1e-3)

    # a store for another tokenizer: `ddk train` refuses it before anything starts
    other = copy_store(store["dir"], tmp_path / "other-tokenizer")
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "tokenizer_fingerprint": "0123456789abcdef"}))
    p = subprocess.run(DDK + ["train", str(small), "--set", "run_id=store-other", "--set", "teacher.urls=[]",
                              "--set", f"cache.dir={other}", "--set", "controller.url=null",
                              "--set", "mixture.policy=fixed"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "cache.dir: the store's tokenizer fingerprint 0123456789abcdef" in p.stderr
    assert "differs from student.model's" in p.stderr
