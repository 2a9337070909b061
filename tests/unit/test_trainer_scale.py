"""Unit tests of the Trainer's scaling pieces (ddk.trainer.scale, issue 12): MFU by hand, the micro-batch
shares, the accumulated gradient with uneven label masks, the hidden-state path check, the split evaluation,
the feed's micro-batches, precision and torch.compile's checks. In-process runs: tests/loop/test_scale.py."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ddk.trainer import scale
from ddk.data.domains import PackedDomain
from ddk.data.evalset import evaluation_set
from ddk.trainer.evaluate import block_sums, evaluate_domains, shard_of
from ddk.trainer.feed import TeacherFeed
from ddk.trainer.sampler import DomainSampler

KD = SimpleNamespace(gamma=0.5, temperature=1.0, loss="forward_kl", beta=0.5, skew=0.1)


def tiny_llama(tied: bool = False, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=tied))


# ------------------------------------------------------------------------------------------------ FLOPs, MFU

def test_mfu_by_hand():
    # 6 x 1e9 parameters x 2,000 tokens in 0.5 s = 2.4e13 FLOP/s; against 2 devices x 100 TFLOP/s: 0.12
    assert scale.flops_per_token(10**9) == 6e9
    assert scale.mfu(10**9, 2000, 0.5, 100.0, devices=2) == pytest.approx(0.12)
    assert scale.mfu(10**9, 2000, 0.5, 100.0) == pytest.approx(0.24)
    assert scale.mfu(10**9, 2000, 0.5, None) is None and scale.mfu(10**9, 2000, 0.0, 100.0) is None
    assert scale.known_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert scale.known_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert scale.known_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0 and scale.known_peak_tflops("Tesla T4") is None
    assert scale.peak_tflops(None, torch.device("cpu"), "fp32") is None
    assert scale.peak_tflops(50.0, torch.device("cpu"), "fp32") == 50.0


def test_flop_parameters_leave_out_an_untied_input_embedding():
    # the tiny Llama by hand: embedding 40x16 (left out), per layer q,k,v,o 4x16x16 + MLP 3x16x32 + 2 norms x 16,
    # final norm 16, lm_head 40x16
    layer = 4 * 16 * 16 + 3 * 16 * 32 + 2 * 16
    assert scale.flop_parameters(tiny_llama()) == layer + 16 + 40 * 16
    tied = tiny_llama(tied=True)  # the one matrix is the output projection: it counts, once
    assert scale.flop_parameters(tied) == layer + 16 + 40 * 16 == sum(p.numel() for p in tied.parameters())


# ------------------------------------------------------------------------------------------------ accumulation

def test_micro_weights():
    assert scale.micro_weights([4, 4]) == [0.5, 0.5]
    assert scale.micro_weights([3, 1]) == [0.75, 0.25]
    assert scale.micro_weights([0, 0]) == [0.5, 0.5]


def test_accumulated_gradient_equals_the_whole_batch_with_uneven_masks():
    """Two micro-batches with different numbers of labelled tokens, each mean scaled by its share: the gradient
    and the loss of the one batch of both (plain and chunked path)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (4, 9), generator=g)
    labels = ids[:, 1:].clone()
    labels[0, :6] = -100  # micro-batch 0 (rows 0-1) has fewer labelled tokens
    t_ids = torch.randint(0, 40, (4, 8, 5), generator=g)
    t_lp = torch.log_softmax(torch.randn(4, 8, 40, generator=g), -1).gather(-1, t_ids)
    for chunk in (0, 7):
        model = tiny_llama()
        step = scale.StudentStep(model, KD, chunk)
        whole, _ = step(ids[:, :-1], labels, t_ids, t_lp)
        whole.backward()
        want = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        parts = [slice(0, 2), slice(2, 4)]
        shares = scale.micro_weights([int((labels[p] != -100).sum()) for p in parts])
        assert shares[0] < shares[1]
        total = 0.0
        for p, share in zip(parts, shares):
            loss, _ = step(ids[p, :-1], labels[p], t_ids[p], t_lp[p])
            (loss * share).backward()
            total += float(loss.detach()) * share
        assert total == pytest.approx(float(whole.detach()), rel=1e-6)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want[n], atol=1e-6, rtol=1e-5)


def test_no_sync_only_off_the_last_micro_batch():
    calls = []

    class Wrapped(torch.nn.Module):
        def no_sync(self):
            calls.append("no_sync")
            return torch.autograd.graph.saved_tensors_hooks(lambda x: x, lambda x: x)

    with scale.no_sync(Wrapped(), sync=False):
        pass
    with scale.no_sync(Wrapped(), sync=True):
        pass
    with scale.no_sync(torch.nn.Linear(1, 1), sync=False):  # one rank: no DDP, nothing to skip
        pass
    assert calls == ["no_sync"]


def test_feed_hands_out_a_steps_micro_batches_from_one_draw():
    sizes = {"a": 50, "b": 30}
    blocks = lambda rows: np.array([[i, i + 1, i + 2] for _, i in rows])  # noqa: E731
    from ddk.trainer.mixture_sync import MixtureSync

    weights = {"a": 0.5, "b": 0.5}
    feed = TeacherFeed(DomainSampler(sizes, seed=3), blocks, batch_size=2, micro_batches=3,
                       mixture=MixtureSync(weights, 1))
    reference = DomainSampler(sizes, seed=3)
    feed.schedule(0, 2)
    for step in range(2):
        want = reference.draw(step, weights, 6)
        got = []
        for m in range(3):
            assert feed.covers(step)
            batch, _ = feed.next(step)
            assert (batch.step, batch.micro, batch.micros) == (step, m, 3)
            assert batch.input_ids.shape == (2, 3)
            got += batch.rows
        assert got == want
        assert feed.state_dict() == reference.state_dict()  # consumed: after the step's last micro-batch
    assert feed.window is None
    feed.close()


# ------------------------------------------------------------------------------------------------ loss paths

def test_hidden_state_path_is_checked_not_assumed():
    assert scale.hidden_state_problem(tiny_llama()) is None
    assert scale.hidden_state_problem(tiny_llama(tied=True)) is None

    class Capped(torch.nn.Module):  # soft-capped logits (as Gemma 2): not the projection of the hidden states
        def __init__(self):
            super().__init__()
            self.inner = tiny_llama()
            self.base_model = self.inner.model

        def get_output_embeddings(self):
            return self.inner.lm_head

        def forward(self, **kw):
            out = self.inner(**kw)
            return SimpleNamespace(logits=3.0 * torch.tanh(out.logits / 3.0), hidden_states=out.hidden_states)

    assert "not the output projection" in scale.hidden_state_problem(Capped())
    assert "no output projection" in scale.hidden_state_problem(torch.nn.Linear(2, 2))


def test_bf16_autocast_keeps_the_loss_float32():
    model = tiny_llama()
    ids = torch.randint(0, 40, (2, 9))
    for chunk in (0, None):
        step = scale.StudentStep(model, KD, chunk)
        with scale.autocast(torch.device("cpu"), "bf16"):
            loss, parts = step(ids[:, :-1], ids[:, 1:])
        assert loss.dtype == torch.float32 and parts["ce"].dtype == torch.float32
        plain, _ = step(ids[:, :-1], ids[:, 1:])
        assert float(loss.detach()) == pytest.approx(float(plain.detach()), rel=2e-2)  # bf16 matmuls, float32 reductions
        assert model.lm_head.weight.dtype == torch.float32  # master weights stay float32


def test_precision_resolution():
    assert scale.resolve_precision("auto", "cpu") == "fp32"
    assert scale.resolve_precision("bf16", "cpu") == "bf16"
    assert scale.resolve_precision("fp16", "cpu") == "fp16"
    assert not scale.grad_scaler(torch.device("cpu"), "bf16").is_enabled()
    assert scale.grad_scaler(torch.device("cpu"), "fp16").is_enabled()
    assert isinstance(scale.autocast(torch.device("cpu"), "fp32"), type(scale.no_sync(torch.nn.Linear(1, 1), True)))


def test_activation_checkpointing_needs_support():
    model = tiny_llama()
    scale.enable_activation_checkpointing(model)
    assert model.is_gradient_checkpointing
    with pytest.raises(ValueError, match="train.activation_checkpointing"):
        scale.enable_activation_checkpointing(torch.nn.Linear(2, 2))


def test_compile_without_a_compiler_is_an_error_naming_the_key(monkeypatch):
    monkeypatch.setattr(scale.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    problem = scale.compile_problem("cpu")
    assert problem is not None and "C++ compiler" in problem
    with pytest.raises(RuntimeError, match=r"^train\.compile: .*C\+\+ compiler.*train\.compile: false"):
        scale.compile_student(tiny_llama(), torch.device("cpu"))
    assert "train.compile" in str(scale.compile_error(ValueError("boom\nmore")))
    assert scale.compile_target(tiny_llama()).__class__.__name__ == "LlamaModel"


# ------------------------------------------------------------------------------------------------ evaluation

def test_split_evaluation_equals_one_rank_evaluating_everything():
    model = tiny_llama().eval()
    rng = np.random.default_rng(0)
    domains = {"a": PackedDomain("a", None, rng.integers(0, 40, (7, 9))),
               "b": PackedDomain("b", None, rng.integers(0, 40, (5, 9))),
               "c": PackedDomain("c", None, rng.integers(0, 40, (2, 9)))}  # fewer blocks than ranks
    want = evaluate_domains(model, domains, sequences_per_domain=6, batch_size=4)
    for world in (1, 2, 3):
        for n, d in domains.items():
            es = evaluation_set(d, 6)
            shards = [block_sums(model, shard_of(es, r, world), 4) for r in range(world)]
            assert sum(len(shard_of(es, r, world)) for r in range(world)) == len(es) == min(6, len(d.val))
            ce, count = sum(s["ce"].sum() for s in shards), sum(s["count"].sum() for s in shards)
            if n == "c":
                assert count == 2 * 8
            assert ce / count == pytest.approx(want[n], abs=1e-6)


def test_ddk_train_refuses_compile_without_a_compiler_before_ray(monkeypatch):
    from ddk.errors import UsageError
    from ddk.trainer.launch import check_compile

    cfg = SimpleNamespace(train=SimpleNamespace(compile=True), ray=SimpleNamespace(use_gpu=False))
    check_compile(cfg)  # this machine has g++
    monkeypatch.setattr(scale.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(UsageError, match=r"^train\.compile: torch\.compile on CPU needs a C\+\+ compiler"):
        check_compile(cfg)
    check_compile(SimpleNamespace(train=SimpleNamespace(compile=False), ray=cfg.ray))


def test_fp16_scaler_state_goes_through_the_checkpoint(tmp_path):
    from ddk.trainer.loop import LocalContext, TrainState
    from ddk.trainer.parallel import Distributed

    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = scale.grad_scaler(torch.device("cpu"), "fp16")
    ids = torch.randint(0, 40, (2, 9))
    with scale.autocast(torch.device("cpu"), "fp16"):
        loss, _ = scale.StudentStep(model, KD, None)(ids[:, :-1], ids[:, 1:])
    assert loss.dtype == torch.float32
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    state = TrainState(step=1, scaler=scaler.state_dict())
    ctx = LocalContext(tmp_path)

    def distributed(m, trainer_state):
        d = Distributed("ddp", ctx)
        d.attach(m, torch.optim.AdamW(m.parameters(), lr=1e-3) if m is not model else opt)
        d.register("trainer", trainer_state)
        return d

    distributed(model, state).save_and_report(1, {"step": 1, "loss": float(loss.detach()), "version": 0})
    back = TrainState()
    with ctx.restored() as d:
        distributed(tiny_llama(seed=1), back).load(d)
    assert back.scaler == scaler.state_dict() and back.scaler["_growth_tracker"] == 1
    assert "scaler" not in TrainState(step=1).state_dict()  # bf16/fp32 runs: no scaler in the checkpoint
