"""Student step at the real kit's shapes: the chunked loss against the plain path (full logits), side by side.

    .venv/bin/python bench/real_student.py [--kit DIR] [--batch 4] [--rounds 3] [--steps 2] [--threads 2]

The real kit's student (``ddk fixtures --real``: 20 Llama layers, hidden 576, vocabulary 49,152, tied
embeddings, float32), a batch of --batch validation blocks of the kit's seq_len (256) tokens of real text, one
training step: forward through the base model, ``ddk.trainer.loss.chunked_distill_loss`` (``chunk_tokens=0``:
the plain path, full ``[B, T, V]`` logits and ``distill_loss``; default: the chunked path,
``default_chunk_tokens(V)`` positions per chunk), backward; no optimizer step. Synthetic teacher top-k as
bench/student.py makes it (k = 16 distinct ids per position, normalised log-probabilities, gamma 0.5, T = 1).

Each (round, path) runs in a fresh subprocess, so its memory is its own. Memory: ``resource.getrusage``'s
``ru_maxrss`` after the first step minus the RSS (psutil) just before it, with the model, its gradient buffers
(allocated beforehand) and the batch in place: the step's own peak (bench/student.py's definition). tokens/s:
batch x seq_len over the median of --steps timed steps after the first. The rounds interleave the two paths
(plain then chunked, then chunked then plain, ...) so both see the same load; the medians over rounds are
printed, with the ratios chunked / plain and the load average at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from student import TOP_K, gib

REPO = Path(__file__).resolve().parent.parent


def child(spec: dict) -> dict:
    """One (round, path) in this fresh process: load, warm up, the first step's peak, then the timed steps."""
    import psutil
    import torch
    from transformers import AutoModelForCausalLM

    from ddk.trainer.loss import chunked_distill_loss, default_chunk_tokens
    from real_service import real_blocks

    torch.set_num_threads(spec["threads"])
    kit = Path(spec["kit"])
    seq = json.loads((kit / "kit.json").read_text())["seq_len"]
    model = AutoModelForCausalLM.from_pretrained(kit / "student", dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    for p in model.parameters():  # gradient buffers up front, so they are not in the step's peak
        p.grad = torch.zeros_like(p)
    V, B, k = model.config.vocab_size, spec["batch"], TOP_K
    blocks = real_blocks(kit, B, seq + 1)
    ids, labels = blocks[:, :-1], blocks[:, 1:]
    g = torch.Generator().manual_seed(1)
    stride = V // k  # k distinct teacher ids per position, one in each of k slices of the vocabulary
    t_ids = torch.randint(0, stride, (B, seq, k), generator=g) + torch.arange(k) * stride
    t_logp = torch.log_softmax(torch.randn(B, seq, k + 1, generator=g) * 2, -1)[..., :k].contiguous()
    chunk = 0 if spec["path"] == "plain" else None

    def step(n=B, length=seq, c=chunk):
        hidden = model.model(input_ids=ids[:n, :length]).last_hidden_state
        loss, _ = chunked_distill_loss(hidden, model.lm_head.weight, labels[:n, :length], t_ids[:n, :length],
                                       t_logp[:n, :length], 0.5, 1.0, chunk_tokens=c)
        loss.backward()
        return float(loss.detach())

    for c in (0, None):  # warm-up on 8 positions with both paths: lazy imports, thread pools in the baseline
        step(1, 8, c)
    for p in model.parameters():
        p.grad.zero_()
    rss_before = psutil.Process().memory_info().rss
    max_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss = step()
    max_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {**spec, "vocab": V, "seq_len": seq, "loss": loss, "peak_delta": max_after - rss_before,
            "peak_valid": max_after > max_before, "chunk_tokens": chunk if chunk == 0 else default_chunk_tokens(V),
            "tokens_per_s": B * seq / statistics.median(times)}


def run_child(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, cwd=REPO,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{spec['path']} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kit", default=str(REPO / ".cache" / "kit-real"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per process after the first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    load0, t0 = os.getloadavg(), time.time()
    res = {"plain": [], "chunked": []}
    for r in range(args.rounds):
        for path in (("plain", "chunked") if r % 2 == 0 else ("chunked", "plain")):
            res[path].append(run_child(dict(kit=args.kit, batch=args.batch, path=path, steps=args.steps,
                                            threads=args.threads)))
            print(f"  ... round {r + 1} {path}: {res[path][-1]['tokens_per_s']:,.0f} tokens/s, peak above "
                  f"baseline {gib(res[path][-1]['peak_delta'])}", file=sys.stderr, flush=True)
    load1 = os.getloadavg()
    first = res["plain"][0]
    print(f"\nreal student step: {args.batch} x {first['seq_len']} tokens, vocabulary {first['vocab']:,}, fp32, "
          f"k = {TOP_K}, forward + loss + backward, {args.threads} threads; {args.rounds} rounds (fresh process "
          f"per round and path), {args.steps} timed steps each; load average {load0[0]:.2f} at the start, "
          f"{load1[0]:.2f} at the end; {time.time() - t0:.0f} s")
    med = {}
    print("| path | chunk | peak above baseline (median) | tokens/s (median) | loss |\n|---|---:|---:|---:|---:|")
    for path, rows in res.items():
        med[path] = {key: statistics.median(r[key] for r in rows) for key in ("peak_delta", "tokens_per_s")}
        print(f"| {path} | {rows[0]['chunk_tokens'] or '-'} | {gib(med[path]['peak_delta'])} "
              f"| {med[path]['tokens_per_s']:,.0f} | {rows[0]['loss']:.5f} |")
    p, c = med["plain"], med["chunked"]
    print(f"\nchunked / plain: peak {c['peak_delta'] / p['peak_delta']:.3f}, tokens/s "
          f"{c['tokens_per_s'] / p['tokens_per_s']:.3f}; |loss difference| "
          f"{abs(res['chunked'][0]['loss'] - res['plain'][0]['loss']):.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
