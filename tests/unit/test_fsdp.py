"""train.strategy=fsdp (ddk.trainer.parallel): FSDP2 on CPU with gloo, spawned processes, no Ray.

One spawn for the module (a process start costs seconds on 2 cores), of three processes: two form a 2-worker
run and train a tiny random Llama (tied embeddings) sharded for 3 steps, checkpoint it after step 2
(:class:`~ddk.trainer.parallel.Distributed`, its entries registered), gather and export it; a fresh sharded model
resumes from that checkpoint and makes step 3; one bf16 step (MixedPrecisionPolicy over gloo). The third process
is a 1-worker FSDP run (its own process group): it writes its checkpoint after step 2, which the 2-worker run
resumes (1 -> 2), and resumes theirs (2 -> 1). This process trains the same model unsharded on the same global
batches and checks: the same losses and weights, every resume equal to uninterrupted, the export loads with
transformers, and an unsharded process resumes the sharded checkpoint. The Trainer under Ray with
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


class Box:
    """A stateful entry holding plain values (what the Trainer registers: its state, the mixture, the sampler)."""

    def __init__(self, value=None):
        self.value = value

    def state_dict(self):
        return self.value

    def load_state_dict(self, state):
        self.value = state


def distributed(model, opt, sched, rank, world, sampler):
    """The Trainer's Distributed (train.strategy fsdp) over a sharded ``model``, with its three entries."""
    from types import SimpleNamespace

    from ddk.trainer.parallel import Distributed

    d = Distributed("fsdp", SimpleNamespace(rank=rank, world_size=world), "cpu", "fp32")
    d.attach(model, opt, sched)
    boxes = {"trainer": Box({"step": SAVE_AT}), "mixture": Box({"weights": {"a": 1.0}, "version": 3}),
             "sampler": Box(sampler)}
    for name, box in boxes.items():
        d.register(name, box, per_rank=name == "sampler")
    return d, boxes


def _wait_for(path: Path, timeout: float = 120.0) -> None:
    import time

    t0 = time.monotonic()
    while not path.exists():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.05)


def _worker(index: int, port: int, port_one: int, out: str) -> None:
    """Processes 0 and 1: one FSDP run on 2 ranks; process 2: one FSDP run on 1 rank (its own process group).
    Each resumes the other's checkpoint (1 -> 2 and 2 -> 1 workers)."""
    import torch.distributed as dist
    from ddk.trainer import parallel
    from safetensors.torch import save_file

    world, rank = (WORLD, index) if index < WORLD else (1, 0)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port if index < WORLD else port_one))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    out = Path(out)
    tag = f"w{world}r{rank}"

    def mean(t):
        t = t.clone()
        dist.all_reduce(t)
        return t.item() / world

    def run(model, opt, sched, steps):
        return [mean(step(model, opt, sched, batch(s).chunk(world)[rank])) for s in steps]

    def fresh(seed=1):  # other weights: a load must replace them
        m = parallel.shard_model(make_model(seed=seed), "fp32", "cpu")
        return (m, *build(m))

    def save_full(m, name):
        full = parallel.gather_full_state(m)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in full.items() if k != "lm_head.weight"}, str(out / name))
        return full

    try:
        if world == 1:  # ------------------------------------------------ the 1-worker run
            m, opt, sched = fresh(seed=0)
            losses = run(m, opt, sched, range(SAVE_AT))
            distributed(m, opt, sched, rank, world, {"rank": "one"})[0].save(out / "ckpt1", SAVE_AT)
            (out / "ckpt1.done").touch()
            _wait_for(out / "ckpt2.done")
            m2, opt2, sched2 = fresh()
            d, boxes = distributed(m2, opt2, sched2, rank, world, "fresh")
            d.load(out / "ckpt")  # 2 -> 1
            resumed = run(m2, opt2, sched2, range(SAVE_AT, STEPS))
            save_full(m2, "from2.safetensors")
            info = {"losses": losses, "from2": resumed, "from2_entries": {k: b.value for k, b in boxes.items()}}
        else:  # ------------------------------------------------------- the 2-worker run
            m, opt, sched = fresh(seed=0)
            losses = run(m, opt, sched, range(SAVE_AT))
            distributed(m, opt, sched, rank, world, {"rank": rank})[0].save(out / "ckpt", SAVE_AT)
            dist.barrier()
            if rank == 0:
                (out / "ckpt2.done").touch()
            losses += run(m, opt, sched, range(SAVE_AT, STEPS))
            full = save_full(m, "uninterrupted.safetensors")
            if rank == 0:
                parallel.save_pretrained_full(m, full, out / "export")

            m2, opt2, sched2 = fresh()
            d, boxes = distributed(m2, opt2, sched2, rank, world, "fresh")
            d.load(out / "ckpt")  # the same world size
            resumed = run(m2, opt2, sched2, range(SAVE_AT, STEPS))
            save_full(m2, "resumed.safetensors")

            _wait_for(out / "ckpt1.done")
            m4, opt4, sched4 = fresh()
            d4, boxes4 = distributed(m4, opt4, sched4, rank, world, "fresh")
            d4.load(out / "ckpt1")  # 1 -> 2
            from1 = run(m4, opt4, sched4, range(SAVE_AT, STEPS))
            save_full(m4, "from1.safetensors")

            m3 = parallel.shard_model(make_model(), "bf16", "cpu")
            opt3, sched3 = build(m3)
            bf16 = run(m3, opt3, sched3, range(1))
            info = {"losses": losses, "resumed": resumed, "restored": {k: b.value for k, b in boxes.items()},
                    "from1": from1, "from1_entries": {k: b.value for k, b in boxes4.items()}, "bf16": bf16,
                    "classes": [type(m).__name__, type(m.lm_head.weight).__name__],
                    "tied": m.lm_head.weight is m.model.embed_tokens.weight, "other_rank_full": len(full)}
        (out / f"result-{tag}.json").write_text(json.dumps(info))
    except Exception as e:
        import traceback

        (out / f"error-{tag}.txt").write_text(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        (out / "ckpt1.done").touch()  # let the other run end instead of waiting for this one
        (out / "ckpt2.done").touch()
        raise
    finally:
        dist.destroy_process_group()


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """One spawn of three processes: a 2-worker FSDP run (0, 1) and a 1-worker one (2), each resuming the other's
    checkpoint. Results by rank of the 2-worker run, and the 1-worker run's under "one"."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("fsdp")
    try:
        mp.start_processes(_worker, args=(*_free_ports(2), str(out)), nprocs=WORLD + 1,
                           start_method="spawn")
    except Exception:  # noqa: BLE001 - the workers wrote what failed
        errors = "\n".join(p.read_text() for p in sorted(out.glob("error-*.txt")))
        pytest.fail(f"FSDP2 workers failed:\n{errors}")
    results = [json.loads((out / f"result-w{WORLD}r{r}.json").read_text()) for r in range(WORLD)]
    return out, results, json.loads((out / "result-w1r0.json").read_text())


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

    out, results, _ = sharded
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
    _, results, _ = sharded
    assert results[0]["bf16"][0] == pytest.approx(unsharded[0][0], abs=2e-2)  # bf16 compute, close to fp32
    assert results[0]["bf16"][0] != unsharded[0][0]


def test_sharded_checkpoint_resumes_like_uninterrupted(sharded):
    from ddk.trainer import checkpoint as ckpt
    from safetensors.torch import load_file

    out, results, _ = sharded
    for r in range(WORLD):
        res = results[r]
        assert res["resumed"] == pytest.approx(res["losses"][SAVE_AT:], abs=1e-6)
        assert res["restored"] == {"trainer": {"step": SAVE_AT}, "mixture": {"weights": {"a": 1.0}, "version": 3},
                                   "sampler": {"rank": r}}
    got, want = load_file(out / "resumed.safetensors"), load_file(out / "uninterrupted.safetensors")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-7)
    # the files: the full student and optimiser on rank 0 (any world size reads them), each rank its entries
    d = out / "ckpt"
    names = sorted(p.name for p in d.iterdir())
    assert names == sorted(["model.safetensors", "state.json", "state.safetensors"] + [
        f"rank-{r}{ext}" for r in range(WORLD) for ext in (".json", ".safetensors")])
    model = load_file(d / "model.safetensors")
    assert model["model.embed_tokens.weight"].shape == (VOCAB, 32) and "lm_head.weight" not in model  # tied: once
    shared, own = ckpt.load_checkpoint(d, rank=1)
    assert shared["world_size"] == WORLD and shared["strategy"] == "fsdp" and own["entries"] == {"sampler": {"rank": 1}}
    moments = shared["optimizer"]["state"]["model.embed_tokens.weight"]
    assert moments["exp_avg"].shape == (VOCAB, 32) and not isinstance(moments["exp_avg"], type(None))
    assert "lm_head.weight" not in shared["optimizer"]["state"]
    assert ckpt.complete_step(d) == SAVE_AT


def test_a_checkpoint_resumes_on_another_number_of_workers(sharded, unsharded):
    """Reshard on load: the 2-worker checkpoint resumed on 1 worker and the 1-worker one on 2 continue exactly as
    the uninterrupted (unsharded) training does."""
    from safetensors.torch import load_file

    out, results, one = sharded
    want_losses, states = unsharded
    assert one["losses"] == pytest.approx(want_losses[:SAVE_AT], abs=1e-5)
    assert one["from2"] == pytest.approx(want_losses[SAVE_AT:], abs=1e-5)  # 2 -> 1
    assert one["from2_entries"]["sampler"] == {"rank": 0} and one["from2_entries"]["mixture"]["version"] == 3
    for r in range(WORLD):  # 1 -> 2
        assert results[r]["from1"] == pytest.approx(want_losses[SAVE_AT:], abs=1e-5)
    assert results[0]["from1_entries"]["sampler"] == {"rank": "one"}
    assert results[1]["from1_entries"]["sampler"] == "fresh"  # the 1-worker run had no rank 1: starts afresh
    for name in ("from1.safetensors", "from2.safetensors"):
        got = load_file(out / name)
        for k, v in got.items():
            torch.testing.assert_close(v, states[-1][k], rtol=0, atol=2e-6)


def test_export_loads_with_transformers(sharded):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out, _, _ = sharded
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


def test_sharded_checkpoint_checks_completeness_and_loads_unsharded(sharded, unsharded, tmp_path):
    """A part missing or cut short: not complete. Complete: one unsharded process (train.strategy ddp) resumes it."""
    import shutil
    from types import SimpleNamespace

    from ddk.trainer import checkpoint as ckpt
    from ddk.trainer.parallel import Distributed

    out, _, _ = sharded
    m = make_model(seed=1)
    opt, sched = build(m)
    d = Distributed("ddp", SimpleNamespace(rank=0, world_size=1))
    d.attach(m, opt, sched)
    d.load(out / "ckpt")
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, unsharded[1][SAVE_AT - 1][k], rtol=0, atol=2e-6)
    assert step(m, opt, sched, batch(SAVE_AT)).item() == pytest.approx(unsharded[0][SAVE_AT], abs=1e-5)

    d = tmp_path / "ckpt"
    shutil.copytree(out / "ckpt", d)
    (d / "rank-1.safetensors").write_bytes(b"cut short")
    assert ckpt.complete_step(d) is None
    shutil.copy(out / "ckpt" / "rank-1.safetensors", d)
    assert ckpt.complete_step(d) == SAVE_AT
    (d / "model.safetensors").unlink()
    assert ckpt.complete_step(d) is None
