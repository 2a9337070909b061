"""The chunked loss from the hidden states against the plain path (``distill_loss`` on the full logits).

``distill_loss`` is itself checked against dense textbook references in test_loss.py, so here the reference is
``distill_loss(hidden @ W.T + b, ...)``: the same values and the same gradients (wrt hidden, weight, bias).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ddk.trainer.loss import (LOSSES, MAX_CHUNK_TOKENS, chunked_distill_loss, default_chunk_tokens,
                              distill_loss)

B, T, H, V, K = 3, 9, 5, 13, 4  # B * T = 27 positions: chunk 7 does not divide them


def make(dtype=torch.float64, k=K, ignored="some", seed=0, bias=True):
    """hidden, weight, bias, labels, teacher ids, teacher logprobs; ``ignored``: none | some | all."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(B, T, H, generator=g) * 1.5).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g)).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.5).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    if ignored == "some":
        labels[0, :2] = -100
        labels[1, :] = -100  # positions 9..17: with chunk 7, chunk 14..20 is labelled only at 18..20,
        labels[2, 0] = -100  # and with chunk 1 (or 3) whole chunks are ignored
    elif ignored == "all":
        labels[:] = -100
    teacher_logp = F.log_softmax(torch.randn(B, T, V, generator=g) * 3, dim=-1)
    lp, ids = teacher_logp.topk(k, dim=-1)
    return hidden, weight, b, labels, ids, lp


def grads(total, tensors):
    return torch.autograd.grad(total, [t for t in tensors if t is not None])


def check(dtype, chunk, ignored="some", loss="forward_kl", temperature=1.0, gamma=0.7, k=K, teacher=True,
          bias=True, beta=0.5, skew=0.1):
    h, w, b, labels, ids, lp = make(dtype, k, ignored, bias=bias)
    ids, lp = (ids, lp) if teacher else (None, None)
    ref, ref_parts = distill_loss(F.linear(h, w, b), labels, ids, lp, gamma, temperature, loss, beta, skew)
    out, parts = chunked_distill_loss(h, w, labels, ids, lp, gamma, temperature, loss, beta, skew,
                                      chunk_tokens=chunk, bias=b)
    tol = dict(rtol=1e-6, atol=1e-6)
    assert torch.isfinite(out)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(parts["ce"], ref_parts["ce"], **tol)
    torch.testing.assert_close(parts["kl"], ref_parts["kl"], **tol)
    assert not parts["ce"].requires_grad and not parts["kl"].requires_grad
    for got, want in zip(grads(out, (h, w, b)), grads(ref, (h, w, b))):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, **tol)
    return ref, ref_parts


CHUNKS = [1, 7, B * T, 100]  # one position, not dividing, exactly all, larger than all


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("ignored", ["none", "some"])
def test_equals_plain_path(dtype, chunk, ignored):
    _, parts = check(dtype, chunk, ignored)
    assert parts["kl"] > 0 and parts["ce"] > 0  # a check that can fail: both terms are in play


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("chunk", [1, 7, 100])
def test_every_divergence(loss, chunk):
    check(torch.float64, chunk, "some", loss=loss, beta=0.3, skew=0.2)


@pytest.mark.parametrize("loss", LOSSES)
def test_every_divergence_at_temperature_2(loss):
    check(torch.float32, 7, "some", loss=loss, temperature=2.0)


@pytest.mark.parametrize("loss", ["forward_kl", "jsd", "tvd"])
def test_full_vocabulary_k_equals_v(loss):
    check(torch.float64, 7, "some", loss=loss, k=V, temperature=2.0)


@pytest.mark.parametrize("chunk", [1, 7, 100])
def test_ce_only(chunk):
    check(torch.float64, chunk, "some", gamma=0.0, teacher=False)  # gamma 0, no teacher at all
    check(torch.float64, chunk, "some", gamma=0.0, teacher=True)   # gamma 0, a teacher that must not count
    _, parts = check(torch.float64, chunk, "some", gamma=1.0, teacher=False)  # a teacher missing: CE only
    assert parts["kl"] == 0


def test_without_bias():
    check(torch.float64, 7, "some", bias=False)
    check(torch.float32, 4, "none", bias=False, loss="reverse_kl", temperature=2.0)


@pytest.mark.parametrize("chunk", [1, 7, 100])
def test_all_labels_ignored_gives_zero_not_nan(chunk):
    h, w, b, labels, ids, lp = make(torch.float32, ignored="all")
    out, parts = chunked_distill_loss(h, w, labels, ids, lp, 0.7, 1.0, chunk_tokens=chunk, bias=b)
    assert out.item() == 0 and parts["ce"].item() == 0 and parts["kl"].item() == 0
    out.backward()
    for t in (h, w, b):
        assert torch.equal(t.grad, torch.zeros_like(t))
    check(torch.float32, chunk, "all")


def test_gradient_scales_with_the_incoming_gradient():
    h, w, b, labels, ids, lp = make()
    out, _ = chunked_distill_loss(h, w, labels, ids, lp, 0.7, 1.0, chunk_tokens=7, bias=b)
    ref, _ = distill_loss(F.linear(h, w, b), labels, ids, lp, 0.7, 1.0)
    g_out = torch.autograd.grad(3.0 * out, (h, w, b))
    g_ref = torch.autograd.grad(3.0 * ref, (h, w, b))
    for got, want in zip(g_out, g_ref):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_gradient_reaches_a_weight_tied_to_the_embedding():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(V, H).double()
    tokens = torch.randint(0, V, (B, T))
    _, _, _, labels, ids, lp = make()

    def run(chunk):
        emb.zero_grad()
        hidden = torch.tanh(emb(tokens))  # a stand-in for the body, with the same weight as the head
        out, _ = chunked_distill_loss(hidden, emb.weight, labels, ids, lp, 0.5, 2.0, chunk_tokens=chunk)
        out.backward()
        return emb.weight.grad.clone()

    torch.testing.assert_close(run(7), run(0), rtol=1e-6, atol=1e-6)
    assert run(7).abs().sum() > 0


def test_no_grad_and_frozen_inputs():
    h, w, b, labels, ids, lp = make()
    ref, _ = distill_loss(F.linear(h, w, b), labels, ids, lp, 0.7, 2.0, "jsd")
    with torch.no_grad():
        out, _ = chunked_distill_loss(h, w, labels, ids, lp, 0.7, 2.0, "jsd", chunk_tokens=7, bias=b)
    assert not out.requires_grad
    torch.testing.assert_close(out, ref.detach(), rtol=1e-6, atol=1e-6)
    # only the hidden states train (a frozen head): the gradient wrt hidden alone
    w2, b2 = w.detach(), b.detach()
    out, _ = chunked_distill_loss(h, w2, labels, ids, lp, 0.7, 2.0, "jsd", chunk_tokens=7, bias=b2)
    (g,) = torch.autograd.grad(out, h)
    (g_ref,) = torch.autograd.grad(ref, h)
    torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-6)


def test_bf16_autocast_matches_plain_path_under_autocast():
    h, w, b, labels, ids, lp = make(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, _ = distill_loss(F.linear(h, w, b), labels, ids, lp, 0.7, 1.0)
        out, _ = chunked_distill_loss(h, w, labels, ids, lp, 0.7, 1.0, chunk_tokens=7, bias=b)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads(out, (h, w, b)), grads(ref, (h, w, b))):
        assert got.dtype == torch.float32  # in the inputs' dtype
        # not 1e-6: the plain path casts the two terms' logit gradients (CE, divergence) to bf16 separately and
        # adds them in bf16; the chunked one adds them in float32 first. A few bf16 ulps apart.
        torch.testing.assert_close(got, want, rtol=3e-2, atol=2e-3)


def test_default_chunk_tokens_by_hand():
    mib256 = 256 * 2**20
    assert default_chunk_tokens(32000) == mib256 // (4 * 32000) == 2097
    assert default_chunk_tokens(128000) == 524  # 524 * 128000 * 4 = 268,288,000 <= 268,435,456
    assert 525 * 128000 * 4 > mib256
    assert default_chunk_tokens(128256) == 523
    assert default_chunk_tokens(2048) == MAX_CHUNK_TOKENS == 8192  # 32768 by the budget: capped
    assert default_chunk_tokens(10**9) == 1  # never 0
    assert default_chunk_tokens(1000, budget_bytes=4000 * 3) == 3
    with pytest.raises(ValueError):
        default_chunk_tokens(0)


def test_chunk_tokens_none_uses_the_default_and_bad_values_are_refused():
    check(torch.float64, None, "some")  # default: one chunk here (8192 >= 27 positions)
    h, w, _, labels, ids, lp = make()
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="chunk_tokens"):
            chunked_distill_loss(h, w, labels, ids, lp, 0.7, 1.0, chunk_tokens=bad)
    with pytest.raises(ValueError, match="teacher shapes"):
        chunked_distill_loss(h, w, labels, ids[:, :-1], lp[:, :-1], 0.7, 1.0, chunk_tokens=7)
    with pytest.raises(ValueError, match="loss"):
        chunked_distill_loss(h, w, labels, ids, lp, 0.7, 1.0, loss="kl", chunk_tokens=7)


# ---------------------------------------------------------------------------------------------------------
# the chunked path never holds [B * T, V]

class LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def largest(chunk, *, saved: bool):
    """Largest saved tensor (saved=True) or largest operator output of one loss + backward."""
    torch.manual_seed(0)
    b_, t_, h_, v_, k_ = 2, 16, 4, 50, 3  # B*T*V = 1600; chunk 5: 250 >= V*H = 200 >= B*T*H = 128
    hidden = torch.randn(b_, t_, h_, requires_grad=True)
    weight = torch.randn(v_, h_, requires_grad=True)
    labels = torch.randint(0, v_, (b_, t_))
    lp, ids = F.log_softmax(torch.randn(b_, t_, v_), -1).topk(k_, -1)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    if saved:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out, _ = chunked_distill_loss(hidden, weight, labels, ids, lp, 1.0, 2.0, "jsd", chunk_tokens=chunk)
            out.backward()
        return max(sizes), b_ * t_ * v_, v_
    with LargestOutput() as mode:
        out, _ = chunked_distill_loss(hidden, weight, labels, ids, lp, 1.0, 2.0, "jsd", chunk_tokens=chunk)
        out.backward()
    return mode.largest, b_ * t_ * v_, v_


@pytest.mark.parametrize("saved", [True, False])
def test_chunked_path_never_materialises_the_full_logits(saved):
    got, full, v = largest(5, saved=saved)
    assert got <= 5 * v
    plain, full, _ = largest(0, saved=saved)  # the plain path does, so the measurement sees it
    assert plain >= full
