"""Packing without leaks (ddk.data.packing): blocks, position ids, segments and targets by hand; the 4-D mask by
hand; on the quick kit's student (a transformers Llama), a packed batch's per-conversation loss equals each
conversation run alone (1e-5) with position ids alone, a bool 4-D mask (sdpa) and an additive one (eager), and a
probe: changing one conversation leaves the others' logits unchanged (and would not under a plain causal mask)."""

from __future__ import annotations

import numpy as np
import pytest

from ddk.data.packing import (IGNORE_INDEX, attention_mask_4d, block_causal, conversation_targets, pack,
                              packing_efficiency)

X = IGNORE_INDEX


def test_pack_by_hand():
    convs = [([11, 12, 13], [False, True, True]),
             ([21, 22, 23, 24], [False, False, True, False]),
             ([31, 32], [False, True])]
    b0, b1 = pack(convs, seq_len=6, pad_id=0)
    # first fit: 0 -> block 0; 1 (4 tokens) does not fit beside it -> block 1; 2 fits block 0
    assert b0.segments == [(0, 3, 0), (3, 5, 2)] and b1.segments == [(0, 4, 1)]
    assert b0.input_ids.tolist() == [11, 12, 13, 31, 32, 0]
    assert b0.position_ids.tolist() == [0, 1, 2, 0, 1, 0]
    assert b0.segment_ids.tolist() == [1, 1, 1, 2, 2, 0]
    assert b0.targets.tolist() == [12, 13, X, 32, X, X]  # 13 does not predict 31: another conversation
    assert b1.input_ids.tolist() == [21, 22, 23, 24, 0, 0]
    assert b1.position_ids.tolist() == [0, 1, 2, 3, 0, 1]
    assert b1.targets.tolist() == [X, 23, X, X, X, X]
    assert packing_efficiency([b0, b1]) == pytest.approx(9 / 12)
    assert conversation_targets([5], [True]).tolist() == [X]
    with pytest.raises(ValueError, match="does not fit"):
        pack([([1] * 7, [True] * 7)], seq_len=6)
    with pytest.raises(ValueError, match="differ"):
        pack([([1, 2], [True])], seq_len=6)


def test_block_causal_by_hand():
    m = block_causal([1, 1, 2, 2, 0])[0, 0]
    want = np.array([[1, 0, 0, 0, 0],
                     [1, 1, 0, 0, 0],
                     [0, 0, 1, 0, 0],
                     [0, 0, 1, 1, 0],
                     [0, 0, 0, 0, 1]], dtype=bool)
    assert (m == want).all()
    import torch

    f = attention_mask_4d(np.array([[1, 1, 2, 2, 0]]), torch.float32)
    assert f.shape == (1, 1, 5, 5) and f.dtype == torch.float32
    assert ((f == 0).numpy()[0, 0] == want).all()
    assert (f[0, 0][~torch.from_numpy(want)] == torch.finfo(torch.float32).min).all()
    b = attention_mask_4d(torch.tensor([1, 1, 2, 2, 0]))
    assert b.dtype == torch.bool and (b.numpy()[0, 0] == want).all()


@pytest.fixture(scope="module")
def student(kit):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    models = {}
    for impl in ("sdpa", "eager"):
        m = AutoModelForCausalLM.from_pretrained(str(kit / "student"), dtype=torch.float32, attn_implementation=impl)
        models[impl] = m.eval()
    return models


def conv_set(seed: int, lengths=(20, 33, 11), vocab=2048):
    rng = np.random.default_rng(seed)
    return [(rng.integers(3, vocab, n).tolist(), (rng.random(n) < 0.5).tolist()) for n in lengths]


def losses_alone(model, convs):
    import torch
    import torch.nn.functional as F

    out = []
    with torch.no_grad():
        for ids, labels in convs:
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            tgt = torch.from_numpy(conversation_targets(ids, labels))
            out.append((F.cross_entropy(logits, tgt, ignore_index=X).item(), logits))
    return out


def packed_logits(model, block, how: str):
    import torch

    ids = torch.from_numpy(block.input_ids)[None]
    pos = torch.from_numpy(block.position_ids)[None]
    kw = {"position_ids": pos, "use_cache": False}  # a cache turns off the packed-sequence detection
    if how == "mask-bool":
        kw["attention_mask"] = attention_mask_4d(block.segment_ids)
    elif how == "mask-float":
        kw["attention_mask"] = attention_mask_4d(block.segment_ids, torch.float32)
    elif how == "causal-only":  # a plain causal mask over the whole block: the leak the packing must avoid
        kw = {"use_cache": False}
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits[0]


CASES = [("sdpa", "position-ids"), ("sdpa", "mask-bool"), ("sdpa", "mask-float"), ("eager", "position-ids"),
         ("eager", "mask-float")]


@pytest.mark.parametrize("impl,how", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_packed_loss_equals_alone(student, impl, how):
    import torch
    import torch.nn.functional as F

    model = student[impl]
    convs = conv_set(1)
    (block,) = pack(convs, seq_len=72)  # 64 tokens, 8 of padding
    logits = packed_logits(model, block, how)
    alone = losses_alone(model, convs)
    for (a, b, k), (loss_alone, logits_alone) in zip(block.segments, alone):
        loss = F.cross_entropy(logits[a:b], torch.from_numpy(block.targets[a:b]), ignore_index=X).item()
        assert abs(loss - loss_alone) < 1e-5, (k, loss, loss_alone)
        assert torch.allclose(logits[a:b], logits_alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl,how", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_changing_one_conversation_leaves_the_others(student, impl, how):
    import torch

    model = student[impl]
    convs = conv_set(2)
    other = list(convs)
    other[1] = conv_set(3, lengths=(33,))[0]  # the middle conversation, other tokens
    (b1,), (b2,) = pack(convs, seq_len=64), pack(other, seq_len=64)
    assert b1.segments == b2.segments
    l1, l2 = packed_logits(model, b1, how), packed_logits(model, b2, how)
    (a0, e0, _), (a1, e1, _), (a2, e2, _) = b1.segments
    assert torch.allclose(l1[a0:e0], l2[a0:e0], atol=1e-6, rtol=0)
    assert torch.allclose(l1[a2:e2], l2[a2:e2], atol=1e-6, rtol=0)
    assert not torch.allclose(l1[a1:e1], l2[a1:e1], atol=1e-3)
    # the probe can fail: under a plain causal mask the third conversation sees the second
    c1, c2 = packed_logits(model, b1, "causal-only"), packed_logits(model, b2, "causal-only")
    assert not torch.allclose(c1[a2:e2], c2[a2:e2], atol=1e-3)
