"""The teacher service on the real teacher (``ddk fixtures --real``): vLLM CPU engine against transformers.

    .venv/bin/python bench/real_service.py [--kit DIR] [--requests 8] [--seq 256] [--top-k 16] [--reps 5]

Starts ``ddk teacher serve --backend vllm`` and ``--backend hf`` on the kit's teacher/ as real processes (both up
at once, as bench/teacher.py starts its servers) and sends each --requests concurrent requests, one sequence of
--seq tokens each (real validation text, round-robin over the kit's domains), top-k --top-k, float16 frames
(``TeacherClient``). Timed in interleaved rounds (bench/teacher.py's ``rounds``: one warm-up each, then --reps
rounds calling each service in turn; the median per service), so the shared machine's changing load falls on
both alike. Prints tokens/s (input tokens scored per second) of each engine, the ratio vLLM / hf, each
server's start-up time and peak RSS, and the load average (``os.getloadavg``) at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from teacher import REPO, RssWatch, ddk_service_argv, fmt_gib, rounds  # noqa: I001  (sets OMP_WAIT_POLICY first)
from common import start_server


def real_blocks(kit: Path, n: int, seq: int) -> torch.Tensor:
    """``n`` blocks of ``seq`` token ids from the kit's validation text, round-robin over its domains."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(kit / "teacher")
    per_domain = []
    for val in sorted((kit / "data").glob("*/val.jsonl")):
        text = "\n".join(json.loads(line)["text"] for line in val.read_text().splitlines()[:50])
        ids = tok(text, add_special_tokens=False).input_ids
        per_domain.append([ids[i * seq:(i + 1) * seq] for i in range(len(ids) // seq)])
    rows = [per_domain[i % len(per_domain)][i // len(per_domain)] for i in range(n)]
    return torch.tensor(rows, dtype=torch.int64)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kit", default=str(REPO / ".cache" / "kit-real"))
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.15, help="vLLM on CPU (default 0.15)")
    args = ap.parse_args()

    from ddk.teacher.client import TeacherClient

    kit = Path(args.kit)
    model = kit / "teacher"
    ids = real_blocks(kit, args.requests, args.seq)
    workdir = Path(tempfile.mkdtemp(prefix="ddk-bench-real-service-"))
    print(f"teacher {model}; {args.requests} concurrent requests of 1 x {args.seq} tokens, top-k {args.top_k}, "
          f"{args.reps} interleaved rounds; {os.cpu_count()} CPUs; logs in {workdir}", flush=True)
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    extra = {"hf": [], "vllm": ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]}
    procs, watches, start_s, clients = {}, {}, {}, {}
    pool = ThreadPoolExecutor(args.requests)
    rows = list(ids.split(1))
    try:
        for backend in ("vllm", "hf"):
            t0 = time.perf_counter()
            url, procs[backend] = start_server(
                ddk_service_argv(backend, model, args.top_k, ["--max-seq-len", str(args.seq), *extra[backend]]),
                workdir / f"serve-{backend}.log")
            start_s[backend] = time.perf_counter() - t0
            print(f"  {backend} service up in {start_s[backend]:.1f} s", flush=True)
            watches[backend] = RssWatch(procs[backend].pid)
            clients[backend] = [TeacherClient(url, dtype="float16") for _ in rows]

        def burst(backend):
            return list(pool.map(lambda cr: cr[0].topk(cr[1], args.top_k), zip(clients[backend], rows)))

        answers = {b: burst(b) for b in clients}
        diff = max(float((a.logprobs.float() - b.logprobs.float()).abs().max())
                   for a, b in zip(answers["vllm"], answers["hf"]))
        sec = rounds({b: (lambda b=b: burst(b)) for b in clients}, args.reps)
    finally:
        rss = {b: w.stop() for b, w in watches.items()}
        for c in sum(clients.values(), []):
            c.close()
        for p in procs.values():
            p.stop(timeout=30)
        pool.shutdown()
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    tok_s = {b: ids.numel() / s for b, s in sec.items()}
    print(f"\n| engine | tokens/s (median of {args.reps}) | start s | peak RSS |\n|---|---:|---:|---:|")
    for b in ("vllm", "hf"):
        print(f"| {b} | {tok_s[b]:,.0f} | {start_s[b]:.1f} | {fmt_gib(rss[b])} |")
    print(f"\nvllm / hf tokens/s = {tok_s['vllm'] / tok_s['hf']:.2f}; "
          f"largest |vllm - hf| top-{args.top_k} logprob (float16 frames) {diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
