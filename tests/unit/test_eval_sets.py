"""Evaluation sets and error bars (ddk.data.evalset, ddk.trainer.evaluate's sets): the sample, the halves, the
grouped standard error against a numpy reference written here, and the misranking corpus of issue 24."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from ddk.data.evalset import choose_windows, log_ratio_se, per_document, steering_half
from ddk.trainer.evaluate import (EvalSet, block_sums, evaluation_set, sets_fingerprint, summarize,
                                  teacher_answers)


# ---------------------------------------------------------------------------------------------------------
# the sample

def test_windows_one_per_document_before_any_second():
    lengths = np.array([100, 30, 500, 9, 64, 64])
    keys = np.arange(1, 7, dtype=np.uint64) * 7919
    w = choose_windows(lengths, keys, block_len=32, max_blocks=6)
    assert sorted(x.doc for x in w) == [0, 1, 2, 3, 4, 5]  # six documents, one window each
    for x in w:
        assert x.length == min(32, lengths[x.doc])  # a short document scored whole
        assert x.start % 32 == 0 and x.start + x.length <= lengths[x.doc]
    more = choose_windows(lengths, keys, block_len=32, max_blocks=10)
    assert more[:6] == w  # the budget extends the set, never reshuffles it
    seconds = [x.doc for x in more[6:]]
    assert len(set(seconds)) == 4 and set(seconds) <= {0, 2, 4, 5}  # documents with a second slot


def test_windows_every_slot_without_budget_and_no_overlap():
    lengths = np.array([100, 96, 10])
    w = choose_windows(lengths, np.array([5, 6, 7], dtype=np.uint64), block_len=32)
    by_doc = {}
    for x in w:
        by_doc.setdefault(x.doc, []).append(x.start)
    assert sorted(by_doc[0]) == [0, 32, 64] and sorted(by_doc[1]) == [0, 32, 64] and by_doc[2] == [0]


def test_windows_token_budget_counts_predictions():
    lengths = np.full(50, 40)
    w = choose_windows(lengths, np.arange(50, dtype=np.uint64), block_len=17, max_predictions=100)
    assert len(w) == 7  # 16 predictions each: 6 give 96 < 100, the 7th reaches 112


def test_windows_do_not_depend_on_document_order_and_change_with_seed():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 300, 40)
    keys = rng.integers(0, 2**63, 40).astype(np.uint64)
    w = choose_windows(lengths, keys, 32, max_blocks=10, seed=3)
    perm = rng.permutation(40)
    wp = choose_windows(lengths[perm], keys[perm], 32, max_blocks=10, seed=3)
    assert {(int(keys[x.doc]), x.start) for x in w} == {(int(keys[perm][x.doc]), x.start) for x in wp}
    assert [x.doc for x in choose_windows(lengths, keys, 32, max_blocks=10, seed=4)] != [x.doc for x in w]


def test_halves_split_documents_without_overlap():
    keys = np.arange(1000, dtype=np.uint64) * 2654435761
    steer = steering_half(keys)
    assert 400 < steer.sum() < 600
    lengths = np.full(1000, 64)
    a = {x.doc for x in choose_windows(lengths, keys, 32, max_blocks=200, allowed=steer)}
    b = {x.doc for x in choose_windows(lengths, keys, 32, max_blocks=200, allowed=~steer)}
    assert a and b and not (a & b) and all(steer[d] for d in a)


# ---------------------------------------------------------------------------------------------------------
# the standard error: numpy reference of the grouped delta method (docs/architecture.md)

def reference_se(s, t, n):
    s, t, n = map(np.asarray, (s, t, n))
    m = len(n)
    d = s - t
    r = d.sum() / n.sum()
    var = (m / (m - 1)) * np.sum((d - r * n) ** 2) / n.sum() ** 2  # (1/m nbar^2) * sum e^2/(m-1), nbar = sum n / m
    return math.sqrt(var)


def test_se_against_reference():
    rng = np.random.default_rng(1)
    n = rng.integers(10, 200, 12).astype(float)
    s = n * rng.uniform(2.0, 4.0, 12)
    t = n * rng.uniform(1.0, 2.0, 12)
    assert log_ratio_se(s, t, n) == pytest.approx(reference_se(s, t, n), rel=1e-12)
    # by hand: two documents, d = (3, 1), n = (1, 1): R = 2, e = (1, -1), SE = sqrt(2 * 2) / 2 = 1
    assert log_ratio_se([5.0, 2.0], [2.0, 1.0], [1, 1]) == pytest.approx(1.0)


def test_se_one_document_is_none_and_identical_documents_zero():
    assert log_ratio_se([3.0], [1.0], [10]) is None
    assert log_ratio_se([3.0] * 5, [1.0] * 5, [10] * 5) == pytest.approx(0.0, abs=1e-15)


def test_per_document_groups_blocks():
    s, n = per_document(np.array([7, 3, 7, 9]), np.array([1.0, 2.0, 3.0, 4.0]), np.array([1, 1, 1, 1]))
    assert s.tolist() == [2.0, 4.0, 4.0] and n.tolist() == [1.0, 2.0, 1.0]


# ---------------------------------------------------------------------------------------------------------
# evaluation sets from a domain, scored by a model; the misranking corpus

EASY, HARD, EOS, V = 1, 2, 0, 8


class TokenLoss(torch.nn.Module):
    """A 'model' whose next-token loss depends only on the current token: after an easy token it predicts the
    easy token with probability 0.9; after a hard token every token is equally likely. Logits are the output
    projection of the hidden states (so the chunked path is taken)."""

    def __init__(self, easy_p: float = 0.9):
        super().__init__()
        table = torch.full((V, V), 0.0)
        table[EASY] = math.log((1 - easy_p) / (V - 1))
        table[EASY, EASY] = math.log(easy_p)
        self.embed = torch.nn.Embedding(V, V)
        self.embed.weight.data = table
        self.head = torch.nn.Linear(V, V, bias=False)
        self.head.weight.data = torch.eye(V)

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, use_cache=False, output_hidden_states=False, logits_to_keep=0, **_):
        h = self.embed(input_ids)

        @dataclass
        class Out:
            logits: torch.Tensor
            hidden_states: tuple

        logits = self.head(h)
        return Out(logits[:, -logits_to_keep:] if logits_to_keep else logits, (h,))


@dataclass
class _TeacherOut:
    ids: torch.Tensor
    logprobs: torch.Tensor
    target_logprob: torch.Tensor


class UniformTeacher:
    """Every next token has probability 1/V (the top-k: tokens 0..k-1)."""

    def __init__(self):
        self.asked = 0

    def topk(self, input_ids, top_k):
        ids = torch.as_tensor(input_ids)
        self.asked += len(ids)
        B, L = ids.shape
        lp = torch.full((B, L - 1, top_k), -math.log(V))
        return _TeacherOut(torch.arange(top_k).expand(B, L - 1, top_k).clone(), lp,
                           torch.full((B, L - 1), -math.log(V)))


class Blocks(np.ndarray):
    """The packed validation blocks with the stream's tail, as the cache's TokenBlocks reads them."""

    def tokens(self, a, b):
        return self.stream[a:b]


@dataclass
class Domain:
    val: np.ndarray
    val_docs: dict
    info: dict


def make_domain(docs: list[list[int]], block_len: int) -> Domain:
    stream = np.concatenate([np.array(d + [EOS]) for d in docs])
    n = len(stream) // block_len
    keys = np.array([hash(tuple(d)) & (2**63 - 1) for d in docs], dtype=np.uint64)
    val = stream[: n * block_len].reshape(n, block_len).view(Blocks)
    val.stream = stream
    return Domain(val, {"lengths": np.array([len(d) + 1 for d in docs]), "keys": keys}, {"eos": EOS})


def test_evaluation_set_windows_are_whole_document_tokens():
    docs = [[3] * 50, [4] * 5, [5] * 70, [6] * 20]
    dom = make_domain(docs, 17)
    es = evaluation_set(dom, sequences=10)
    for block, length, d in zip(es.blocks, es.lengths, es.docs):
        doc = docs[d] + [EOS]
        assert set(block[:length].tolist()) <= set(doc)  # one document's tokens only
        assert (block[length:] == EOS).all()  # padding
    assert es.documents == 4 and es.predictions == int(np.sum(es.lengths - 1))
    again = evaluation_set(dom, sequences=10)
    assert sets_fingerprint({"a": es}) == sets_fingerprint({"a": again})
    dom2 = make_domain(docs[:3] + [[6] * 21], 17)  # a changed validation file
    assert sets_fingerprint({"a": evaluation_set(dom2, sequences=10)}) != sets_fingerprint({"a": es})


def test_block_sums_mask_padding():
    model = TokenLoss()
    docs = [[EASY] * 5, [EASY] * 40]
    es = evaluation_set(make_domain(docs, 17), sequences=4)
    sums = block_sums(model, es, batch_size=3)
    easy_nll, eos_nll = -math.log(0.9), -math.log(0.1 / 7)
    for i, (length, d) in enumerate(zip(es.lengths, es.docs)):
        block = es.blocks[i, :length]
        expected = sum(easy_nll if b == EASY and a == EASY else eos_nll if a == EASY else math.log(V)
                       for a, b in zip(block[:-1], block[1:]))
        assert sums["count"][i] == length - 1
        assert sums["ce"][i] == pytest.approx(expected, rel=1e-5)


def test_misranking_corpus_old_selection_misranks_new_one_does_not():
    """Two domains mixing easy and hard documents; each validation file starts with its easy ones. 'a' is
    mostly hard (80 %), 'b' mostly easy (20 % hard); on the whole validation set 'a' has the larger gap. The
    first blocks of the packed stream (the old selection) see only easy documents of 'a' and a hard start of 'b'
    and rank them the other way; the new set ranks them as the whole set does, within its standard errors."""
    rng = np.random.default_rng(0)
    L = 33

    def docs(n_easy, n_hard, lead_hard=0):
        easy = [[EASY] * int(rng.integers(40, 90)) for _ in range(n_easy)]
        hard = [[HARD] + rng.integers(3, V, int(rng.integers(40, 90))).tolist() for _ in range(n_hard)]
        return hard[:lead_hard] + easy + hard[lead_hard:]

    domains = {"a": make_domain(docs(10, 40), L), "b": make_domain(docs(40, 10, lead_hard=10), L)}
    model, teacher = TokenLoss(), UniformTeacher()

    def ratio_log(es):
        t = teacher_answers(teacher, es, 1, 8, keep_topk=False)
        r = summarize(es, block_sums(model, es, 8), t.nll)
        return r.loss - r.teacher_loss, r.se

    full = {n: ratio_log(evaluation_set(d, sequences=None)) for n, d in domains.items()}
    old = {n: ratio_log(EvalSet(np.asarray(d.val[:6], np.int64), np.full(6, L), np.arange(6)))
           for n, d in domains.items()}
    new = {n: ratio_log(evaluation_set(d, sequences=24, seed=0)) for n, d in domains.items()}
    assert full["a"][0] > full["b"][0]  # the truth: 'a' lags more
    assert old["a"][0] < old["b"][0]  # the old selection misranks
    assert new["a"][0] > new["b"][0]  # the new one does not
    for n in domains:  # and each new estimate is within 3 of its standard errors of the whole set's
        assert new[n][1] is not None and new[n][1] > 0
        assert abs(new[n][0] - full[n][0]) <= 3 * new[n][1]


# ---------------------------------------------------------------------------------------------------------
# the trainer's Evaluator: teacher asked once per block, ranks' shards add up, the run's record

def _cfg(**eval_kw):
    from types import SimpleNamespace

    ev = dict(sequences_per_domain=6, batch_size=4, tokens_per_domain=None, seed=0, documents="all")
    ev.update(eval_kw)
    return SimpleNamespace(eval=SimpleNamespace(**ev),
                           kd=SimpleNamespace(gamma=0.5, top_k=3, temperature=1.0, loss="forward_kl", beta=0.5,
                                              skew=0.1, chunk_tokens=None))


def _domains():
    rng = np.random.default_rng(3)
    return {"a": make_domain([[EASY] * int(rng.integers(5, 60)) for _ in range(9)], 17),
            "b": make_domain([[HARD] + rng.integers(3, V, 40).tolist() for _ in range(4)], 17)}


def test_evaluator_asks_the_teacher_once_and_shards_add_up():
    from ddk.trainer.evaluate import Evaluator

    model, domains = TokenLoss(), _domains()
    teacher = UniformTeacher()
    whole = Evaluator(_cfg(), domains, 0, 1, "cpu", "fp32", True, teacher)
    first = whole.evaluate(model)
    n_blocks = sum(len(s) for s in whole.sets.values())
    assert teacher.asked == n_blocks
    again = whole.evaluate(model)
    assert teacher.asked == n_blocks  # once per block for the run, not per evaluation
    assert again.student_loss == first.student_loss
    assert set(first.log_ratio_se) == {"a", "b"} and first.diagnostics["a"]["topk_mass"] == pytest.approx(3 / V)
    assert first.teacher_loss["a"] == pytest.approx(math.log(V))  # the uniform teacher's loss

    got = {}
    r1 = Evaluator(_cfg(), domains, 1, 2, "cpu", "fp32", True, UniformTeacher(),
                   all_reduce=lambda v: got.setdefault("r1", v))
    r1.evaluate(model)
    r0 = Evaluator(_cfg(), domains, 0, 2, "cpu", "fp32", True, UniformTeacher(),
                   all_reduce=lambda v: [x + y for x, y in zip(v, got["r1"])])
    split = r0.evaluate(model)
    for n in domains:
        assert split.student_loss[n] == pytest.approx(first.student_loss[n], rel=1e-9)
        assert split.log_ratio_se[n] == pytest.approx(first.log_ratio_se[n], rel=1e-9)


def test_resumed_run_warns_when_the_evaluation_set_changed(tmp_path, caplog):
    from types import SimpleNamespace

    from ddk.trainer.evaluate import Evaluator
    from ddk.trainer.loop import Trainer

    trainer = SimpleNamespace(out_dir=tmp_path, state=SimpleNamespace(step=8))
    rec = Evaluator(_cfg(), _domains(), 0, 1, "cpu", "fp32", True).record()
    assert rec["domains"]["b"]["documents"] == 4
    with caplog.at_level("WARNING"):
        Trainer._record_eval_set(trainer, rec)
        Trainer._record_eval_set(trainer, rec)  # a resume on the same data: silent
        assert "evaluation set changed" not in caplog.text
        changed = Evaluator(_cfg(), {**_domains(), "b": make_domain([[HARD, 5, 6]] * 3, 17)}, 0, 1, "cpu",
                            "fp32", True).record()
        Trainer._record_eval_set(trainer, changed)
    assert "evaluation set changed" in caplog.text and rec["fingerprint"] in caplog.text


# ---------------------------------------------------------------------------------------------------------
# the token cache keeps the validation documents' boundaries (format 3)

def _tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.mark.parametrize("with_val_file", [False, True])
def test_cache_keeps_validation_documents(tmp_path, with_val_file):
    import json
    import random

    from ddk.data.cache import prepare_domains
    from ddk.data.domains import DomainSpec

    rng = random.Random(0)
    docs = [" ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(rng.randint(3, 60)))
            for _ in range(120)]
    tok = _tokenizer(docs)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:100]))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[100:]))
    spec = DomainSpec("a", [str(tmp_path / "train.jsonl")], [str(tmp_path / "val.jsonl")] if with_val_file else [],
                      val_fraction=0.2)
    dom = prepare_domains([spec], tok, 16, tmp_path / "cache", workers=1)["a"]
    assert dom.info["format"] >= 3  # 3 added the validation document table
    lengths = dom.val_docs["lengths"]
    assert int(lengths.sum()) == dom.info["val"]["tokens"] and len(lengths) == dom.info["val"]["documents"]
    by_ids = {tuple(tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]): t for t in docs}
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    texts = [by_ids[tuple(dom.val.tokens(int(a), int(a + n)).tolist())] for a, n in zip(starts, lengths)]
    if with_val_file:  # the val file's documents, in file order
        assert texts == docs[100:]
    else:  # held-out documents of the training file
        assert set(texts) <= set(docs[:100]) and len(set(texts)) == len(texts)
    es = evaluation_set(dom, sequences=8)  # whole-document windows from the cache
    assert es.documents == 8 and all(es.lengths <= 17)
    reopened = prepare_domains([spec], tok, 16, tmp_path / "cache", workers=1)["a"]
    assert (reopened.val_docs["keys"] == dom.val_docs["keys"]).all()  # the same set after a reopen (resume)


def test_token_budget_replaces_the_window_count():
    docs = [[3] * 50, [4] * 5, [5] * 70, [6] * 20, [7] * 33]
    dom = make_domain(docs, 17)
    es = evaluation_set(dom, sequences=2, tokens=40)  # tokens_per_domain wins over sequences_per_domain
    assert es.predictions >= 40 and es.predictions - (es.lengths[-1] - 1) < 40
    assert len(es) > 2
