"""Student step: the chunked loss from the hidden states against the plain path (full logits), side by side.

Prints one table. One training step of a narrow Llama built on the spot (random weights, no download:
hidden 256, 4 layers, 4 heads, MLP 688) at a realistic vocabulary: forward through the base model to the
final hidden states, the loss (``ddk.trainer.loss.chunked_distill_loss``: ``chunk_tokens=0`` is the plain path,
full ``[B, T, V]`` logits and ``distill_loss``; the default, ``None``, is the chunked one with
``default_chunk_tokens(V)`` positions per chunk), backward. No optimizer step. Synthetic teacher: k distinct ids
per position with normalised log-probabilities (k + tail summing to 1), gamma 0.5, T = 1, forward KL.

Rows: vocab 32k and 128k x plain / chunked x fp32 / bf16 (``torch.autocast("cpu", dtype=torch.bfloat16)``
around the base model and the loss). Every row runs in a fresh subprocess, so its memory is its own:
  peak above baseline   ru_maxrss after the first step minus the RSS just before it, the model, its
                        gradient buffers (allocated beforehand: the same for every path) and the batch
                        already in place: the step's own peak, of which the loss path is the part that differs
  tokens/s              positions (batch x seq_len) over the median wall time of the timed steps after it
                        (``--steps 0``: of the measured step itself); tokens/CPU-s the same over the process's
                        CPU time (all its threads), which other tenants of a shared machine move less
Ratios: chunked / plain peak (target <= 0.25 at vocab 128k) and chunked / plain tokens/s (target >= 0.9).

Sizes. The plain path at 8 x 1024 and vocab 128k would hold several float32 [8192, 128000] tensors (4.2 GB
each) at once: far more than ~10 GB, so vocab 128k runs at 4 x 512 (printed with each row); vocab 32k runs at
8 x 1024. ``--quick``: vocab 32k at 4 x 512 and 128k at 2 x 256.

Evaluation rows (``--eval``, issue 23 item 5): one evaluation batch (8 x 512 positions; 4 x 512 with ``--quick``;
the full-logits path at 16 x 512 would hold three float32 [8192, 128000] tensors, 12 GiB) at vocabulary 128k, fp32, under ``torch.no_grad`` as evaluation runs, with a synthetic
teacher top-k: ``chunked`` is ``ddk.trainer.evaluate.block_sums`` (the training loss's chunked CE and divergence
from the hidden states, per block), ``full logits`` the evaluation before it (the model's ``[B, T, V]`` logits,
``.float()``, ``F.cross_entropy`` and ``topk_divergence`` on them, as ``evaluate.distill_sums`` did). Peak above
baseline as above; ratio chunked / full (target <= 0.25) and the CE and divergence sums of the two (same to 1e-5,
relative).

Run:  .venv/bin/python bench/student.py [--quick] [--steps 1] [--threads 2] [--only 32000] [--eval]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

FULL = [(32000, 8, 1024), (128000, 4, 512)]  # (vocab, batch, seq_len)
QUICK = [(32000, 4, 512), (128000, 2, 256)]
TOP_K = 16


def child(spec: dict) -> dict:
    """One row, in this (fresh) process: build, measure the first step's peak, time the next ones."""
    import psutil
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ddk.trainer.loss import chunked_distill_loss, default_chunk_tokens

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    V, B, T, k = spec["vocab"], spec["batch"], spec["seq_len"], TOP_K
    cfg = LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                      intermediate_size=688, vocab_size=V, max_position_embeddings=T,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.config.use_cache = False
    model.train()
    for p in model.parameters():  # gradient buffers up front, so they are not in the step's peak
        p.grad = torch.zeros_like(p)

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    stride = V // k  # k distinct teacher ids per position: one in each of k slices of the vocabulary
    t_ids = torch.randint(0, stride, (B, T, k), generator=g) + torch.arange(k) * stride
    t_logp = torch.log_softmax(torch.randn(B, T, k + 1, generator=g) * 2, -1)[..., :k].contiguous()
    chunk = 0 if spec["path"] == "plain" else None
    bf16 = spec["dtype"] == "bf16"

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            hidden = model.model(input_ids=ids).last_hidden_state
            loss, _ = chunked_distill_loss(hidden, model.lm_head.weight, labels, t_ids, t_logp, 0.5, 1.0,
                                               chunk_tokens=chunk)
        loss.backward()
        return float(loss.detach())

    # warm-up on a tiny batch with both paths: lazy imports, thread pools and kernels' first-use buffers are
    # then in the baseline, not in the measured step
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        hidden = model.model(input_ids=ids[:1, :8]).last_hidden_state
        for c in (0, None):
            loss, _ = chunked_distill_loss(hidden, model.lm_head.weight, labels[:1, :8], t_ids[:1, :8],
                                           t_logp[:1, :8], 0.5, 1.0, chunk_tokens=c)
            loss.backward(retain_graph=c == 0)
    for p in model.parameters():
        p.grad.zero_()

    proc = psutil.Process()
    rss_before = proc.memory_info().rss
    max_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0, c0 = time.perf_counter(), time.process_time()
    loss = step()
    first_s, first_cpu = time.perf_counter() - t0, time.process_time() - c0
    max_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times, cpu = [], []
    for _ in range(spec["steps"]):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    times.sort()
    cpu.sort()
    median = times[len(times) // 2] if times else first_s
    median_cpu = cpu[len(cpu) // 2] if cpu else first_cpu
    return {**spec, "chunk_tokens": 0 if chunk == 0 else default_chunk_tokens(V), "loss": loss,
            "rss_before": rss_before, "peak_rss": max_after, "peak_delta": max_after - rss_before,
            "peak_valid": max_after > max_before, "first_s": first_s, "step_s": median,
            "tokens_per_s": B * T / median,
            "cpu_s": median_cpu, "tokens_per_cpu_s": B * T / median_cpu}


EVAL_FULL, EVAL_QUICK = (128000, 8, 512), (128000, 4, 512)  # (vocab, batch, seq_len) of the evaluation rows


def child_eval(spec: dict) -> dict:
    """One evaluation row in this (fresh) process: the batch's CE and divergence sums and the peak above the
    baseline (the model and the batch in place, both paths warmed up on a tiny batch)."""
    import numpy as np
    import psutil
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from ddk.data.evalset import full_blocks
    from ddk.trainer.evaluate import TeacherAnswers, block_sums
    from ddk.trainer.loss import topk_divergence

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    V, B, T, k = spec["vocab"], spec["batch"], spec["seq_len"], TOP_K
    model = LlamaForCausalLM(LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                         num_key_value_heads=4, intermediate_size=688, vocab_size=V,
                                         max_position_embeddings=T + 1, tie_word_embeddings=False)).eval()
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, V, (B, T + 1), generator=g)
    stride = V // k
    t_ids = torch.randint(0, stride, (B, T, k), generator=g) + torch.arange(k) * stride
    t_lp = torch.log_softmax(torch.randn(B, T, k + 1, generator=g) * 2, -1)[..., :k].contiguous()
    kd = type("KD", (), dict(loss="forward_kl", temperature=1.0, beta=0.5, skew=0.1))

    @torch.no_grad()
    def full(n):  # the evaluation before issue 23 item 5 (evaluate.distill_sums): full logits in float32
        chunk = blocks[:n]
        logits = model(input_ids=chunk[:, :-1]).logits.float()
        labels = chunk[:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum").item()
        kl = topk_divergence(logits, labels, t_ids[:n], t_lp[:n], 1.0, "forward_kl", 0.5, 0.1).item() * labels.numel()
        return ce, kl

    def chunked(n):
        es = full_blocks(blocks[:n].numpy())
        sums = block_sums(model, es, B, "cpu", "fp32", None, TeacherAnswers(np.zeros(n), t_ids[:n], t_lp[:n]), kd,
                          hidden_ok=True)
        return float(sums["ce"].sum()), float(sums["kl"].sum())

    run = full if spec["path"] == "full" else chunked
    with torch.no_grad():  # warm-up on 8 positions: lazy imports, thread pools (not the step's own buffers)
        model(input_ids=blocks[:1, :8])
    block_sums(model, full_blocks(blocks[:1, :9].numpy()), 1, "cpu", hidden_ok=True)
    proc = psutil.Process()
    rss_before = proc.memory_info().rss
    max_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    ce, kl = run(B)
    seconds = time.perf_counter() - t0
    max_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {**spec, "ce": ce, "kl": kl, "peak_delta": max_after - rss_before, "peak_rss": max_after,
            "peak_valid": max_after > max_before, "seconds": seconds}


def eval_rows(args) -> int:
    vocab, batch, seq_len = EVAL_QUICK if args.quick else EVAL_FULL
    res = {}
    for path in ("full", "chunked"):
        res[path] = run_row(dict(vocab=vocab, batch=batch, seq_len=seq_len, path=path, threads=args.threads,
                                 eval=True))
        print(f"  ... eval {path} done", file=sys.stderr, flush=True)
    print(f"\nevaluation bench: one evaluation batch of {batch} x {seq_len} at vocabulary {vocab:,}, fp32, no_grad, "
          f"k = {TOP_K}, Llama hidden 256 x 4 layers, {args.threads} thread(s); load average {os.getloadavg()[0]:.2f}")
    for path, r in res.items():
        if "error" in r:
            print(f"  {path:<8} FAILED: {r['error'][:100]}")
            continue
        print(f"  {path:<8} peak above baseline {gib(r['peak_delta'])}{'' if r['peak_valid'] else ' (<= floor)'}  "
              f"peak RSS {gib(r['peak_rss'])}  {r['seconds']:.2f} s  CE sum {r['ce']:.6f}  divergence sum {r['kl']:.6f}")
    f, c = res["full"], res["chunked"]
    if "error" not in f and "error" not in c:
        mem = c["peak_delta"] / f["peak_delta"]
        ce_rel = abs(c["ce"] - f["ce"]) / abs(f["ce"])
        kl_rel = abs(c["kl"] - f["kl"]) / max(abs(f["kl"]), 1e-30)
        print(f"  chunked / full peak {mem:.3f} [target <= 0.25] {'met' if mem <= 0.25 else 'NOT met'};  "
              f"CE relative difference {ce_rel:.1e}, divergence {kl_rel:.1e} [target <= 1e-5] "
              f"{'met' if max(ce_rel, kl_rel) <= 1e-5 else 'NOT met'}")
    return 0


def run_row(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, cwd=REPO,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {**spec, "error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller batches, one timed step")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row after the first (default 1)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per row")
    ap.add_argument("--only", type=int, action="append", help="run only this vocabulary (repeatable)")
    ap.add_argument("--eval", action="store_true", help="the evaluation rows only (chunked vs full logits)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child_eval(spec) if spec.get("eval") else child(spec)))
        return 0
    if args.eval:
        return eval_rows(args)

    steps = args.steps if args.steps is not None else 1
    sizes = [s for s in (QUICK if args.quick else FULL) if not args.only or s[0] in args.only]
    load_start, t_start = os.getloadavg(), time.time()
    results = []
    for vocab, batch, seq_len in sizes:
        for dtype in ("fp32", "bf16"):
            for path in ("plain", "chunked"):  # the pair side by side, one right after the other
                spec = dict(vocab=vocab, batch=batch, seq_len=seq_len, dtype=dtype, path=path, steps=steps,
                            threads=args.threads)
                results.append(run_row(spec))
                print(f"  ... {vocab} {batch}x{seq_len} {dtype} {path} done", file=sys.stderr, flush=True)
    load = os.getloadavg()

    print(f"\nstudent bench: Llama hidden 256 x 4 layers (4 heads, MLP 688), k = {TOP_K}, forward + loss + backward, "
          f"{args.threads} thread(s), {steps} timed step(s) per row (median) after the measured first one, "
          f"{'quick' if args.quick else 'full'} sizes; load average at the start {load_start[0]:.2f}, at the end "
          f"{load[0]:.2f}; {time.time() - t_start:.0f} s")
    if not args.quick:
        print("  vocab 128k at 4 x 512, not 8 x 1024: the plain path at 8 x 1024 would need well over 10 GB")
    header = ("vocab", "batch x len", "dtype", "path", "chunk", "peak above baseline", "peak RSS", "tokens/s",
              "step s", "tokens/CPU-s", "loss")
    rows = []
    for r in results:
        if "error" in r:
            rows.append((f"{r['vocab']:,}", f"{r['batch']} x {r['seq_len']}", r["dtype"], r["path"], "", "FAILED",
                         "", "", "", "", r["error"][:60]))
            continue
        rows.append((f"{r['vocab']:,}", f"{r['batch']} x {r['seq_len']}", r["dtype"], r["path"],
                     str(r["chunk_tokens"]) if r["chunk_tokens"] else "-",
                     gib(r["peak_delta"]) + ("" if r["peak_valid"] else " (<= floor)"), gib(r["peak_rss"]),
                     f"{r['tokens_per_s']:,.0f}", f"{r['step_s']:.2f}", f"{r['tokens_per_cpu_s']:,.0f}",
                     f"{r['loss']:.4f}"))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print("  " + "  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)))

    print("\n  ratios chunked / plain (same vocab, batch, dtype):")
    by = {(r["vocab"], r["dtype"], r["path"]): r for r in results if "error" not in r}
    for vocab, batch, seq_len in sizes:
        for dtype in ("fp32", "bf16"):
            p, c = by.get((vocab, dtype, "plain")), by.get((vocab, dtype, "chunked"))
            if not (p and c):
                continue
            mem = c["peak_delta"] / p["peak_delta"]
            tps = c["tokens_per_s"] / p["tokens_per_s"]
            mem_note = ("met" if mem <= 0.25 else f"NOT met ({mem / 0.25:.2f} x the target)") \
                if vocab >= 128000 else "(target at vocab 128k only)"
            tps_note = "met" if tps >= 0.9 else f"NOT met ({tps / 0.9:.2f} x the target)"
            cps = c["tokens_per_cpu_s"] / p["tokens_per_cpu_s"]
            same = abs(c["loss"] - p["loss"]) <= 1e-3 * max(1.0, abs(p["loss"]))
            print(f"    vocab {vocab:>7,} {dtype}: peak {mem:.3f} [target <= 0.25] {mem_note};  "
                  f"tokens/s {tps:.3f} [target >= 0.9] {tps_note} (by CPU time {cps:.3f});  "
                  f"same loss: {'yes' if same else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
