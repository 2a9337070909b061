"""On-policy distillation's foundation (issue 28): the sampled reverse-KL loss, its importance weight, the GKD
form, the on-policy gap, and the ``hf`` rollout engine on the quick kit's student.

Expected values come from textbook formulas written here (the REINFORCE gradient of a softmax table by hand,
the dense KL, argmax decoding by a plain loop), never from the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from ddk.trainer.onpolicy_loss import (completion_labels, gkd_divergence, importance_weight, onpolicy_gap,
                                       sampled_reverse_kl, token_logprobs)
from ddk.teacher.generation import left_pad
from ddk.trainer.rollout import HFRollout, cut_at_eos, step_seed


# ---------------------------------------------------------------------------------------------------------
# the loss: a few-parameter model whose REINFORCE gradient is known in closed form

class Table(torch.nn.Module):
    """A bigram model: the logits of the next token are the row ``W[previous token]`` (V x V parameters)."""

    def __init__(self, V: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(torch.randn(V, V, generator=g, dtype=torch.float64))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, V]
        return self.W[ids]


def _rollout_batch(V=5):
    # two rows: ids[:, :-1] are the inputs, ids[:, 1:] the tokens each position predicts; mask on the completion
    ids = torch.tensor([[0, 3, 1, 4, 2], [1, 2, 2, 0, 0]])
    completion = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]])  # row 2: one completion token then padding
    targets = ids[:, 1:]
    mask = completion[:, 1:].double()
    g = torch.Generator().manual_seed(1)
    teacher = torch.log_softmax(torch.randn(2, 4, V, generator=g, dtype=torch.float64), -1)
    teacher_lp = teacher.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return ids, targets, mask, teacher_lp


def _reinforce_reference(model: Table, ids, targets, mask, teacher_lp, weights=None) -> torch.Tensor:
    """-(1/M) sum_t m_t w_t A_t grad log p(x_t), with grad_z log softmax(z)_x = onehot(x) - softmax(z)."""
    W = model.W.detach()
    grad = torch.zeros_like(W)
    M = float(mask.sum())
    for b in range(ids.shape[0]):
        for t in range(targets.shape[1]):
            if mask[b, t] == 0:
                continue
            prev, x = int(ids[b, t]), int(targets[b, t])
            p = torch.softmax(W[prev], -1)
            log_p_x = math.log(float(p[x]))
            A = -(log_p_x - float(teacher_lp[b, t]))
            w = 1.0 if weights is None else float(weights[b, t])
            onehot = torch.zeros_like(p)
            onehot[x] = 1.0
            grad[prev] += -(w * A) * (onehot - p) / M
    return grad


def test_sampled_reverse_kl_gradient_is_the_reinforce_gradient():
    model = Table(5)
    ids, targets, mask, teacher_lp = _rollout_batch()
    s = token_logprobs(model(ids[:, :-1]), targets).double()
    loss, parts = sampled_reverse_kl(s, teacher_lp, mask)
    loss.backward()
    ref = _reinforce_reference(model, ids, targets, mask, teacher_lp)
    assert ref.abs().max() > 1e-3  # a real gradient, not all zeros
    torch.testing.assert_close(model.W.grad.double(), ref, rtol=1e-5, atol=1e-6)
    # the logged reverse KL is the masked mean of log p_s - log p_t (4 completion tokens)
    want = sum(float(s.detach()[b, t] - teacher_lp[b, t]) for b, t in [(0, 1), (0, 2), (0, 3), (1, 0)]) / 4
    assert float(parts["reverse_kl"]) == pytest.approx(want, rel=1e-5)
    assert float(parts["weight"]) == pytest.approx(1.0)


def test_sampled_reverse_kl_gradient_with_stale_engine_weights_is_weighted():
    model = Table(5)
    ids, targets, mask, teacher_lp = _rollout_batch()
    s = token_logprobs(model(ids[:, :-1]), targets).double()
    engine = s.detach() + torch.tensor([[0.3, -2.0, 0.0, 0.1], [-0.4, 0.0, 0.0, 0.0]], dtype=torch.float64)
    loss, parts = sampled_reverse_kl(s, teacher_lp, mask, engine_logprobs=engine, clip=2.0)
    loss.backward()
    # w = min(2, exp(trainer - engine)): exp(-0.3), min(2, exp(2.0)) = 2, exp(0), exp(0.4) (pad: ignored)
    w = torch.tensor([[math.exp(-0.3), 2.0, 1.0, math.exp(-0.1)], [math.exp(0.4), 1.0, 1.0, 1.0]])
    ref = _reinforce_reference(model, ids, targets, mask, teacher_lp, weights=w)
    torch.testing.assert_close(model.W.grad.double(), ref, rtol=1e-5, atol=1e-6)
    assert float(parts["clipped"]) == pytest.approx(1 / 4)


def test_expected_sampled_gradient_is_the_reverse_kl_gradient():
    """Score-function identity: sum_x p(x) * grad of the one-token loss = grad KL(p || q) at one position."""
    V = 6
    z = torch.randn(V, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    log_q = torch.log_softmax(torch.randn(V, dtype=torch.float64, generator=torch.Generator().manual_seed(4)), -1)
    expected = torch.zeros(V, dtype=torch.float64)
    for x in range(V):
        log_p = torch.log_softmax(z, -1)
        loss, _ = sampled_reverse_kl(log_p[x].reshape(1, 1), log_q[x].reshape(1, 1), torch.ones(1, 1))
        (g,) = torch.autograd.grad(loss, z)
        expected += float(log_p[x].detach().exp()) * g
    p = torch.softmax(z, -1)
    kl = (p * (torch.log_softmax(z, -1) - log_q)).sum()  # KL(p || q) = sum p (log p - log q)
    (g_kl,) = torch.autograd.grad(kl, z)
    torch.testing.assert_close(expected, g_kl.detach(), rtol=1e-6, atol=1e-9)


def test_importance_weight_is_one_when_current_and_truncated_at_c():
    trainer = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    assert torch.equal(importance_weight(trainer, trainer.clone(), clip=2.0), torch.ones(4))
    assert torch.equal(importance_weight(trainer, None), torch.ones(4))
    engine = torch.tensor([-1.0, -2.5, -3.0, -2.0])  # trainer - engine = 0, 0.5, 2.5, -1
    w = importance_weight(trainer, engine, clip=2.0)
    torch.testing.assert_close(w, torch.tensor([1.0, math.exp(0.5), 2.0, math.exp(-1.0)]))
    assert not importance_weight(trainer.requires_grad_(), engine).requires_grad
    with pytest.raises(ValueError, match="clip"):
        importance_weight(trainer, engine, clip=0)


def test_sampled_reverse_kl_empty_mask_and_shapes():
    s = torch.zeros(1, 3, requires_grad=True)
    loss, _ = sampled_reverse_kl(s, torch.zeros(1, 3), torch.zeros(1, 3))
    assert float(loss.detach()) == 0.0 and not math.isnan(float(loss.detach()))
    with pytest.raises(ValueError, match="shapes"):
        sampled_reverse_kl(s, torch.zeros(1, 2), torch.zeros(1, 3))


def test_completion_labels_and_gkd_divergence_on_generated_positions_only():
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    completion = torch.tensor([[0, 0, 1, 1, 0]])  # 7, 8 generated; 9 is padding
    labels = completion_labels(ids, completion)
    assert labels.tolist() == [[-100, 7, 8, -100]]
    V = 10
    g = torch.Generator().manual_seed(0)
    s_logits = torch.randn(1, 4, V, generator=g)
    t_logp = torch.log_softmax(torch.randn(1, 4, V, generator=g), -1)
    t_ids = torch.arange(V).expand(1, 4, V)  # k == V: the divergence is the dense one
    got = gkd_divergence(s_logits, labels, t_ids, t_logp, loss="forward_kl")
    # textbook KL(p_teacher || q_student) = sum p (log p - log q), mean over positions 1 and 2
    log_q = torch.log_softmax(s_logits, -1)
    kl = [(t_logp[0, i].exp() * (t_logp[0, i] - log_q[0, i])).sum() for i in (1, 2)]
    assert float(got) == pytest.approx(float(sum(kl) / 2), rel=1e-5)


def test_onpolicy_gap_is_exp_of_token_mean_log_ratio():
    rows = [("a", [-1.0, -2.0], [-1.5, -1.0]),   # differences +0.5, -1.0
            ("a", [-0.5], [-2.5]),               # +2.0
            ("b", [-3.0, -0.25], [-3.0, -0.25]),  # teacher agrees: 0, 0
            ("c", [], [])]                       # no tokens: no gap
    q = onpolicy_gap(rows)
    assert set(q) == {"a", "b"}
    assert q["a"] == pytest.approx(math.exp(1.5 / 3))  # token-weighted, not the mean of row means (0.875)
    assert q["b"] == 1.0
    with pytest.raises(ValueError, match="lengths"):
        onpolicy_gap([("a", [-1.0], [])])


# ---------------------------------------------------------------------------------------------------------
# the hf rollout engine

def test_pure_helpers():
    ids, mask = left_pad([[4, 5, 6], [7]], pad_id=0)
    assert ids.tolist() == [[4, 5, 6], [0, 0, 7]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert cut_at_eos([9, 8, 2, 0, 0], [2]) == (3, True)
    assert cut_at_eos([9, 8, 7], [2]) == (3, False)
    assert step_seed(1, 2, 0) == step_seed(1, 2, 0)
    assert len({step_seed(1, 2, 0), step_seed(1, 3, 0), step_seed(1, 2, 1), step_seed(2, 2, 0)}) == 4
    with pytest.raises(ValueError, match="empty"):
        left_pad([[1], []], 0)


@pytest.fixture(scope="module")
def student(kit):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(kit / "student", dtype=torch.float32)


@pytest.fixture(scope="module")
def prompts(kit):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(kit / "student" / "tokenizer.json"))
    texts = ["def clear(self):", "What is 83 plus", "All rights", "# OpenTelemetry Semantic Conventions"]
    out = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    assert len({len(p) for p in out}) > 1  # ragged, so left padding is exercised
    return out


def test_hf_rollouts_repeat_from_the_same_seed_and_after_a_resume(student, prompts):
    a = HFRollout(seed=11, max_new_tokens=10)
    first, second = a.generate(student, prompts), a.generate(student, prompts)
    assert [r.completion_ids for r in first] != [r.completion_ids for r in second]  # a new seed each step
    assert [r.rollout_id for r in first] == [f"11-0-0-{i}" for i in range(4)]
    assert first == HFRollout(seed=11, max_new_tokens=10).generate(student, prompts)
    b = HFRollout(seed=11, max_new_tokens=10)
    b.load_state_dict(dict(a.state_dict(), step=1))  # as saved in a checkpoint after the first step
    assert b.generate(student, prompts) == second
    torch.manual_seed(5)
    before = torch.rand(3)
    torch.manual_seed(5)
    HFRollout(seed=11, max_new_tokens=4).generate(student, prompts)
    assert torch.equal(torch.rand(3), before)  # the caller's RNG stream is untouched
    with pytest.raises(ValueError, match="seed"):
        HFRollout(seed=12).load_state_dict(a.state_dict())


def test_hf_greedy_equals_a_hand_argmax_loop_and_its_logprobs_are_the_trainers(student, prompts):
    n = 8
    rows = HFRollout(seed=0, temperature=0.0, max_new_tokens=n).generate(student, prompts)
    eos = student.config.eos_token_id
    student.eval()
    for p, r in zip(prompts, rows):
        ids, want, want_lp = list(p), [], []
        with torch.no_grad():
            for _ in range(n):  # argmax decoding, one unpadded prompt, full forward each step, no cache
                logits = student(torch.tensor([ids])).logits[0, -1]
                x = int(torch.argmax(logits))
                want.append(x)
                want_lp.append(float(torch.log_softmax(logits, -1)[x]))
                ids.append(x)
                if x == eos:
                    break
        assert r.prompt_ids == list(p)
        assert r.completion_ids == want
        assert r.logprobs == pytest.approx(want_lp, abs=1e-4)
    # the engine is current: the trainer's forward pass gives the same log-probabilities, so w_t = 1
    for r in HFRollout(seed=4, max_new_tokens=8).generate(student, prompts):
        full = torch.tensor([r.prompt_ids + r.completion_ids])
        with torch.no_grad():
            trainer = token_logprobs(student(full[:, :-1]).logits, full[:, 1:])[0, len(r.prompt_ids) - 1:]
        w = importance_weight(trainer, torch.tensor(r.logprobs))
        torch.testing.assert_close(w, torch.ones_like(w), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# rollout -> grade -> train batch (ddk.trainer.onpolicy) against the quick kit's teacher service

@pytest.mark.slow
def test_rollout_grade_train_batch_against_the_teacher(kit, student, prompts, teacher_url):
    from transformers import AutoModelForCausalLM

    from ddk.teacher.client import TeacherClient
    from ddk.trainer.config import KDSection
    from ddk.trainer.onpolicy import grade, onpolicy_loss, rollout, step_record, train_batch

    got = rollout(HFRollout(seed=3, max_new_tokens=6), student, prompts)
    rows = got.rollouts
    assert got.seconds > 0 and len(rows) == 4
    with TeacherClient(teacher_url) as teacher:
        graded = grade(teacher, rows, top_k=8)
    batch = train_batch(rows, graded, pad_id=0)
    ref_teacher = AutoModelForCausalLM.from_pretrained(kit / "teacher", dtype=torch.float32).eval()
    width = max(len(r.prompt_ids) + len(r.completion_ids) for r in rows) - 1
    assert batch.input_ids.shape == batch.labels.shape == (4, width)
    assert batch.teacher_ids.shape == batch.teacher_logprobs.shape == (4, width, 8)
    for b, r in enumerate(rows):
        s, P, n = r.prompt_ids + r.completion_ids, len(r.prompt_ids), len(r.completion_ids)
        # by hand: position t reads s[t] and predicts s[t + 1]; labels only where s[t + 1] is a completion token
        want_ids = s[:-1] + [0] * (width - (len(s) - 1))
        want_labels = [s[t + 1] if P <= t + 1 < len(s) else -100 for t in range(width)]
        assert batch.input_ids[b].tolist() == want_ids
        assert batch.labels[b].tolist() == want_labels
        assert batch.labels[b, P - 1:P - 1 + n].tolist() == r.completion_ids
        with torch.no_grad():  # the teacher's log-probability of each student token, from its own forward pass
            lp = torch.log_softmax(ref_teacher(torch.tensor([s])).logits[0].float(), -1)
        for i, x in enumerate(r.completion_ids):
            t = P - 1 + i
            assert float(batch.teacher_token_logprobs[b, t]) == pytest.approx(float(lp[t, x]), abs=1e-2)
            assert int(batch.teacher_ids[b, t, 0]) == int(torch.argmax(lp[t]))
        assert float(batch.teacher_token_logprobs[b, :P - 1].abs().sum()) == 0.0
    assert batch.engine_logprobs is None  # the hf engine is current: w_t = 1
    kd = KDSection()
    for name in ("gkd", "sampled_reverse_kl"):
        student.zero_grad()
        logits = student(batch.input_ids).logits
        loss, parts = onpolicy_loss(logits, batch, name, kd)
        loss.backward()
        assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
        if name == "sampled_reverse_kl":
            assert float(parts["weight"]) == pytest.approx(1.0) and float(parts["clipped"]) == 0.0
    student.zero_grad()
    rec = step_record(rows, ["a", "a", "b", "b"], got.seconds, graded.seconds, version_lag=0)
    lens = [len(r.completion_ids) for r in rows]
    assert rec["rollout_tokens"] == sum(lens)
    assert rec["completion_len"] == {"a": (lens[0] + lens[1]) / 2, "b": (lens[2] + lens[3]) / 2}
    assert rec["rollout_tokens_per_s"] == pytest.approx(sum(lens) / got.seconds)


def test_prompt_of_drops_the_last_assistant_turn():
    from ddk.trainer.onpolicy import prompt_of

    ids = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    mask = [0, 0, 1, 1, 0, 0, 1, 1, 0]  # two assistant turns, then a trailing unlabelled token
    assert prompt_of(ids, [bool(m) for m in mask]) == [1, 2, 3, 4, 5, 6]
    assert prompt_of(ids[:4], [False, False, True, True]) == [1, 2]
    assert prompt_of([1, 2], [False, False]) == []


# ---------------------------------------------------------------------------------------------------------
# the config and the launch checks (exit 2 naming the key, before Ray)

def _train(kit, tmp_path, *sets: str) -> tuple[int, str]:
    import contextlib
    import io

    from ddk.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["train", str(kit / "train.yaml"), "--set", f"output_dir={tmp_path / 'run'}",
                   *[x for s in sets for x in ("--set", s)]])
    return rc, err.getvalue().strip()


@pytest.mark.parametrize("sets, key", [
    (["kd.on_policy=1.5"], "kd.on_policy: must be less than or equal to 1"),
    (["kd.on_policy=-0.1"], "kd.on_policy: must be greater than or equal to 0"),
    (["rollout.sync_every=0"], "rollout.sync_every: must be greater than or equal to 1"),
    (["rollout.engine=sglang"], "rollout.engine: must be 'hf' or 'vllm'"),
    (["rollout.max_new_tokens=0"], "rollout.max_new_tokens: must be greater than 0"),
    (["rollout.top_p=0"], "rollout.top_p: must be greater than 0"),
    (["rollout.lose=gkd"], "rollout.lose: unknown key"),
    (["kd.on_policy=0.5", "kd.gamma=0", "mixture.policy=fixed"], "kd.on_policy: needs kd.gamma > 0"),
    (["kd.on_policy=0.5", "train.strategy=fsdp"], "kd.on_policy: not with train.strategy fsdp"),
    (["kd.on_policy=0.5", "teacher.urls=[]", "mixture.policy=fixed", "cache.dir=/tmp"],
     "kd.on_policy: needs teacher.urls"),
])
def test_bad_on_policy_config_exits_2_naming_the_key(kit, tmp_path, capsys, sets, key):
    rc, err = _train(kit, tmp_path, *sets)
    err = err or capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and key in err, err


def test_on_policy_without_conversation_domains_exits_2_before_ray(kit, tmp_path, capsys):
    import ray

    rc, err = _train(kit, tmp_path, "kd.on_policy=0.5", "teacher.urls=http://127.0.0.1:9")
    err = err or capsys.readouterr().err.strip()
    assert rc == 2 and "kd.on_policy: 0.5 needs a conversation domain" in err, err
    assert "code" in err and "math" in err  # the kit's plain-text domains, named
    assert not ray.is_initialized()


@pytest.mark.slow
def test_on_policy_prompts_plus_new_tokens_beyond_the_teachers_max_seq_len_exit_2(kit, tmp_path, capsys,
                                                                                 teacher_url):
    import json

    import httpx

    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                                    {"role": "assistant", "content": f"hello {i}"}]}) + "\n"
                            for i in range(20)))
    max_seq_len = httpx.get(f"{teacher_url}/v1/info").json()["max_seq_len"]
    over = max_seq_len - 64 + 1  # data.seq_len 64 + this = one more than the teacher takes
    rc, err = _train(kit, tmp_path, "kd.on_policy=1", f"teacher.urls={teacher_url}", "mixture.policy=fixed",
                     "data.file=null", "data.seq_len=64", f"data.domains=[{{name: chat, files: [{chat}]}}]",
                     f"rollout.max_new_tokens={over}")
    err = err or capsys.readouterr().err.strip()
    assert rc == 2 and f"rollout.max_new_tokens: {over} new tokens" in err, err
    assert str(max_seq_len) in err
    from types import SimpleNamespace

    from ddk.trainer.onpolicy import check_rollout_length

    cfg = SimpleNamespace(kd=SimpleNamespace(on_policy=1.0), data=SimpleNamespace(seq_len=64),
                          rollout=SimpleNamespace(max_new_tokens=over - 1))
    check_rollout_length(cfg, max_seq_len)  # exactly fits: no error


def test_prompt_domains_are_the_conversation_domains(tmp_path):
    import json

    from ddk.data.domains import DomainSpec
    from ddk.trainer.onpolicy import prompt_domains

    (tmp_path / "chat.jsonl").write_text(json.dumps({"prompt": "2+2?", "completion": "4"}) + "\n")
    (tmp_path / "text.jsonl").write_text(json.dumps({"text": "plain"}) + "\n")
    specs = [DomainSpec("text", [str(tmp_path / "text.jsonl")]), DomainSpec("qa", [str(tmp_path / "chat.jsonl")]),
             DomainSpec("gone", [str(tmp_path / "missing.jsonl")])]
    assert prompt_domains(specs) == ["qa"]


# ---------------------------------------------------------------------------------------------------------
# the loop hook: in-process runs (one rank, LocalContext) on a text domain and a conversation domain

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                 "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}")


def test_the_step_loss_is_the_mean_over_dataset_and_rollout_tokens():
    from ddk.trainer.loop import step_objective

    # N = 3 dataset tokens at 1.5, M = 1 rollout token whose gamma x term sums to 2.0: (3 x 1.5 + 2.0) / 4
    assert step_objective(1.5, 3, 1, 2.0) == pytest.approx(1.625)
    assert step_objective(0.0, 0, 4, 2.0) == pytest.approx(0.5)  # every row a rollout: their mean alone
    assert step_objective(1.5, 3, 0, 0.0) == 1.5                  # no rollout: the dataset loss


def _rollouts(lengths, finished):
    from ddk.trainer.rollout import Rollout

    return [Rollout(f"r{i}", [1, 2], list(range(3, 3 + n)), [-0.5] * n, f) for i, (n, f) in
            enumerate(zip(lengths, finished))]


def test_one_ranks_record_over_the_workers_is_its_own_record_exactly():
    from ddk.trainer.onpolicy import combine_records, record_vector, step_record

    # what a rank's OnPolicyStep.backward built before 2026-12-07 (rank 0's record), written out by hand
    rows, names = _rollouts([3, 5, 2], [True, False, True]), ["sort", "add", "sort"]
    own = {"dataset_tokens": 41, "rollout_tokens": 0, "rows": 3}
    own.update({**step_record(rows, names, 0.7, 0.3, version_lag=1), "training_s": 0.2, "loss": 0.1,
                "kl": 0.1, "weight": 0.97, "clipped": 0.1})
    assert own["completion_len"] == {"add": 5.0, "sort": 2.5} and own["finished"] == 2 / 3  # hand: (3 + 2) / 2
    own["rollout_ids"] = ["7-0-4-0", "7-0-4-1", "7-0-4-2"]  # seed 7, rank 0, call 4, rows 0..2
    domains = ["add", "reverse", "sort"]
    got = combine_records([record_vector(own, names, domains, call=4)], domains, seed=7)
    assert got == own and list(got) == list(own)  # equal values (==, not approx) in the same order
    # a rank other than 0 alone (world 1 is rank 0, but the ids carry the rank they are given)
    assert combine_records([record_vector(own, names, domains, 4)], domains, 7, first_rank=2)["rollout_ids"] == [
        "7-2-4-0", "7-2-4-1", "7-2-4-2"]
    # a step without rollouts: the counts and no ids, as before
    none = {"dataset_tokens": 50, "rollout_tokens": 0, "rows": 0}
    assert combine_records([record_vector(none, [], domains, -1)], domains, 7) == {**none, "rollout_ids": []}


def test_the_record_over_two_workers_sums_tokens_and_lengths_and_takes_the_slowest_times():
    from ddk.trainer.onpolicy import combine_records, record_vector, step_record

    domains = ["add", "sort"]
    r0 = {"dataset_tokens": 40, "rollout_tokens": 0, "rows": 2}
    r0.update({**step_record(_rollouts([4, 6], [True, True]), ["add", "sort"], 2.0, 0.5, 0), "training_s": 0.3,
               "loss": 1.0, "kl": 2.0})
    r1 = {"dataset_tokens": 30, "rollout_tokens": 0, "rows": 3}
    r1.update({**step_record(_rollouts([2, 8, 10], [False, True, False]), ["sort", "sort", "sort"], 1.0, 0.9, 0),
               "training_s": 0.1, "loss": 4.0, "kl": 1.0})
    v = [record_vector(r0, ["add", "sort"], domains, 3), record_vector(r1, ["sort"] * 3, domains, 5)]
    got = combine_records(v, domains, seed=0)
    # by hand: 10 + 20 = 30 tokens over the slower generation (2.0 s); sort's lengths 6, 2, 8, 10 over 4 rows;
    # the loss the mean over all 30 completion tokens: (10 x 1.0 + 20 x 4.0) / 30 = 3.0, kl (10 x 2 + 20 x 1) / 30
    assert {k: got[k] for k in ("dataset_tokens", "rollout_tokens", "rows", "version_lag")} == {
        "dataset_tokens": 70, "rollout_tokens": 30, "rows": 5, "version_lag": 0}
    assert (got["generation_s"], got["grading_s"], got["training_s"]) == (2.0, 0.9, 0.3)
    assert got["rollout_tokens_per_s"] == 15.0 and got["finished"] == 3 / 5
    assert got["completion_len"] == {"add": 4.0, "sort": 6.5}
    assert got["loss"] == pytest.approx(3.0) and got["kl"] == pytest.approx(40 / 30)
    assert "weight" not in got  # gkd: no importance weight on any rank
    assert got["rollout_ids"] == ["0-0-3-0", "0-0-3-1", "0-1-5-0", "0-1-5-1", "0-1-5-2"]
    # rank 0 without rollouts this step: the record is rank 1's numbers (before: rank 0's, without timings)
    empty = {"dataset_tokens": 60, "rollout_tokens": 0, "rows": 0}
    got = combine_records([record_vector(empty, [], domains, -1), v[1]], domains, seed=0)
    assert got["rows"] == 3 and got["dataset_tokens"] == 90 and got["rollout_tokens"] == 20
    assert (got["generation_s"], got["loss"], got["kl"]) == (1.0, 4.0, 1.0)
    assert got["completion_len"] == {"sort": 20 / 3} and got["rollout_ids"] == ["0-1-5-0", "0-1-5-1", "0-1-5-2"]


def test_pick_rows_takes_the_share_from_conversation_rows_in_order():
    from ddk.trainer.onpolicy import pick_rows

    step = [["code", "qa", "qa", "code"], ["qa", "code", "qa", "qa"]]  # 8 rows, 5 of them conversations
    assert pick_rows(step, {"qa"}, 0.0) == []
    assert pick_rows(step, {"qa"}, 0.25) == [(0, 1), (0, 2)]  # round(0.25 x 8) = 2
    assert pick_rows(step, {"qa"}, 0.5) == [(0, 1), (0, 2), (1, 0), (1, 2)]
    assert pick_rows(step, {"qa"}, 1.0) == [(0, 1), (0, 2), (1, 0), (1, 2), (1, 3)]  # only 5 can be rollouts


@pytest.fixture(scope="module")
def chat_run_setup(kit, tmp_path_factory):
    import json
    import shutil

    import yaml

    root = tmp_path_factory.mktemp("onpolicy-loop")
    student = root / "student"
    shutil.copytree(kit / "student", student)
    (student / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    qs = ["def add(a, b):", "what is two plus three", "name a prime", "sort 3 1 2"]

    def conv(i):
        return {"messages": [{"role": "user", "content": f"{qs[i % 4]} ({i})"},
                             {"role": "assistant", "content": f"answer {i}: {i % 7}"}]}

    (root / "qa.jsonl").write_text("".join(json.dumps(conv(i)) + "\n" for i in range(40)))
    (root / "qa-val.jsonl").write_text("".join(json.dumps(conv(100 + i)) + "\n" for i in range(3)))
    (root / "data.yaml").write_text(yaml.safe_dump({"domains": [
        {"name": "code", "files": [str(kit / "data/code/train.jsonl")],
         "val_files": [str(kit / "data/code/val.jsonl")]},
        {"name": "qa", "files": [str(root / "qa.jsonl")], "val_files": [str(root / "qa-val.jsonl")]}]}))
    return root


def _run(kit, root, teacher_url, name, *sets, fault_at: list[int] | None = None):
    from ddk.trainer.config import load_config
    from ddk.trainer.launch import prepare
    from ddk.trainer.loop import LocalContext, Trainer

    out = root / name
    cfg = load_config(kit / "train.yaml", [
        f"run_id={name}", f"output_dir={out}", f"teacher.urls=[{teacher_url}]", "controller.url=null",
        "mixture.policy=fixed", f"student.model={root / 'student'}", f"data.file={root / 'data.yaml'}",
        "data.seq_len=32", f"data.cache_dir={root / 'cache'}", "train.steps=3", "train.batch_size=4",
        "mixture.interval_steps=3", "checkpoint.every_steps=3", "eval.sequences_per_domain=2", *sets])
    job = prepare(cfg)
    job.fault_at_steps = list(fault_at or [])
    Trainer(job, LocalContext(cfg.output_dir)).fit()
    import json

    return out, [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.mark.slow
def test_loop_on_policy_zero_is_todays_run_and_on_policy_rows_train(kit, teacher_url, controller_url,
                                                                     chat_run_setup):
    root = chat_run_setup
    _, base = _run(kit, root, teacher_url, "base")
    # kd.on_policy 0 with every other rollout key changed: the same losses, bit for bit, and no on-policy record
    _, zero = _run(kit, root, teacher_url, "zero", "kd.on_policy=0", "rollout.engine=vllm", "rollout.temperature=0.3",
                   "rollout.loss=sampled_reverse_kl", "rollout.seed=9")
    steps = [[(r["loss"], r["ce"], r["kl"]) for r in rs if r["event"] == "step"] for rs in (base, zero)]
    assert len(steps[0]) == 3 and steps[0] == steps[1]
    assert not any("onpolicy" in r for r in zero)
    # half the rows are rollouts (conversation rows only): graded, trained, logged, the engine's counter saved,
    # reported to the controller (the session's real one)
    out, half = _run(kit, root, teacher_url, "half", "kd.on_policy=0.5", "rollout.max_new_tokens=8",
                     f"controller.url={controller_url}", "run_id=onpolicy-half")
    import yaml

    gamma = yaml.safe_load((kit / "train.yaml").read_text())["kd"]["gamma"]
    recs = [r for r in half if r["event"] == "step"]
    assert len(recs) == 3
    for r in recs:
        o = r["onpolicy"]
        assert o["rows"] >= 1
        assert set(o["completion_len"]) == {"qa"} and 1 <= o["completion_len"]["qa"] <= 8
        assert o["generation_s"] > 0 and o["grading_s"] > 0 and o["training_s"] > 0 and o["version_lag"] == 0
        assert o["rollout_tokens"] >= o["rows"] and math.isfinite(o["loss"]) and math.isfinite(r["loss"])
        # one worker: the record over the workers is its own (combine_records), numbers as step_record makes them
        assert o["rollout_tokens_per_s"] == o["rollout_tokens"] / o["generation_s"]
        assert o["rollout_ids"] == [f"0-0-{r['step'] - 1}-{i}" for i in range(o["rows"])]
        assert r["rows"]["qa"] >= o["rows"]  # the rollouts are some of the step's conversation rows
        # the step's loss is what its gradient is the gradient of: the mean over its N dataset tokens (CE + gamma
        # KL) and M rollout tokens (gamma x the on-policy term), written out here from the record's own parts
        n, m = o["dataset_tokens"], o["rollout_tokens"]
        want = (n * (r["ce"] + gamma * r["kl"]) + gamma * m * o["loss"]) / (n + m)
        assert r["loss"] == pytest.approx(want, rel=1e-5)
    assert [x[0] for x in steps[0]] != [r["loss"] for r in recs]  # the step's dataset loss lost those rows
    # the controller's page gets the last step's on-policy numbers with its progress: metrics.jsonl's, as logged
    from ddk.controller.client import ControllerClient

    with ControllerClient(controller_url) as c:
        latest = c.get_progress("onpolicy-half")["latest"]
    o = recs[-1]["onpolicy"]
    assert latest["step"] == 3 and latest["onpolicy"] == {
        k: o[k] for k in ("generation_s", "grading_s", "training_s", "rollout_tokens_per_s", "version_lag",
                          "completion_len")}
    from ddk.trainer import checkpoint as ckpt

    folders = sorted((out / "checkpoints").glob("step-*"))  # LocalContext's checkpoints
    assert folders
    _, own = ckpt.load_checkpoint(folders[-1], rank=0)
    assert own["entries"]["rollout"] == {"seed": 0, "step": 3}  # three rollout calls, seed = the run's seed
    # the same run stopped after step 2 and resumed: step 3 repeats, its rollouts (the same ids and tokens) and its
    # losses. To float32 rounding, not bit for bit: the teacher server batches concurrent requests (here the grading
    # and the feed's next block), and a sequence scored beside a longer one, padded, gets logprobs that differ in the
    # last bits (~1e-6, measured); which requests meet in a batch depends on timing. Other rollouts would move the
    # losses by orders of magnitude more.
    from ddk.trainer.loop import InjectedFault

    sets = ("kd.on_policy=0.5", "rollout.max_new_tokens=8", "checkpoint.every_steps=1")
    with pytest.raises(InjectedFault):
        _run(kit, root, teacher_url, "crash", *sets, fault_at=[2])
    _, resumed = _run(kit, root, teacher_url, "crash", *sets)
    again = [r for r in resumed if r["event"] == "step"]
    assert [r["step"] for r in again] == [1, 2, 3]  # the first attempt's lines up to its checkpoint, then step 3
    assert again[2]["onpolicy"]["rollout_ids"] == recs[2]["onpolicy"]["rollout_ids"]
    assert again[2]["onpolicy"]["rollout_tokens"] == recs[2]["onpolicy"]["rollout_tokens"]
    assert again[2]["loss"] == pytest.approx(recs[2]["loss"], rel=1e-6)
    assert again[2]["onpolicy"]["loss"] == pytest.approx(recs[2]["onpolicy"]["loss"], rel=1e-6, abs=1e-7)
