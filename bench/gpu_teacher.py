"""The transformers teacher engine on the GPU: prefill tokens/s and MFU, in-process and through the service.

A random Llama at Llama-3.2-1B's shape (vocabulary 128,256, tied embeddings) saved in bf16 to a temporary
folder, then scored at top-k 16 two ways, both up at once and timed in interleaved rounds (one warm-up each,
then ``--reps`` rounds; the median per row):
  in-process   ``ddk.teacher.engines.HFEngine.topk`` called from one worker thread, as the service's batcher does
  service      ``ddk teacher serve --backend hf`` (a real uvicorn server on loopback, its own process and its
               own copy of the model on the same GPU) and ``TeacherClient.topk`` (binary frames, float16)
tokens = input tokens scored (batch x seq); MFU = 2 x params x tokens/s / the card's dense bf16 peak (the
forward's FLOPs, attention left out). Ratio service / in-process (the CPU target is >= 0.9). The two answers
are compared too (same top-k ids; log-probabilities within float16 rounding).

vLLM is not measured here: its wheels cannot travel to the GPU machine (bench/gpu_common.py VLLM_NOTE).

``--dry-run``: the same code on the CPU with a tiny Llama (bench/gpu_common.py).
"""

from __future__ import annotations

import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gpu_common import VLLM_NOTE, llama, median, parser, run_part

TOP_K = 16


def body(target, args) -> dict:
    if args.dry_run:
        args.batch, args.seq, args.reps = min(args.batch, 4), min(args.seq, 64), min(args.reps, 2)
    with tempfile.TemporaryDirectory(prefix="ddk-gpu-teacher-") as tmp:
        return measure(target, args, Path(tmp))


def measure(target, args, work: Path) -> dict:
    import numpy as np
    import torch

    from common import start_server
    from ddk.teacher.client import TeacherClient
    from ddk.teacher.engines import HFEngine

    model_dir = work / "llama"
    torch.manual_seed(0)
    model = llama(target, torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    model.save_pretrained(model_dir, safe_serialization=True)
    del model
    target.empty_cache()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
    seqs = [row for row in ids.numpy()]
    tokens = args.batch * args.seq
    peak, peak_source = target.peak_tflops(args.peak_tflops)
    print(f"{target.name}; random Llama {params / 1e9:.3f}B params (vocab {vocab:,}) in bf16; batch {args.batch} x "
          f"{args.seq}, top-k {TOP_K}; peak {peak} TFLOP/s ({peak_source})", flush=True)
    print(VLLM_NOTE, flush=True)

    cmd = [sys.executable, "-m", "ddk.cli", "teacher", "serve", "--model", str(model_dir), "--backend", "hf",
           "--dtype", "bfloat16", "--max-top-k", str(TOP_K), "--max-batch-tokens", str(max(tokens, 2)),
           "--max-seq-len", str(args.seq)]
    log_path = work / "serve.log"
    t0 = time.perf_counter()
    try:
        url, proc = start_server(cmd, log_path, timeout=args.server_timeout)
    except Exception as e:
        tail = log_path.read_text(errors="replace")[-1500:] if log_path.is_file() else ""
        print(f"the teacher service did not come up; its log's tail:\n{tail}", flush=True)
        last = [ln.strip() for ln in tail.splitlines() if ln.strip()]
        raise RuntimeError(f"the teacher service did not come up: {last[-1] if last else e}") from e
    start_s = time.perf_counter() - t0
    engine_thread = ThreadPoolExecutor(1, thread_name_prefix="engine")
    client = None
    try:
        t0 = time.perf_counter()
        engine = HFEngine(model_dir, dtype="bfloat16", device=str(target.device), max_top_k=TOP_K,
                          max_seq_len=args.seq)
        load_s = time.perf_counter() - t0
        client = TeacherClient(url, dtype="float16", timeout=600)
        fns = {"in_process": lambda: engine_thread.submit(engine.topk, seqs, TOP_K).result(),
               "service": lambda: client.topk(ids, TOP_K)}
        answers = {name: fn() for name, fn in fns.items()}  # the warm-up, kept for the comparison
        times = {name: [] for name in fns}
        for _ in range(args.reps):
            for name, fn in fns.items():
                target.sync()
                t0 = time.perf_counter()
                fn()
                target.sync()
                times[name].append(time.perf_counter() - t0)
        mine = answers["in_process"]
        a_ids = np.stack([t.ids for t in mine]).astype(np.int64)
        a_lp = np.stack([t.logprobs for t in mine])
        s = answers["service"]
        s_ids, s_lp = s.ids.numpy(), s.logprobs.numpy()
        same_ids = float((a_ids == s_ids).mean())
        lp_diff = float(np.abs(a_lp - s_lp).max())
        engine.close()
    finally:
        engine_thread.shutdown()
        if client is not None:
            client.close()
        proc.stop(timeout=30)
    rows = {}
    for name, ts in times.items():
        sec = median(ts)
        tps = tokens / sec
        rows[name] = {"seconds": sec, "tokens_per_s": tps,
                      "mfu": 2 * params * tps / (peak * 1e12) if peak else None}
        mfu = f"{100 * rows[name]['mfu']:.1f}%" if rows[name]["mfu"] is not None else "n/a"
        print(f"  {name:10s} {tps:>12,.0f} tokens/s  ({sec:.3f} s a batch)  MFU {mfu}", flush=True)
    ratio = rows["service"]["tokens_per_s"] / rows["in_process"]["tokens_per_s"]
    print(f"  service / in-process = {ratio:.3f}; the same top-k ids at {100 * same_ids:.2f}% of entries, "
          f"log-probabilities within {lp_diff:.2e}", flush=True)
    # float16 on the wire: |logprob| up to ~20 -> steps of ~0.01; bf16 ties may reorder near-equal ids
    agree = same_ids >= 0.99 and lp_diff <= 0.05
    doc = {"params": params, "vocab": vocab, "batch": args.batch, "seq": args.seq, "top_k": TOP_K,
           "reps": args.reps, "peak_tflops": peak, "peak_tflops_source": peak_source, "rows": rows,
           "in_process_tokens_per_s": rows["in_process"]["tokens_per_s"],
           "service_tokens_per_s": rows["service"]["tokens_per_s"], "in_process_mfu": rows["in_process"]["mfu"],
           "service_mfu": rows["service"]["mfu"], "service_over_in_process": ratio, "service_start_s": start_s,
           "engine_load_s": load_s, "same_ids_fraction": same_ids, "max_logprob_diff": lp_diff,
           "answers_agree": agree, "vllm": VLLM_NOTE, "ok": agree}
    if not agree:
        doc["error"] = (f"the service's answer differs from the in-process engine's (ids equal at {same_ids:.4f}, "
                        f"log-probabilities within {lp_diff:.3g})")
    return doc


def main() -> int:
    p = parser("teacher", __doc__)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--server-timeout", type=float, default=120.0, help="seconds for the service to come up")
    return run_part("teacher", p.parse_args(), body)


if __name__ == "__main__":
    sys.exit(main())
