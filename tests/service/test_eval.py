"""Evaluation: per-domain losses against transformers' own loss (the chunked loss from the hidden states), teacher
losses from target_logprob (asked once per block), standard errors, `ddk eval`."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import yaml

from ddk.cli import main as cli_main
from ddk.data.cache import prepare_domains
from ddk.data.domains import PackedDomain, load_domain_specs
from ddk.data.evalset import evaluation_set
from ddk.trainer.evaluate import evaluate_domains, evaluate_loss, teacher_answers

WORDS = "def return class import for while if else print value list dict the of and to in is".split()


def make_tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 1-layer Llama with its tokenizer (HF directory, safetensors) and a two-domain data.yaml."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    rng = random.Random(0)
    texts = {d: [f"{d} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 40))) for _ in range(80)]
             for d in ("code", "prose")}
    tokenizer = make_tokenizer([t for ts in texts.values() for t in ts])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=128))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    for d, ts in texts.items():
        (root / "data" / d).mkdir(parents=True)
        (root / "data" / d / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ts))
    (root / "data.yaml").write_text(yaml.safe_dump({"domains": [
        {"name": d, "files": [f"data/{d}/train.jsonl"]} for d in texts], "val_fraction": 0.2}))
    assert (root / "model" / "model.safetensors").is_file()
    return root, model.eval(), tokenizer


def test_evaluate_loss_matches_transformers_loss(tiny):
    _, model, _ = tiny
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, model.config.vocab_size, (5, 17), generator=g)
    with torch.no_grad():
        expected = model(input_ids=blocks, labels=blocks).loss.item()  # HF shifts labels itself
    got = evaluate_loss(model, blocks.numpy().astype(np.int32), batch_size=2, device="cpu")
    assert got == pytest.approx(expected, rel=1e-5)


def test_evaluate_loss_restores_training_mode(tiny):
    _, model, _ = tiny
    model.train()
    try:
        evaluate_loss(model, np.zeros((1, 5), dtype=np.int32), 1, "cpu")
        assert model.training
    finally:
        model.eval()


def hf_loss(model, blocks, lengths):
    """transformers' own mean loss over the scored predictions of (padded) blocks: labels -100 past each length."""
    ids = torch.as_tensor(np.asarray(blocks, dtype=np.int64))
    labels = ids.clone()
    labels[torch.arange(ids.shape[1]).unsqueeze(0) >= torch.as_tensor(lengths)[:, None]] = -100
    with torch.no_grad():
        return model(input_ids=ids, labels=labels).loss.item()


def test_evaluate_domains_scores_the_evaluation_set(tiny):
    _, model, _ = tiny
    g = torch.Generator().manual_seed(2)
    val_a = torch.randint(0, model.config.vocab_size, (6, 9), generator=g)
    val_b = torch.randint(0, model.config.vocab_size, (3, 9), generator=g)
    domains = {"a": PackedDomain("a", val_a.numpy(), val_a.numpy()),
               "b": PackedDomain("b", val_b.numpy(), val_b.numpy())}
    got = evaluate_domains(model, domains, sequences_per_domain=4, batch_size=3, device="cpu")
    es = evaluation_set(domains["a"], 4)
    assert len(es) == 4 and es.documents == 4  # blocks without a document table: each its own document
    assert {tuple(r) for r in es.blocks} <= {tuple(r) for r in val_a.tolist()}
    assert got["a"] == pytest.approx(hf_loss(model, es.blocks, es.lengths), rel=1e-5)
    assert got["b"] == pytest.approx(model(input_ids=val_b, labels=val_b).loss.item(), rel=1e-5)  # all 3


@dataclass
class _Out:
    target_logprob: torch.Tensor
    ids: torch.Tensor = None
    logprobs: torch.Tensor = None


class FakeTeacher:
    """Stands in for TeacherClient: target_logprob = -(next token id) / 100, and records the calls."""

    def __init__(self):
        self.calls = []

    def topk(self, input_ids, top_k):
        ids = torch.as_tensor(input_ids)
        self.calls.append((tuple(ids.shape), top_k))
        B, L = ids.shape
        return _Out(target_logprob=-(ids[:, 1:].float() / 100), ids=torch.zeros(B, L - 1, top_k, dtype=torch.long),
                    logprobs=torch.zeros(B, L - 1, top_k))


def test_teacher_answers_once_per_block_padding_not_scored():
    from ddk.data.evalset import EvalSet

    rng = np.random.default_rng(0)
    blocks = rng.integers(1, 50, (10, 9))
    lengths = np.array([9, 9, 4, 9, 2, 9, 9, 9, 5, 9])
    blocks[np.arange(9)[None, :] >= lengths[:, None]] = 0  # padding
    client = FakeTeacher()
    got = teacher_answers(client, EvalSet(blocks, lengths, np.arange(10)), top_k=4, batch_size=4)
    want = [blocks[i, 1:lengths[i]].sum() / 100 for i in range(10)]  # -sum(target_logprob) over scored positions
    assert got.nll == pytest.approx(want)
    assert got.ids.shape == (10, 8, 4)
    assert [c[0] for c in client.calls] == [(4, 9), (4, 9), (2, 9)]  # whole blocks, each asked once
    assert {c[1] for c in client.calls} == {4}


def test_ddk_eval_json_and_table(tiny, capsys, monkeypatch, tmp_path):
    root, model, tokenizer = tiny
    monkeypatch.setenv("DDK_CACHE_DIR", str(tmp_path / "cache"))
    argv = ["eval", "--model", str(root / "model"), "--data", str(root), "--seq-len", "16", "--sequences", "3"]
    assert cli_main(argv + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["domains"]) == {"code", "prose"}
    domains = prepare_domains(load_domain_specs(root), tokenizer, 16, tmp_path / "cache")
    for name, row in out["domains"].items():
        es = evaluation_set(domains[name], 3)
        assert row["loss"] == pytest.approx(hf_loss(model, es.blocks, es.lengths), rel=1e-4)
        assert row["ppl"] == pytest.approx(math.exp(row["loss"]))
        assert row["tokens"] == int(np.sum(es.lengths - 1)) and row["documents"] == 3  # 3 windows, 3 documents

    assert cli_main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["domain", "docs", "tokens", "loss", "PPL"]
    rows = {ln.split()[0]: ln.split() for ln in lines[2:]}
    assert set(rows) == {"code", "prose"}
    assert float(rows["code"][4]) == pytest.approx(out["domains"]["code"]["ppl"], abs=1e-3)


def test_ddk_eval_missing_paths_exit_2(tiny, tmp_path, capsys):
    root, _, _ = tiny
    assert cli_main(["eval", "--model", str(tmp_path / "nope"), "--data", str(root)]) == 2
    assert "--model" in capsys.readouterr().err
    assert cli_main(["eval", "--model", str(root / "model"), "--data", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and err.count("\n") == 1


@pytest.mark.slow
def test_ddk_eval_on_the_kit(kit, capsys):
    domains = [d["name"] for d in yaml.safe_load((kit / "data.yaml").read_text())["domains"]]
    assert cli_main(["eval", "--model", str(kit / "student"), "--data", str(kit), "--sequences", "4",
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["domains"]) == domains
    for row in out["domains"].values():
        assert math.isfinite(row["loss"]) and row["loss"] > 0 and 4 <= row["tokens"] <= 4 * out["seq_len"]
        assert row["documents"] == 4
    # a train config as --data: its seq_len; the table lists every domain
    assert cli_main(["eval", "--model", str(kit / "teacher"), "--data", str(kit / "train.yaml"),
                     "--sequences", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[0] for ln in lines[2:]] == domains


@pytest.mark.slow
def test_ddk_eval_routes_a_domain_to_its_own_teacher(kit, teacher_url, capsys):
    """--route DOMAIN=URL: that domain's teacher loss from that teacher, the others from --teacher. Routing math to
    the same teacher as everything else changes nothing; routing it alone, without --teacher, is exit 2."""
    base = ["eval", "--model", str(kit / "student"), "--data", str(kit / "train.yaml"), "--sequences", "4", "--json"]
    assert cli_main(base + ["--teacher", teacher_url]) == 0
    plain = json.loads(capsys.readouterr().out)["domains"]
    assert cli_main(base + ["--teacher", teacher_url, "--route", f"math={teacher_url}"]) == 0
    routed = json.loads(capsys.readouterr().out)["domains"]
    assert {n: r["teacher_loss"] for n, r in routed.items()} == {n: r["teacher_loss"] for n, r in plain.items()}
    for r in plain.values():  # 4 windows of 4 documents: a standard error of the log-ratio per domain
        assert r["documents"] == 4 and isinstance(r["log_ratio_se"], float) and r["log_ratio_se"] > 0
        assert r["ratio"] == pytest.approx(math.exp(r["loss"] - r["teacher_loss"]))
    assert cli_main(base + ["--route", f"math={teacher_url}"]) == 2
    assert "--teacher" in capsys.readouterr().err
    assert cli_main(base + ["--teacher", teacher_url, "--route", f"nope={teacher_url}"]) == 2
    assert "--route: unknown domain 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main(base + ["--route", "math"])
    assert e.value.code == 2
