"""train.strategy=fsdp (ddk.trainer.parallel): FSDP2 on CPU with gloo, two spawned processes, no Ray.

One spawn for the module (a process start costs seconds on 2 cores): the workers train a tiny random Llama
(tied embeddings) sharded for 3 steps, checkpoint it after step 2, gather and export it; then a fresh sharded
model resumes from that checkpoint and makes step 3; and one bf16 step (MixedPrecisionPolicy over gloo).
This process trains the same model unsharded on the same global batches and checks: the same losses and
weights, resume equal to uninterrupted, the export loads with transformers. The Trainer under Ray with
train.strategy=fsdp is in tests/e2e/test_train_ray.py.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
from ddk.errors import UsageError

WORLD, STEPS, SAVE_AT, LR = 2, 3, 2, 1e-3
VOCAB, BATCH, SEQ = 64, 4, 9


def make_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def build(model):
    from ddk.trainer.optim import build_optimizer, lr_lambda

    opt = build_optimizer(model, LR, 0.1)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(1, STEPS))


def step(model, opt, sched, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids[:, :-1], use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # DTensor grads: the global norm
    opt.step()
    sched.step()
    return loss.detach()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from ddk.trainer import parallel
    from safetensors.torch import save_file

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    out = Path(out)

    def mean(t):
        t = t.clone()
        dist.all_reduce(t)
        return t.item() / world

    def run(model, opt, sched, steps):
        return [mean(step(model, opt, sched, batch(s).chunk(world)[rank])) for s in steps]

    try:
        m = parallel.shard_model(make_model(), "fp32", "cpu")
        opt, sched = build(m)
        losses = run(m, opt, sched, range(SAVE_AT))
        parallel.save_training_sharded(out / "ckpt", {"step": SAVE_AT, "weights": {"a": 1.0}, "version": 3,
                                                      "sampler": {"rank": rank}}, rank=rank, world_size=world,
                                       model=m, optimizer=opt, scheduler=sched)
        losses += run(m, opt, sched, range(SAVE_AT, STEPS))
        full = parallel.gather_full_state(m)
        if rank == 0:
            parallel.save_pretrained_full(m, full, out / "export")
            save_file({k: v.contiguous() for k, v in full.items() if k != "lm_head.weight"},
                      str(out / "uninterrupted.safetensors"))

        m2 = parallel.shard_model(make_model(seed=1), "fp32", "cpu")  # other weights: the load must replace them
        opt2, sched2 = build(m2)
        restored = parallel.load_training_sharded(out / "ckpt", rank=rank, world_size=world, model=m2,
                                                  optimizer=opt2, scheduler=sched2)
        resumed = run(m2, opt2, sched2, range(SAVE_AT, STEPS))
        full2 = parallel.gather_full_state(m2)

        m3 = parallel.shard_model(make_model(), "bf16", "cpu")
        opt3, sched3 = build(m3)
        bf16 = run(m3, opt3, sched3, range(1))
        info = {"losses": losses, "resumed": resumed, "restored": restored, "bf16": bf16,
                "classes": [type(m).__name__, type(m.lm_head.weight).__name__],
                "tied": m.lm_head.weight is m.model.embed_tokens.weight,
                "other_rank_full": len(full)}
        if rank == 0:
            save_file({k: v.contiguous() for k, v in full2.items() if k != "lm_head.weight"},
                      str(out / "resumed.safetensors"))
        (out / f"result-{rank}.json").write_text(json.dumps(info))
    except Exception as e:
        import traceback

        (out / f"error-{rank}.txt").write_text(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("fsdp")
    try:
        mp.start_processes(_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, start_method="spawn")
    except Exception:  # noqa: BLE001 - the workers wrote what failed
        errors = "\n".join(p.read_text() for p in sorted(out.glob("error-*.txt")))
        pytest.fail(f"FSDP2 workers failed:\n{errors}")
    return out, [json.loads((out / f"result-{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def unsharded():
    """The same training on one process, no sharding: losses and weights after each step."""
    m = make_model()
    opt, sched = build(m)
    losses, states = [], []
    for s in range(STEPS):
        losses.append(step(m, opt, sched, batch(s)).item())
        states.append({k: v.detach().clone() for k, v in m.state_dict().items()})
    return losses, states


def test_sharded_training_equals_unsharded(sharded, unsharded):
    from safetensors.torch import load_file

    out, results = sharded
    want_losses, states = unsharded
    r0 = results[0]
    assert r0["classes"] == ["FSDPLlamaForCausalLM", "DTensor"] and r0["tied"]
    assert results[1]["other_rank_full"] == 0  # the gathered state lands on rank 0 only (cpu_offload)
    assert r0["losses"] == pytest.approx(want_losses, abs=1e-5)
    assert results[1]["losses"] == r0["losses"]
    got = load_file(out / "uninterrupted.safetensors")
    assert set(got) == set(states[-1]) - {"lm_head.weight"}
    for k, v in got.items():
        torch.testing.assert_close(v, states[-1][k], rtol=0, atol=2e-6)


def test_bf16_params_through_the_mixed_precision_policy(sharded, unsharded):
    _, results = sharded
    assert results[0]["bf16"][0] == pytest.approx(unsharded[0][0], abs=2e-2)  # bf16 compute, close to fp32
    assert results[0]["bf16"][0] != unsharded[0][0]


def test_sharded_checkpoint_resumes_like_uninterrupted(sharded):
    from ddk.trainer import checkpoint as ckpt
    from safetensors.torch import load_file

    out, results = sharded
    for r in range(WORLD):
        res = results[r]
        assert res["resumed"] == pytest.approx(res["losses"][SAVE_AT:], abs=1e-6)
        assert res["restored"]["step"] == SAVE_AT and res["restored"]["version"] == 3
        assert res["restored"]["sampler"] == {"rank": r}
    got, want = load_file(out / "resumed.safetensors"), load_file(out / "uninterrupted.safetensors")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-7)
    # the files: per-rank shards and manifests, no pickle
    d = out / "ckpt"
    names = sorted(p.name for p in d.iterdir())
    assert names == sorted(["state.json", "state.safetensors"] + [
        f"{stem}{r}{ext}" for r in range(WORLD) for stem in ("model-rank", "optim-rank", "rank-")
        for ext in (".json", ".safetensors")])
    manifest = json.loads((d / "model-rank1.json").read_text())
    assert manifest["world_size"] == WORLD and manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    emb = manifest["tensors"]["model.embed_tokens.weight"]
    assert emb["shape"] == [VOCAB, 32] and emb["local_shape"] == [VOCAB // WORLD, 32] and emb["placements"] == ["S0"]
    assert load_file(d / "model-rank1.safetensors")["model.embed_tokens.weight"].shape == (VOCAB // WORLD, 32)
    assert ckpt.complete_step(d) == SAVE_AT


def test_export_loads_with_transformers(sharded):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out, _ = sharded
    export = out / "export"
    assert json.loads((export / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert not list(export.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(export, use_safetensors=True, dtype=torch.float32)
    want = load_file(out / "uninterrupted.safetensors")
    state = model.state_dict()
    for k, v in want.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


# -- around it: no process group needed ---------------------------------------------------------------

def test_decoder_layers_found_in_hf_and_generic_models():
    from ddk.trainer.parallel import decoder_layers

    m = make_model()
    assert decoder_layers(m) == list(m.model.layers)

    class MyDecoderLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(2, 2)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.Sequential(MyDecoderLayer(), MyDecoderLayer())
            self.head = torch.nn.Linear(2, 2)

    net = Net()
    assert decoder_layers(net) == list(net.blocks)
    assert decoder_layers(torch.nn.Linear(2, 2)) == []


def test_param_dtype_follows_train_precision():
    from ddk.trainer.parallel import mixed_precision, param_dtype

    assert param_dtype("auto", "cpu") == torch.float32 and param_dtype("auto", "cuda") == torch.bfloat16
    assert param_dtype("bf16", "cpu") == torch.bfloat16 and param_dtype("fp16", "cuda") == torch.float16
    assert param_dtype("fp32", "cuda") == torch.float32
    p = mixed_precision("bf16", "cuda")
    assert p.param_dtype == torch.bfloat16 and p.reduce_dtype == torch.float32
    assert mixed_precision("fp32", "cpu").param_dtype is None


def test_fsdp_without_a_process_group_is_a_usage_error():
    import torch.distributed as dist
    from ddk.trainer.parallel import shard_model

    assert not dist.is_initialized()
    with pytest.raises(UsageError, match="train.strategy: fsdp needs a torch.distributed process group"):
        shard_model(make_model(), "fp32", "cpu")


def test_sharded_checkpoint_checks_world_size_and_completeness(sharded, tmp_path):
    import shutil

    from ddk.trainer import checkpoint as ckpt
    from ddk.trainer import parallel

    out, _ = sharded
    d = tmp_path / "ckpt"
    shutil.copytree(out / "ckpt", d)
    with pytest.raises(ValueError, match="resumes on the same world size only .*ray.num_workers=2"):
        parallel.load_model_shard(d, make_model(), rank=0, world_size=4)
    with pytest.raises(ValueError, match="train.strategy=fsdp"):  # a DDP resume of a sharded checkpoint
        ckpt.load_training(d, rank=0, model=make_model(), optimizer=build(make_model())[0], scheduler=None)
    (d / "optim-rank1.safetensors").write_bytes(b"cut short")
    assert ckpt.complete_step(d) is None
    shutil.copy(out / "ckpt" / "optim-rank1.safetensors", d)
    (d / "model-rank0.safetensors").unlink()
    assert ckpt.complete_step(d) is None
