"""The student step at a Llama-3.2-1B shape on one GPU: bf16, FSDP2, the chunked loss; tokens/s and MFU.

Random weights built on the spot (no download): hidden 2048, 16 layers, 32 heads (8 KV heads), FFN 8192,
vocabulary 128,256, tied embeddings -- Llama-3.2-1B's shape. One process, a one-rank NCCL group, the Trainer's
own pieces: :class:`ddk.trainer.scale.StudentStep` (the loss inside the wrapped module), FSDP2 through
:func:`ddk.trainer.parallel.prepare_student_step` with ``train.precision`` bf16 (float32 master weights and
AdamW state), synthetic teacher top-k (k = 16). Rows: chunked vs plain loss (the plain one may run out of
memory at this vocabulary; that is a result too). MFU = 6 x non-embedding-or-tied params x tokens / s / peak
(:func:`ddk.trainer.scale.mfu`, as nanoGPT and torchtitan count).

    python bench/gpu_student.py [--batch 8] [--seq 2048] [--steps 10] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist


def llama_1b():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=500000.0)
    with torch.device("cuda"):
        return LlamaForCausalLM(cfg)  # float32 master weights


def teacher_topk(batch: int, seq: int, vocab: int, k: int, gen: torch.Generator):
    ids = torch.randint(0, vocab, (batch, seq, k), device="cuda", generator=gen)
    logits = torch.randn(batch, seq, k, device="cuda", generator=gen).sort(-1, descending=True).values
    logprobs = torch.log_softmax(logits, -1) + torch.log(torch.tensor(0.9, device="cuda"))  # 10% tail
    return ids, logprobs


def run(chunk_tokens: int | None, args) -> dict:
    from ddk.trainer.parallel import prepare_student_step
    from ddk.trainer.scale import StudentStep, autocast, flop_parameters, mfu, peak_tflops

    torch.manual_seed(0)
    student = llama_1b()
    n_flop = flop_parameters(student)
    kd = SimpleNamespace(gamma=0.2, temperature=1.0, loss="forward_kl", beta=0.5, skew=0.1)
    step = StudentStep(student, kd, chunk_tokens)
    device = torch.device("cuda")
    step = prepare_student_step(step, "bf16", device)
    opt = torch.optim.AdamW(step.parameters(), lr=1e-4, fused=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, 128256, (args.batch, args.seq + 1), device="cuda", generator=gen)
    t_ids, t_lp = teacher_topk(args.batch, args.seq, 128256, 16, gen)
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast(device, "bf16"):
            loss, _ = step(ids[:, :-1], ids[:, 1:], t_ids, t_lp)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(step.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            losses.append(float(loss))
    s = sorted(times)[len(times) // 2]
    tokens = args.batch * args.seq
    peak = args.peak_tflops or peak_tflops(None, device, "bf16")
    out = {"loss": "chunked" if chunk_tokens != 0 else "plain", "chunk_tokens": chunk_tokens,
           "params": sum(p.numel() for p in student.parameters()), "flop_params": n_flop,
           "batch": args.batch, "seq": args.seq, "step_s": s, "tokens_per_s": tokens / s,
           "mfu": mfu(n_flop, tokens, s, peak), "peak_tflops": peak,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "losses": losses}
    del step, student, opt
    torch.cuda.empty_cache()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None, help="default: the card's known bf16 peak")
    p.add_argument("--plain", action="store_true", help="also the plain (full-logits) loss")
    p.add_argument("--json", default=None, help="write the rows here as JSON")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_student: no CUDA device here; skipped")
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    print(f"{torch.cuda.get_device_name()}; Llama-3.2-1B shape, random weights; bf16 + FSDP2 (1 rank); "
          f"{args.batch} x {args.seq} tokens a step, k = 16", flush=True)
    rows = []
    for chunk in ([None, 0] if args.plain else [None]):
        try:
            rows.append(run(chunk, args))
        except torch.cuda.OutOfMemoryError as e:
            rows.append({"loss": "plain" if chunk == 0 else "chunked", "error": f"out of memory: {e}"[:200]})
            torch.cuda.empty_cache()
        r = rows[-1]
        if "error" in r:
            print(f"{r['loss']:8s} {r['error']}", flush=True)
        else:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            print(f"{r['loss']:8s} {r['tokens_per_s']:>10,.0f} tokens/s  step {r['step_s']:.3f} s  MFU {mfu}  "
                  f"peak memory {r['peak_mem_gib']:.1f} GiB  loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
