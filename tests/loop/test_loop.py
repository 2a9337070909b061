"""Loop-level properties of a DDK run, in-process (the Trainer under LocalContext, see inproc.py) against the
session's real teacher (hf engine) and controller servers.

* a 12-step DDK run (K = 4, 8 sequences per step): every step's batch is drawn with the weights version the
  controller answered at the evaluation before it; the controller's history has one version per interval;
  the student improves on the mixture it was trained on.
* CPT (CE only, the paper's baseline): no teacher call at all, the weights never move.

Across two Ray workers (DDP), after a worker's death and after a restart: tests/e2e/test_train_ray.py.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from inproc import history, lines, steps_of, topk_requests, train

pytestmark = pytest.mark.slow

STEPS, K, BATCH = 12, 4, 8


def val_loss(model_dir, kit, seq_len: int, n: int = 8) -> dict[str, float]:
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


@pytest.fixture(scope="module")
def ddk_run(kit, teacher_url, controller_url, tmp_path_factory):
    out = tmp_path_factory.mktemp("loop") / "ddk"
    summary = train(kit, out, "loop-ddk", teacher_url, controller_url, f"train.steps={STEPS}",
                    f"train.batch_size={BATCH}", "train.lr=2e-3", f"mixture.interval_steps={K}",
                    f"checkpoint.every_steps={K}")
    return out, summary, history(controller_url, "loop-ddk")


def test_ddk_run_follows_the_controllers_versions(ddk_run):
    out, summary, versions = ddk_run
    # one version per interval: the initial weights, step 0 (before training), then every K steps
    assert [(v["version"], v["step"]) for v in versions] == [(0, None), (1, 0), (2, 4), (3, 8), (4, 12)]
    by_step = {v["step"]: v for v in versions if v["version"] > 0}
    records = lines(out)
    steps = [r for r in records if r["event"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    for r in steps:  # the batch of step s was drawn with the weights of the evaluation before it
        v = by_step[(r["step"] - 1) // K * K]
        assert r["version"] == v["version"]
        assert r["weights"] == pytest.approx(v["weights"], abs=1e-9)
        assert sum(r["rows"].values()) == BATCH
        assert r["kl"] > 0 and r["loss"] == pytest.approx(r["ce"] + 0.2 * r["kl"], rel=1e-4)
    # the weights were not uniform all along: the controller's DDK update was applied
    assert len({json.dumps(v["weights"], sort_keys=True) for v in versions}) > 1
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [0, 4, 8, 12]
    for r in evals:
        assert r["version"] == by_step[r["step"]]["version"]
        for d, q in r["ratio"].items():
            assert q == pytest.approx(math.exp(r["student_loss"][d] - r["teacher_loss"][d]))
            assert q == pytest.approx(by_step[r["step"]]["ratio"][d], rel=1e-6)
        # issue 24: every evaluation has each domain's log-ratio SE (posted with it), on one evaluation set
        assert set(r["log_ratio_se"]) == set(r["ratio"]) and all(se > 0 for se in r["log_ratio_se"].values())
        assert r["eval_set"] == json.loads((out / "eval-set.json").read_text())["fingerprint"]
    assert summary["step"] == STEPS and summary["version"] == 4
    final = out / "final"
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()
    assert not list(final.glob("*.bin")) and not list(final.glob("*.pt"))


def test_ddk_run_improves_the_student_on_its_mixture(kit, ddk_run):
    out, _, _ = ddk_run
    steps = [r for r in lines(out) if r["event"] == "step"]
    seq_len = 128  # the quick kit's data.seq_len
    before, after = val_loss(kit / "student", kit, seq_len), val_loss(out / "final", kit, seq_len)
    # DDK spends most of the 12 steps on the lagging domain, so the unweighted mean over domains may not move
    # (measured: -0.04..+0.01); the loss on the mixture the student was trained on must drop, and the most
    # sampled domain most of all (measured in a plain-PyTorch replay of these settings with the step-1
    # weights, 4 seeds: -0.08..-0.09 and -0.13..-0.17).
    mixture = {d: float(np.mean([r["weights"][d] for r in steps])) for d in before}
    focus = max(mixture, key=mixture.get)
    assert sum(mixture[d] * (after[d] - before[d]) for d in before) < -0.02, (mixture, before, after)
    assert after[focus] < before[focus] - 0.05, (focus, before, after)


def test_ddk_run_exports_a_model_card(kit, ddk_run):
    """final/README.md: Hugging Face model-card front matter (YAML) naming the student's start and the run's
    domains, then the config and the mixture of every evaluation."""
    from ddk.trainer.card import front_matter

    out, _, versions = ddk_run
    card = (out / "final" / "README.md").read_text()
    meta = front_matter(card)
    domains = sorted(p.name for p in (kit / "data").iterdir())
    assert meta["datasets"] == domains and meta["library_name"] == "transformers"
    assert meta["tags"] == ["distillation", "ddk"]
    assert Path(meta["base_model"]).resolve() == (kit / "student").resolve()
    assert "license" not in meta  # the kit's student has no card of its own
    assert "# loop-ddk" in card and f"| interval_steps | {K} |" in card and f"| steps | {STEPS} |" in card
    history = card.split("## Mixture history", 1)[1].split("##", 1)[0]
    rows = [line for line in history.splitlines() if line.startswith("| ") and not line.startswith("| step")]
    assert [row.split(" | ")[0] for row in rows] == ["| 0", "| 4", "| 8", "| 12"]
    last = {v["step"]: v for v in versions}[12]["weights"]
    assert rows[-1].endswith(" | ".join(f"{last[d]:.3f}" for d in domains) + " |")


def test_cpt_makes_no_teacher_calls(kit, teacher_url, controller_url, tmp_path):
    before = topk_requests(teacher_url)
    out = tmp_path / "cpt"
    # a teacher is running (the session's), but CPT (gamma 0, fixed mixture, no teacher.urls) asks it nothing
    train(kit, out, "loop-cpt", None, controller_url, "kd.gamma=0", "mixture.policy=fixed", "train.steps=4",
          "mixture.interval_steps=2", "train.batch_size=4")
    assert topk_requests(teacher_url) == before
    versions = history(controller_url, "loop-cpt")
    assert [v["step"] for v in versions] == [None, 0, 2, 4]
    first = versions[1]
    assert first["teacher_loss"] == pytest.approx(first["student_loss"])  # documented CPT convention
    assert all(v["weights"] == versions[0]["weights"] for v in versions)
    records = lines(out)
    assert steps_of(records) == [1, 2, 3, 4] and all(r["kl"] == 0 for r in records if r["event"] == "step")
    assert (out / "final" / "model.safetensors").is_file()


def test_tokenizer_mismatch_is_refused_before_ray(kit, teacher_url, controller_url, tmp_path):
    """`ddk train` with `kd.cross_tokenizer: off` and a student whose tokenizer differs from the teacher's: exit 2, one
    line, no Ray (under the default `auto` the pair is distilled across tokenizers, issue 29)."""
    import subprocess

    from transformers import AutoTokenizer

    from procs import DDK, REPO

    student = tmp_path / "other-student"
    shutil.copytree(kit / "student", student)
    tok = AutoTokenizer.from_pretrained(student)
    tok.add_tokens(["<not-in-the-teacher>"])
    tok.save_pretrained(student)
    out = tmp_path / "mismatch"
    sets = ["run_id=loop-mismatch", f"output_dir={out}", f"teacher.urls=[{teacher_url}]",
            f"controller.url={controller_url}", f"student.model={student}",
            f"data.cache_dir={kit.parent / 'token-cache'}", "kd.cross_tokenizer=off"]
    proc = subprocess.run(DDK + ["train", str(kit / "train.yaml")] + [a for s in sets for a in ("--set", s)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "fingerprint" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "ray").exists()
