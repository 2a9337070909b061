"""The Trainer's scaling switches in-process (issue 12; LocalContext, the session's real teacher, see inproc.py):

* gradient accumulation: 2 micro-batches of 4 sequences give the gradient (1e-6) and, over 3 steps, the weights
  (1e-5) of one batch of 8;
* the chunked loss from the hidden states (the default, ``kd.chunk_tokens`` unset) gives the step losses and
  gradients of the full-logits path (``kd.chunk_tokens: 0``);
* activation checkpointing gives the gradients of the run without (1e-5);
* ``train.precision: bf16`` on CPU: a short run improves the student, and a run interrupted at a checkpoint
  and resumed ends with the uninterrupted run's weights.

Across two Ray workers (DDP with accumulation, the split evaluation): tests/e2e/test_train_ray.py.
"""

from __future__ import annotations

import pytest
import torch

from inproc import config, lines, train

pytestmark = pytest.mark.slow

STEPS = 3
# lr 2e-4: AdamW's first steps divide each gradient by its own magnitude, so a parameter whose gradient is ~1e-8
# turns float rounding (1e-9 here) into a weight difference proportional to lr (9e-6 at lr 2e-3, measured)
COMMON = (f"train.steps={STEPS}", "train.lr=2e-4", "train.grad_clip=0", "mixture.policy=fixed",
          "mixture.interval_steps=100", "eval.sequences_per_domain=2", "checkpoint.every_steps=100")


def _steps(kit, out, teacher, *sets):
    """A Trainer set up from the kit's config with ``sets``, run for STEPS steps by hand: (the gradient of the
    first step, each step's loss/ce/kl, the weights at the end, the trainer)."""
    from ddk.trainer.launch import prepare
    from ddk.trainer.loop import LocalContext, Trainer

    cfg = config(kit, out, out.name, teacher, None, *COMMON, *sets)
    t = Trainer(prepare(cfg), LocalContext(cfg.output_dir))
    try:
        t.setup()
        t.model.train()
        grads, losses = None, []
        for _ in range(STEPS):
            t.evaluate()
            losses.append(t.train_step())
            if grads is None:  # grad_clip 0: the raw gradient, left in .grad until the next step's zero_grad
                grads = {n: p.grad.detach().clone() for n, p in t.raw_model.named_parameters()}
        weights = {n: p.detach().clone() for n, p in t.raw_model.named_parameters()}
    finally:
        t.close()
    return grads, [r for r in lines(out) if r["event"] == "step"], weights, t


@pytest.fixture(scope="module")
def runs(kit, teacher_url, tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    return {name: _steps(kit, root / name, teacher_url, *sets) for name, sets in {
        "plain-1x8": ("train.batch_size=8", "kd.chunk_tokens=0"),
        "chunked-1x8": ("train.batch_size=8",),  # kd.chunk_tokens unset: auto-sized chunks, the default
        "chunked-2x4": ("train.batch_size=4", "train.grad_accum_steps=2", "kd.chunk_tokens=100"),
        "checkpointed-1x8": ("train.batch_size=8", "train.activation_checkpointing=true"),
    }.items()}


def _close(a: dict, b: dict, atol: float, rtol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m, k=k: f"{k}: {m}")


def test_accumulation_equals_one_batch_of_all_micro_batches(runs):
    g1, r1, w1, t1 = runs["chunked-1x8"]
    g2, r2, w2, t2 = runs["chunked-2x4"]
    assert t2.accum == 2 and t1.accum == 1
    # the same rows: one draw of 8 per step, split in two micro-batches of 4
    assert [r["rows"] for r in r2] == [r["rows"] for r in r1]
    assert [r["tokens"] for r in r2] == [r["tokens"] for r in r1] == [8 * 128] * STEPS
    for a, b in zip(r1, r2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6) and b["kl"] == pytest.approx(a["kl"], rel=1e-5)
    _close(g2, g1, atol=1e-6)
    _close(w2, w1, atol=1e-5)


def test_chunked_loss_equals_the_full_logits_path(runs):
    gp, rp, wp, tp = runs["plain-1x8"]
    gc, rc, wc, tc = runs["chunked-1x8"]
    assert tc.step_module.chunked and not tp.step_module.chunked
    for a, b in zip(rp, rc):
        for key in ("loss", "ce", "kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
    _close(gc, gp, atol=1e-6, rtol=1e-4)


def test_activation_checkpointing_gives_the_same_gradients(runs):
    g, r, _, t = runs["checkpointed-1x8"]
    g0, r0, _, _ = runs["chunked-1x8"]
    assert t.raw_model.is_gradient_checkpointing
    assert r[0]["loss"] == pytest.approx(r0[0]["loss"], rel=1e-6)
    _close(g, g0, atol=1e-5)


def test_bf16_run_improves_and_resumes_like_the_uninterrupted_run(kit, teacher_url, tmp_path):
    from safetensors.torch import load_file

    from ddk.trainer.loop import InjectedFault

    # 10 steps on one domain (the others at weight 0): measured -0.23 on its validation loss
    sets = ("train.precision=bf16", "train.steps=10", "train.batch_size=8", "train.lr=2e-3", "train.warmup_steps=3",
            "mixture.policy=fixed", "mixture.initial_weights={code: 1, legal: 0, math: 0, prose: 0}",
            "mixture.interval_steps=10", "checkpoint.every_steps=5", "eval.sequences_per_domain=4")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(kit, whole, "bf16-whole", teacher_url, None, *sets)
    evals = [r for r in lines(whole) if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [0, 10]
    before, after = evals[0]["student_loss"], evals[-1]["student_loss"]
    assert after["code"] < before["code"] - 0.1, (before, after)

    with pytest.raises(InjectedFault):
        train(kit, cut, "bf16-cut", teacher_url, None, *sets, fault_at_steps=[5])
    train(kit, cut, "bf16-cut", teacher_url, None, *sets)
    assert [r["step"] for r in lines(cut) if r["event"] == "step"] == list(range(1, 11))
    got, want = load_file(cut / "final" / "model.safetensors"), load_file(whole / "final" / "model.safetensors")
    _close(got, want, atol=1e-6)
