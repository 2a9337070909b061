"""`ddk teacher serve` options that reach the engine: --tensor-parallel-size into vLLM's LLM(...) kwargs.

vLLM's tensor parallelism needs several GPUs, so here a stand-in ``vllm`` module records what the engine passes
to ``LLM``; the flag's effect on real GPUs is vLLM's."""

from __future__ import annotations

import json
import sys
import types

import pytest


class _FakeLLM:
    calls: list[dict] = []

    def __init__(self, model, **kwargs):
        _FakeLLM.calls.append(kwargs)
        mc = types.SimpleNamespace(get_vocab_size=lambda: 16, max_model_len=65)
        self.llm_engine = types.SimpleNamespace(model_config=mc)

    def generate(self, prompts, params, use_tqdm=False):
        lp = types.SimpleNamespace(logprob=-0.5, rank=1)
        return [types.SimpleNamespace(prompt_logprobs=[None] + [{t: lp} for t in p["prompt_token_ids"][1:]])
                for p in prompts]


@pytest.fixture
def fake_vllm(monkeypatch, tmp_path):
    vllm = types.ModuleType("vllm")
    vllm.LLM = _FakeLLM
    vllm.SamplingParams = lambda **kw: kw
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    vllm.inputs = inputs
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    _FakeLLM.calls.clear()
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_attention_heads": 2, "hidden_size": 128, "head_dim": 64,
                                                   "max_position_embeddings": 64}))
    return model


def test_tensor_parallel_size_reaches_vllm(fake_vllm):
    from ddk.cli import build_parser
    from ddk.teacher.engines import load_engine
    from ddk.teacher.server import engine_options

    args = build_parser().parse_args(["teacher", "serve", "--model", str(fake_vllm), "--backend", "vllm",
                                      "--tensor-parallel-size", "4"])
    engine = load_engine(fake_vllm, "vllm", **engine_options(args))
    assert _FakeLLM.calls[-1]["tensor_parallel_size"] == 4
    assert engine.vocab_size == 16
    args = build_parser().parse_args(["teacher", "serve", "--model", str(fake_vllm)])
    load_engine(fake_vllm, "vllm", **engine_options(args))
    assert _FakeLLM.calls[-1]["tensor_parallel_size"] == 1  # the default


def test_tensor_parallel_size_below_one_is_refused():
    from ddk.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["teacher", "serve", "--model", "m", "--tensor-parallel-size", "0"])
    assert e.value.code == 2
