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


# ---------------------------------------------------------------------------------------------------------
# the other divergences (loss=...), each against its textbook definition computed here in float64

DIVERGENCES = [  # (loss, beta, skew): every name, jsd's endpoints and interior, skew's range
    ("forward_kl", 0.5, 0.1), ("reverse_kl", 0.5, 0.1),
    ("jsd", 0.0, 0.1), ("jsd", 0.1, 0.1), ("jsd", 0.5, 0.1), ("jsd", 0.9, 0.1), ("jsd", 1.0, 0.1),
    ("skew_kl", 0.5, 0.1), ("skew_kl", 0.5, 0.5), ("skew_kl", 0.5, 1.0),
    ("skew_rkl", 0.5, 0.1), ("skew_rkl", 0.5, 0.5), ("skew_rkl", 0.5, 1.0),
    ("tvd", 0.5, 0.1),
]
ALL_LOSSES = ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_rkl", "tvd"]


def textbook_kl(a, b):
    """KL(a || b) = sum_i a_i log(a_i / b_i), with 0 log 0 = 0."""
    return torch.where(a > 0, a * torch.log(a / b), torch.zeros_like(a)).sum(-1)


def textbook_divergence(loss, p, q, beta, skew):
    """Per position, p the teacher's and q the student's distribution (last dim)."""
    if loss == "forward_kl":
        return textbook_kl(p, q)
    if loss == "reverse_kl":
        return textbook_kl(q, p)
    if loss == "jsd":  # TRL's generalized_jsd_loss: the plain KLs at the endpoints, else the mixture form
        if beta == 0:
            return textbook_kl(p, q)
        if beta == 1:
            return textbook_kl(q, p)
        m = beta * p + (1 - beta) * q
        return beta * textbook_kl(p, m) + (1 - beta) * textbook_kl(q, m)
    if loss == "skew_kl":  # DistiLLM
        return textbook_kl(p, skew * p + (1 - skew) * q)
    if loss == "skew_rkl":
        return textbook_kl(q, skew * q + (1 - skew) * p)
    if loss == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(loss)


def reduce_reference(per_pos, labels, temperature):
    mask = labels != -100
    return per_pos[mask].mean() * temperature ** 2


def dense_reference(loss, student, teacher_logits, labels, temperature, beta, skew):
    """Full vocabulary: p = softmax(teacher / T), q = softmax(student / T)."""
    p = torch.softmax(teacher_logits.double() / temperature, dim=-1)
    q = torch.softmax(student / temperature, dim=-1)
    return reduce_reference(textbook_divergence(loss, p, q, beta, skew), labels, temperature)


def bucket_reference(loss, student, teacher_logprobs, ids, labels, temperature, beta, skew):
    """The k + 1 buckets by hand: teacher (p_k, p_tail) at T=1 from the values it sent, raised to 1/T and
    renormalised; student softmax(student / T) on the k ids plus 1 - their sum."""
    p_k = teacher_logprobs.double().exp()
    p_tail = 1 - p_k.sum(-1, keepdim=True)
    w = torch.cat([p_k, p_tail], dim=-1) ** (1 / temperature)
    p = w / w.sum(-1, keepdim=True)
    q_k = torch.softmax(student / temperature, dim=-1).gather(-1, ids)
    q = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], dim=-1)
    return reduce_reference(textbook_divergence(loss, p, q, beta, skew), labels, temperature)


def module_and_reference(batch, k, loss, beta, skew, temperature):
    """(divergence, gradient) of distill_loss (float32) and of the reference (float64) on the same logits.

    The gradient is that of ``total = ce + 1 * divergence``; the reference's is that of its own
    ``ce + divergence``, so any difference is the divergence's (CE is F.cross_entropy in both)."""
    student, teacher, labels = batch
    ids, logp = teacher_topk(teacher, k=k)
    s32 = student.clone().requires_grad_(True)
    total, parts = distill_loss(s32, labels, ids, logp, gamma=1.0, temperature=temperature,
                                loss=loss, beta=beta, skew=skew)
    total.backward()
    s64 = student.double().requires_grad_(True)
    if k == student.shape[-1]:
        ref = dense_reference(loss, s64, teacher, labels, temperature, beta, skew)
    else:
        ref = bucket_reference(loss, s64, logp, ids, labels, temperature, beta, skew)
    ce = F.cross_entropy(s64.reshape(-1, s64.shape[-1]), labels.reshape(-1), ignore_index=-100)
    (ce + ref).backward()
    return parts["kl"].item(), s32.grad.double(), ref.item(), s64.grad


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("loss, beta, skew", DIVERGENCES)
def test_full_support_equals_dense_divergence(batch, loss, beta, skew, temperature):
    value, grad, ref, ref_grad = module_and_reference(batch, batch[0].shape[-1], loss, beta, skew, temperature)
    assert value == pytest.approx(ref, abs=1e-6)
    assert (grad - ref_grad).abs().max().item() < 1e-6


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("loss, beta, skew", DIVERGENCES)
def test_topk_equals_divergence_on_buckets(batch, loss, beta, skew, k, temperature):
    value, grad, ref, ref_grad = module_and_reference(batch, k, loss, beta, skew, temperature)
    assert value == pytest.approx(ref, abs=1e-6)
    assert (grad - ref_grad).abs().max().item() < 1e-6
    if loss in ("skew_kl", "skew_rkl") and skew == 1.0:
        assert value == 0.0
    else:
        assert value > 0


def test_topk_divergences_by_hand():
    # one position, V = 4, k = 2, every bucket written out (T = 1)
    s = [0.3, -1.0, 2.0, 0.0]
    t = [2.5, 0.1, -0.7, 1.9]
    zs, zt = sum(math.exp(x) for x in s), sum(math.exp(x) for x in t)
    q_full = [math.exp(x) / zs for x in s]
    p_full = [math.exp(x) / zt for x in t]
    p = [p_full[0], p_full[3], p_full[1] + p_full[2]]
    q = [q_full[0], q_full[3], q_full[1] + q_full[2]]

    def kl(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b))

    m = [0.3 * x + 0.7 * y for x, y in zip(p, q)]
    expected = {
        "reverse_kl": kl(q, p),
        "jsd": 0.3 * kl(p, m) + 0.7 * kl(q, m),
        "skew_kl": kl(p, [0.2 * x + 0.8 * y for x, y in zip(p, q)]),
        "skew_rkl": kl(q, [0.2 * y + 0.8 * x for x, y in zip(p, q)]),
        "tvd": 0.5 * sum(abs(x - y) for x, y in zip(p, q)),
    }
    for loss, value in expected.items():
        _, parts = distill_loss(torch.tensor(s).view(1, 1, 4), torch.tensor([[1]]), torch.tensor([0, 3]).view(1, 1, 2),
                                torch.tensor([math.log(p[0]), math.log(p[1])]).view(1, 1, 2), gamma=1.0,
                                temperature=1.0, loss=loss, beta=0.3, skew=0.2)
        assert parts["kl"].item() == pytest.approx(value, abs=1e-6), loss


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_jsd_endpoints_are_the_kls(batch, temperature):
    student, teacher, labels = batch
    for k in (4, student.shape[-1]):
        ids, logp = teacher_topk(teacher, k=k)

        def kl(loss, beta=0.5):
            return distill_loss(student, labels, ids, logp, gamma=0.2, temperature=temperature,
                                loss=loss, beta=beta)[1]["kl"].item()

        assert kl("jsd", beta=0.0) == kl("forward_kl")
        assert kl("jsd", beta=1.0) == kl("reverse_kl")
        assert kl("forward_kl") != kl("reverse_kl")


@pytest.mark.parametrize("temperature", [1.0, 1.5, 0.5])
@pytest.mark.parametrize("k", [1, 4, 11])
@pytest.mark.parametrize("loss", ALL_LOSSES)
def test_divergences_finite_on_hard_inputs(batch, loss, k, temperature):
    student, teacher, labels = batch
    # a peaked teacher (tail ~ 0, taken as exactly 0) sent as float16, with ignored positions
    ids, logp = teacher_topk(teacher * 30, k=k)
    for beta, skew in ((0.0, 1.0), (0.5, 0.1), (1.0, 0.5)):
        s = student.clone().requires_grad_(True)
        loss_value, parts = distill_loss(s, labels, ids, logp.half(), gamma=0.5, temperature=temperature,
                                         loss=loss, beta=beta, skew=skew)
        loss_value.backward()
        assert torch.isfinite(loss_value) and torch.isfinite(parts["kl"]) and parts["kl"].item() >= 0
        assert torch.isfinite(s.grad).all()
        assert s.grad[0, :2].abs().max() == 0  # ignored positions get no gradient


@pytest.mark.parametrize("loss", ALL_LOSSES)
def test_divergences_zero_tail_exactly(loss):
    # the teacher puts all its mass on the k tokens: p = (.5, .5, 0); the student q = (.25, .25, .5)
    ids = torch.tensor([[[1, 2]]])
    logp = torch.log(torch.tensor([[[0.5, 0.5]]]))
    for beta, skew in ((0.0, 1.0), (0.5, 0.1), (1.0, 0.5)):
        s = torch.zeros(1, 1, 4, requires_grad=True)
        total, parts = distill_loss(s, torch.tensor([[1]]), ids, logp, gamma=1.0, temperature=2.0,
                                    loss=loss, beta=beta, skew=skew)
        total.backward()
        assert torch.isfinite(total) and torch.isfinite(parts["kl"]) and torch.isfinite(s.grad).all()
    # the ones that stay finite without any floor, by hand (T = 1)
    p, q = [0.5, 0.5, 0.0], [0.25, 0.25, 0.5]

    def kl(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)

    m = [0.5 * x + 0.5 * y for x, y in zip(p, q)]
    expected = {"forward_kl": kl(p, q), "jsd": 0.5 * kl(p, m) + 0.5 * kl(q, m),
                "skew_kl": kl(p, [0.1 * x + 0.9 * y for x, y in zip(p, q)]),
                "skew_rkl": kl(q, [0.1 * y + 0.9 * x for x, y in zip(p, q)]), "tvd": 0.5}
    if loss in expected:
        _, parts = distill_loss(torch.zeros(1, 1, 4), torch.tensor([[1]]), ids, logp, gamma=1.0, temperature=1.0,
                                loss=loss, beta=0.5, skew=0.1)
        assert parts["kl"].item() == pytest.approx(expected[loss], abs=1e-6)
    else:  # reverse_kl: student mass on a bucket the teacher left empty -> large, finite
        _, parts = distill_loss(torch.zeros(1, 1, 4), torch.tensor([[1]]), ids, logp, gamma=1.0, temperature=1.0,
                                loss=loss)
        assert 5 < parts["kl"].item() < 20


@pytest.mark.parametrize("loss", ALL_LOSSES)
def test_divergences_all_ignored_is_zero(batch, loss):
    student, teacher, labels = batch
    ids, logp = teacher_topk(teacher, k=3)
    total, parts = distill_loss(student, torch.full_like(labels, -100), ids, logp, gamma=0.2, temperature=1.0,
                                loss=loss)
    assert total.item() == 0.0 and parts["kl"].item() == 0.0


@pytest.mark.parametrize("kwargs, argument", [
    ({"loss": "kl"}, "loss"), ({"loss": "Forward_KL"}, "loss"), ({"loss": None}, "loss"),
    ({"beta": -0.1}, "beta"), ({"beta": 1.5}, "beta"), ({"beta": float("nan")}, "beta"), ({"beta": "0.5"}, "beta"),
    ({"skew": 0.0}, "skew"), ({"skew": -0.5}, "skew"), ({"skew": 1.01}, "skew"), ({"skew": float("nan")}, "skew"),
])
def test_bad_divergence_arguments_raise(batch, kwargs, argument):
    student, teacher, labels = batch
    ids, logp = teacher_topk(teacher, k=3)
    for t_ids, t_logp, gamma in ((ids, logp, 0.2), (None, None, 0.0)):  # checked even when the KD term is off
        with pytest.raises(ValueError, match=f"^{argument}:"):
            distill_loss(student, labels, t_ids, t_logp, gamma=gamma, temperature=1.0, **kwargs)


def test_config_kd_keys_match_the_module():
    import typing

    from ddk.errors import UsageError
    from ddk.trainer.config import KDSection, validate_config
    from ddk.trainer.loss import LOSSES

    assert typing.get_args(KDSection.model_fields["loss"].annotation) == LOSSES
    kd = KDSection()
    assert (kd.loss, kd.beta, kd.skew) == ("forward_kl", 0.5, 0.1)
    raw = {"run_id": "r", "student": {"model": "/s"}, "data": {"file": "/d.yaml"}, "train": {"steps": 1},
           "mixture": {"policy": "fixed"}, "output_dir": "/tmp/out"}
    for kd_raw, key in (({"gamma": 0, "loss": "kl"}, "kd.loss:"), ({"gamma": 0, "beta": 1.5}, "kd.beta:"),
                        ({"gamma": 0, "beta": -1}, "kd.beta:"), ({"gamma": 0, "skew": 0}, "kd.skew:"),
                        ({"gamma": 0, "skew": 2}, "kd.skew:")):
        with pytest.raises(UsageError, match=f"^{key}"):
            validate_config({**raw, "kd": kd_raw})
    cfg = validate_config({**raw, "kd": {"gamma": 0, "loss": "jsd", "beta": 0, "skew": 1}})
    assert (cfg.kd.loss, cfg.kd.beta, cfg.kd.skew) == ("jsd", 0.0, 1.0)
