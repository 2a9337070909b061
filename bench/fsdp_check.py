"""GPU check of ``train.strategy: fsdp`` (ddk.trainer.parallel) with NCCL: one process per visible GPU.

    python bench/fsdp_check.py [--gpus N] [--out DIR] [--json OUT.json] [--dry-run]

On each of N ranks (default: every visible GPU, one is enough) a tiny random Llama (tied embeddings) is sharded
with FSDP2 on cuda and trained 3 steps twice: fp32 (must equal the unsharded model on rank 0's GPU, losses
within 1e-4) and bf16 through the MixedPrecisionPolicy (losses within 5e-2 of fp32, parameters of the
layers gathered in bf16). Then the sharded checkpoint is saved after step 2, loaded into a fresh sharded model
and optimiser, step 3 run again (must equal the uninterrupted step 3), and the gathered export is loaded with
transformers. Prints one JSON line per check, writes them all to ``--json`` (bench/gpu.sh's fsdp.json) and exits
1 if any failed. ``--dry-run``: the same checks on the CPU with gloo, one rank (bench/gpu_common.py's switch);
the two-rank CPU/gloo equivalent is tests/unit/test_fsdp.py.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch

from gpu_common import Target, one_line, parser, run_part

VOCAB, BATCH, SEQ, STEPS, SAVE_AT, LR = 256, 8, 33, 3, 2, 1e-3


def make_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64, tie_word_embeddings=True))


def batch(step: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g).to(device)


def build(model):
    from ddk.trainer.optim import build_optimizer, lr_lambda

    opt = build_optimizer(model, LR, 0.1)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(1, STEPS))


def step(model, opt, sched, ids):
    logits = model(input_ids=ids[:, :-1], use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    return loss.detach()


def worker(rank: int, world: int, port: int, out: str, dry_run: bool = False) -> None:
    from types import SimpleNamespace

    import torch.distributed as dist
    from ddk.trainer import parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    target = Target(dry_run)
    if target.cuda:
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        dist.init_process_group(target.dist_backend, rank=rank, world_size=world, device_id=device)
    else:
        device = target.device
        dist.init_process_group(target.dist_backend, rank=rank, world_size=world)
    out = Path(out)
    checks = []

    def mean(t):
        t = t.clone()
        dist.all_reduce(t)
        return t.item() / world

    def run(m, opt, sched, steps):
        return [mean(step(m, opt, sched, batch(s, device).chunk(world)[rank])) for s in steps]

    try:
        m = parallel.shard_model(make_model(), "fp32", device)
        opt, sched = build(m)
        fp32 = run(m, opt, sched, range(SAVE_AT))
        ctx = SimpleNamespace(rank=rank, world_size=world)
        saver = parallel.Distributed("fsdp", ctx, device)  # the Trainer's one distributed-state path
        saver.attach(m, opt, sched)
        saver.save(out / "ckpt", SAVE_AT)
        fp32 += run(m, opt, sched, range(SAVE_AT, STEPS))
        full = parallel.gather_full_state(m)
        if rank == 0:
            parallel.save_pretrained_full(m, full, out / "export")

        m2 = parallel.shard_model(make_model(seed=1), "fp32", device)
        opt2, sched2 = build(m2)
        loader = parallel.Distributed("fsdp", ctx, device)
        loader.attach(m2, opt2, sched2)
        loader.load(out / "ckpt")
        resumed = run(m2, opt2, sched2, range(SAVE_AT, STEPS))
        checks.append({"check": "resume", "ok": abs(resumed[0] - fp32[-1]) < 1e-5, "got": resumed,
                       "want": fp32[SAVE_AT:]})

        m3 = parallel.shard_model(make_model(), "bf16", device)
        opt3, sched3 = build(m3)
        bf16 = run(m3, opt3, sched3, range(STEPS))
        checks.append({"check": "bf16", "ok": all(abs(a - b) < 5e-2 for a, b in zip(bf16, fp32)), "got": bf16,
                       "want": fp32, "master_dtype": str(next(m3.parameters()).dtype)})

        if rank == 0:
            ref = make_model().to(device)
            ropt, rsched = build(ref)
            want = [step(ref, ropt, rsched, batch(s, device)).item() for s in range(STEPS)]
            checks.append({"check": "fp32 equals unsharded", "ok": all(abs(a - b) < 1e-4 for a, b in zip(fp32, want)),
                           "got": fp32, "want": want})
            from transformers import AutoModelForCausalLM

            loaded = AutoModelForCausalLM.from_pretrained(out / "export", use_safetensors=True, dtype=torch.float32)
            sd = loaded.state_dict()
            diff = max((sd[k] - full[k]).abs().max().item() for k in full)
            checks.append({"check": "export loads", "ok": diff == 0.0, "max_abs_diff": diff})
    except Exception as e:  # noqa: BLE001 - reported as a failed check
        import traceback

        checks.append({"check": "ran", "ok": False, "error": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc()[-2000:]})
    finally:
        (out / f"checks-{rank}.json").write_text(json.dumps(checks))
        dist.destroy_process_group()


def body(target: Target, args) -> dict:
    world = 1 if args.dry_run else (args.gpus or torch.cuda.device_count())
    if args.out is None:
        with tempfile.TemporaryDirectory(prefix="ddk-fsdp-check-") as tmp:
            return checks_in(target, args, world, Path(tmp))
    return checks_in(target, args, world, Path(args.out))


def checks_in(target: Target, args, world: int, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import torch.multiprocessing as mp

    problems = []
    try:
        if world == 1:  # one rank (one GPU, or the dry run): in this process, a spawn's start-up saved
            worker(0, 1, port, str(out), bool(args.dry_run))
        else:
            mp.start_processes(worker, args=(world, port, str(out), bool(args.dry_run)), nprocs=world,
                               start_method="spawn")
    except Exception as e:  # noqa: BLE001 - the checks files say more
        problems.append(f"workers: {one_line(e)}")
        print(json.dumps({"check": "workers", "ok": False, "error": str(e)[-500:]}))
    checks, ok = [], not problems
    for r in range(world):
        f = out / f"checks-{r}.json"
        for c in json.loads(f.read_text()) if f.is_file() else [{"check": f"rank {r}", "ok": False,
                                                                   "error": "wrote no checks"}]:
            print(json.dumps({"rank": r, **c}))
            checks.append({"rank": r, **{k: v for k, v in c.items() if k != "traceback"}})
            ok = ok and c["ok"]
            if not c["ok"]:
                problems.append(f"rank {r} {c['check']}: {c.get('error', 'values outside the tolerance')}")
    names = {c["check"] for c in checks}
    for want in ("resume", "bf16", "fp32 equals unsharded", "export loads"):
        if want not in names:
            ok = False
            problems.append(f"check {want!r} did not run")
    print(json.dumps({"world_size": world, "backend": target.dist_backend, "torch": torch.__version__, "ok": ok,
                      "out": str(out)}))
    doc = {"world_size": world, "backend": target.dist_backend, "checks": checks, "ok": ok}
    if problems:
        doc["error"] = "; ".join(dict.fromkeys(problems))[:400]
    return doc


def main() -> int:
    ap = parser("fsdp", __doc__)
    ap.add_argument("--gpus", type=int, default=None)
    ap.add_argument("--out", default=None)
    return run_part("fsdp", ap.parse_args(), body)


if __name__ == "__main__":
    sys.exit(main())
