"""The student step at a Llama-3.2-1B shape on one GPU: bf16, FSDP2, the chunked loss; tokens/s and MFU.

Random weights built on the spot (no download): hidden 2048, 16 layers, 32 heads (8 KV heads), FFN 8192,
vocabulary 128,256, tied embeddings -- Llama-3.2-1B's shape. One process, a one-rank process group, the Trainer's
own pieces: :class:`ddk.trainer.scale.StudentStep` (the loss inside the wrapped module), FSDP2 through
:class:`ddk.trainer.parallel.Distributed` (``place``) with ``train.precision`` bf16 (float32 master weights),
the Trainer's AdamW (``ddk.trainer.optim.build_optimizer``), synthetic teacher top-k (k = 16). Rows: chunked vs
plain loss (the plain one may run out of memory at this vocabulary; that is a result too). MFU = 6 x non-embedding-or-tied params x tokens / s / peak
(:func:`ddk.trainer.scale.mfu`, as nanoGPT and torchtitan count); target >= 40 % for the chunked row.

``--dry-run``: the same code on the CPU (gloo) with a tiny Llama (bench/gpu_common.py).

    python bench/gpu_student.py [--dry-run] [--batch 8] [--seq 2048] [--steps 10] [--json OUT.json]
"""

from __future__ import annotations

import os
import sys
import time
from types import SimpleNamespace

from gpu_common import llama, median, one_line, parser, run_part

TOP_K = 16
MFU_TARGET = 0.40


def teacher_topk(target, batch: int, seq: int, vocab: int, k: int, gen):
    import torch

    ids = torch.randint(0, vocab, (batch, seq, k), device=target.device, generator=gen)
    logits = torch.randn(batch, seq, k, device=target.device, generator=gen).sort(-1, descending=True).values
    logprobs = torch.log_softmax(logits, -1) + torch.log(torch.tensor(0.9, device=target.device))  # 10% tail
    return ids, logprobs


def run(target, chunk_tokens: int | None, args, batch: int) -> dict:
    import torch

    from ddk.trainer.optim import build_optimizer
    from ddk.trainer.parallel import Distributed
    from ddk.trainer.scale import StudentStep, autocast, flop_parameters, mfu

    torch.manual_seed(0)
    student = llama(target)  # float32 master weights
    vocab = student.config.vocab_size
    n_flop = flop_parameters(student)
    kd = SimpleNamespace(gamma=0.2, temperature=1.0, loss="forward_kl", beta=0.5, skew=0.1)
    # the Trainer's own placement (train.strategy fsdp, train.precision bf16) on a one-rank group
    placer = Distributed("fsdp", SimpleNamespace(rank=0, world_size=1), target.device, "bf16")
    step = placer.place(StudentStep(student, kd, chunk_tokens))
    opt = build_optimizer(step, 1e-4, 0.1)  # the Trainer's AdamW (float32 state beside the master weights)
    gen = target.generator(0)
    ids = torch.randint(0, vocab, (batch, args.seq + 1), device=target.device, generator=gen)
    t_ids, t_lp = teacher_topk(target, batch, args.seq, vocab, TOP_K, gen)
    target.reset_peak()
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        target.sync()
        t0 = time.perf_counter()
        with autocast(target.device, "bf16"):
            loss, _ = step(ids[:, :-1], ids[:, 1:], t_ids, t_lp)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(step.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        target.sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
    s = median(times)
    tokens = batch * args.seq
    peak, peak_source = target.peak_tflops(args.peak_tflops)
    out = {"loss": "chunked" if chunk_tokens != 0 else "plain", "chunk_tokens": chunk_tokens,
           "params": sum(p.numel() for p in student.parameters()), "flop_params": n_flop, "vocab": vocab,
           "batch": batch, "seq": args.seq, "steps": args.steps, "step_s": s, "tokens_per_s": tokens / s,
           "mfu": mfu(n_flop, tokens, s, peak), "peak_tflops": peak, "peak_tflops_source": peak_source,
           "peak_mem_gib": target.peak() / 2**30, "losses": losses,
           "losses_finite": all(x == x and abs(x) != float("inf") for x in losses)}
    del step, student, opt
    target.empty_cache()
    return out


def rows_halving_on_oom(run_row, batch: int, free) -> tuple[list[dict], list[str]]:
    """The chunked row, then the plain one at the batch the chunked row ran at. ``run_row(chunk_tokens, batch)``
    -> a row (chunk_tokens None: chunked; 0: plain). The chunked row halves its batch on running out of memory
    (down to 1; each try's reason kept); the plain row out of memory is a result (``{"loss", "batch", "error"}``).
    ``free()`` runs after each out-of-memory, outside the except clause, so the failed try's tensors are gone."""
    import torch

    rows, ooms = [], []
    for chunk in (None, 0):
        name = "plain" if chunk == 0 else "chunked"
        while True:
            try:
                rows.append(run_row(chunk, batch))
                break
            except torch.OutOfMemoryError as e:
                oom = f"out of memory at batch {batch}: {one_line(e)}"[:300]
            free()
            if chunk == 0 or batch == 1:
                rows.append({"loss": name, "batch": batch, "error": oom})
                break
            ooms.append(oom)
            print(f"{name:8s} {oom[:120]}; again at batch {batch // 2}", flush=True)
            batch //= 2
    return rows, ooms


def body(target, args) -> dict:
    import torch
    import torch.distributed as dist

    if args.dry_run:
        args.batch, args.seq, args.steps, args.warmup = min(args.batch, 2), min(args.seq, 32), 2, 1
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    from ddk.launcher import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group(target.dist_backend, rank=0, world_size=1)
    print(f"{target.name}; Llama shape {target.shape['hidden_size']} x {target.shape['num_hidden_layers']} layers, "
          f"vocab {target.shape['vocab_size']:,}, random weights; bf16 + FSDP2 (1 rank, {target.dist_backend}); "
          f"{args.batch} x {args.seq} tokens a step, k = {TOP_K}", flush=True)
    try:
        rows, ooms = rows_halving_on_oom(lambda chunk, batch: run(target, chunk, args, batch), args.batch,
                                         target.empty_cache)
    finally:
        dist.destroy_process_group()
    for r in rows:
        if "error" in r:
            print(f"{r['loss']:8s} {r['error']}", flush=True)
        else:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            print(f"{r['loss']:8s} {r['tokens_per_s']:>10,.0f} tokens/s  step {r['step_s']:.3f} s  MFU {mfu}  "
                  f"peak memory {r['peak_mem_gib']:.2f} GiB  batch {r['batch']}  "
                  f"loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}", flush=True)
    chunked = rows[0]
    if "error" in chunked:  # the chunked row is the part's point; a plain row out of memory is a result
        return {"ok": False, "error": f"chunked row: {chunked['error']}", "rows": rows}
    doc = {"rows": rows, "tokens_per_s": chunked["tokens_per_s"], "mfu": chunked["mfu"],
           "mfu_target": MFU_TARGET, "mfu_target_met": (chunked["mfu"] or 0) >= MFU_TARGET,
           "peak_mem_gib": chunked["peak_mem_gib"], "memory_measure": target.memory_measure,
           "batch_asked": args.batch, "batch": chunked["batch"], "out_of_memory_retries": ooms}
    if "error" not in rows[1]:
        doc["plain_over_chunked_tokens_per_s"] = rows[1]["tokens_per_s"] / chunked["tokens_per_s"]
    doc["ok"] = chunked["losses_finite"]
    if not doc["ok"]:
        doc["error"] = "the chunked loss is not finite"
    return doc


def main() -> int:
    p = parser("student", __doc__)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    return run_part("student", p.parse_args(), body)


if __name__ == "__main__":
    sys.exit(main())
