"""The KD loss against references written independently of services/trainer/loss.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ddk.trainer.loss import distill_loss


def dense_kl_reference(student_logits, teacher_logits, labels, temperature=1.0):
    """Full-vocabulary T^2 * KL(teacher || student), mean over labelled positions, via F.kl_div."""
    T = temperature
    log_q = F.log_softmax(student_logits.double() / T, dim=-1)
    log_p = F.log_softmax(teacher_logits.double() / T, dim=-1)
    per_pos = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    mask = labels != -100
    return (per_pos[mask].mean() * T * T).item()


def teacher_topk(teacher_logits, k):
    """What the teacher service sends: top-k natural-log probs at T=1 over the full vocab, sorted."""
    logp = F.log_softmax(teacher_logits.float(), dim=-1)
    values, ids = logp.topk(k, dim=-1)
    return ids, values


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 7, 11
    student = torch.randn(B, T, V, generator=g) * 2
    teacher = torch.randn(B, T, V, generator=g) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100  # some ignored positions
    return student, teacher, labels


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_full_support_equals_dense_kl(batch, temperature):
    student, teacher, labels = batch
    ids, logp = teacher_topk(teacher, k=student.shape[-1])
    _, parts = distill_loss(student, labels, ids, logp, gamma=1.0, temperature=temperature)
    assert parts["kl"].item() == pytest.approx(dense_kl_reference(student, teacher, labels, temperature),
                                               abs=1e-5)


def test_topk_matches_tail_bucket_by_hand():
    # one position, V = 5, k = 2, every number written out
    s = [0.3, -1.0, 2.0, 0.0, 1.1]
    t = [2.5, 0.1, -0.7, 1.9, 0.0]
    zs, zt = sum(math.exp(x) for x in s), sum(math.exp(x) for x in t)
    q = [math.exp(x) / zs for x in s]
    p = [math.exp(x) / zt for x in t]
    top = [0, 3]  # the teacher's two largest
    p_tail = 1 - p[0] - p[3]
    q_tail = 1 - q[0] - q[3]
    expected = sum(p[i] * math.log(p[i] / q[i]) for i in top) + p_tail * math.log(p_tail / q_tail)

    student = torch.tensor(s).view(1, 1, 5)
    ids = torch.tensor(top).view(1, 1, 2)
    logp = torch.tensor([math.log(p[0]), math.log(p[3])]).view(1, 1, 2)
    labels = torch.tensor([[2]])
    _, parts = distill_loss(student, labels, ids, logp, gamma=0.2, temperature=1.0)
    assert parts["kl"].item() == pytest.approx(expected, abs=1e-6)
    # coarsening never increases the KL
    full = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert parts["kl"].item() <= full + 1e-7


def test_topk_with_temperature_by_hand():
    # T = 2: teacher buckets are softmax(log p_k / T, log p_tail / T); student buckets from softmax(s / T)
    T = 2.0
    s = [0.3, -1.0, 2.0, 0.0]
    t = [2.5, 0.1, -0.7, 1.9]
    zt = sum(math.exp(x) for x in t)
    p = [math.exp(x) / zt for x in t]
    top = [0, 3]
    p_tail = 1 - p[0] - p[3]
    scaled = [p[0] ** (1 / T), p[3] ** (1 / T), p_tail ** (1 / T)]
    pT = [x / sum(scaled) for x in scaled]
    zs = sum(math.exp(x / T) for x in s)
    qT = [math.exp(s[0] / T) / zs, math.exp(s[3] / T) / zs]
    qT.append(1 - qT[0] - qT[1])
    expected = T * T * sum(a * math.log(a / b) for a, b in zip(pT, qT))

    _, parts = distill_loss(torch.tensor(s).view(1, 1, 4), torch.tensor([[1]]), torch.tensor(top).view(1, 1, 2),
                            torch.tensor([math.log(p[0]), math.log(p[3])]).view(1, 1, 2), gamma=1.0, temperature=T)
    assert parts["kl"].item() == pytest.approx(expected, abs=1e-6)


def test_loss_is_ce_plus_gamma_kl(batch):
    student, teacher, labels = batch
    ids, logp = teacher_topk(teacher, k=4)
    loss, parts = distill_loss(student, labels, ids, logp, gamma=0.2, temperature=1.0)
    ce_ref = F.cross_entropy(student.reshape(-1, student.shape[-1]), labels.reshape(-1), ignore_index=-100)
    assert parts["ce"].item() == pytest.approx(ce_ref.item(), abs=1e-6)
    assert parts["kl"].item() > 0
    assert loss.item() == pytest.approx(ce_ref.item() + 0.2 * parts["kl"].item(), abs=1e-6)
    assert not parts["ce"].requires_grad and not parts["kl"].requires_grad


def test_gamma_zero_or_no_teacher_is_plain_ce(batch):
    student, _, labels = batch
    ce_ref = F.cross_entropy(student.reshape(-1, student.shape[-1]), labels.reshape(-1), ignore_index=-100)
    for gamma in (0.0, 0.2):  # no teacher tensors at all: must not need them
        loss, parts = distill_loss(student, labels, None, None, gamma=gamma, temperature=1.0)
        assert loss.item() == pytest.approx(ce_ref.item(), abs=1e-6)
        assert parts["kl"].item() == 0.0


@pytest.mark.parametrize("k", [1, 4, 11])
def test_gradients_finite(batch, k):
    student, teacher, labels = batch
    # a peaked teacher: top-k carries (almost) all the mass, tail ~ 0 or exactly 0
    ids, logp = teacher_topk(teacher * 30, k=k)
    s = student.clone().requires_grad_(True)
    loss, parts = distill_loss(s, labels, ids, logp, gamma=0.5, temperature=1.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(parts["kl"])
    assert torch.isfinite(s.grad).all()
    assert s.grad[0, :2].abs().max() == 0  # ignored positions get no gradient


def test_zero_tail_exactly_no_nan():
    # the teacher puts all its mass on the k tokens (logprobs sum to exactly 1)
    ids = torch.tensor([[[1, 2]]])
    logp = torch.log(torch.tensor([[[0.5, 0.5]]]))
    s = torch.zeros(1, 1, 4, requires_grad=True)
    loss, parts = distill_loss(s, torch.tensor([[1]]), ids, logp, gamma=1.0, temperature=1.0)
    loss.backward()
    # by hand: p = (.5, .5, 0); q = (.25, .25, .5) -> KL = log 2
    assert parts["kl"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert torch.isfinite(s.grad).all()


def test_all_positions_ignored_is_zero_not_nan(batch):
    student, teacher, labels = batch
    ids, logp = teacher_topk(teacher, k=3)
    loss, parts = distill_loss(student, torch.full_like(labels, -100), ids, logp, gamma=0.2, temperature=1.0)
    assert loss.item() == 0.0 and parts["kl"].item() == 0.0
