"""Each divergence of ``kd.loss``, forward + backward, in tokens/s relative to ``forward_kl`` (issue 14).

The plain path (:func:`ddk.trainer.loss.distill_loss` on full logits) and the chunked one
(:func:`ddk.trainer.loss.chunked_distill_loss` from hidden states), at a realistic vocabulary, synthetic student
and teacher (k = 16). The divergences run in one process, interleaved over several rounds, so a change of load
hits them alike; each figure is the median of its rounds. Prints a table; never asserts on time.

    .venv/bin/python bench/losses.py [--vocab 32000] [--tokens 2048] [--hidden 256] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from ddk.trainer.loss import LOSSES, chunked_distill_loss, distill_loss


def inputs(tokens: int, hidden: int, vocab: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(1, tokens, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * hidden ** -0.5
    labels = torch.randint(0, vocab, (1, tokens), generator=g)
    t_ids = torch.randint(0, vocab, (1, tokens, k), generator=g)
    t_lp = torch.log_softmax(torch.randn(1, tokens, k, generator=g).sort(-1, descending=True).values, -1) - 0.1
    return h, w, labels, t_ids, t_lp


def one(path: str, loss: str, h, w, labels, t_ids, t_lp) -> float:
    h = h.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    t0 = time.perf_counter()
    if path == "plain":
        total, _ = distill_loss(h @ w.T, labels, t_ids, t_lp, 0.2, 1.0, loss=loss)
    else:
        total, _ = chunked_distill_loss(h, w, labels, t_ids, t_lp, 0.2, 1.0, loss=loss)
    total.backward()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    x = inputs(args.tokens, args.hidden, args.vocab, 16)
    times = {(path, loss): [] for path in ("plain", "chunked") for loss in LOSSES}
    for path, loss in times:  # warm-up
        one(path, loss, *x)
    for _ in range(args.rounds):
        for key in times:
            times[key].append(one(*key, *x))
    print(f"loss forward + backward, {args.tokens} tokens, vocab {args.vocab:,}, hidden {args.hidden}, k 16, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds; load average "
          f"{os.getloadavg()[0]:.2f}")
    print(f"| {'divergence':10s} | {'plain tok/s':>11s} | {'vs forward_kl':>13s} | {'chunked tok/s':>13s} | "
          f"{'vs forward_kl':>13s} |")
    print(f"|{'-' * 12}|{'-' * 13}|{'-' * 15}|{'-' * 15}|{'-' * 15}|")
    base = {path: statistics.median(times[(path, "forward_kl")]) for path in ("plain", "chunked")}
    for loss in LOSSES:
        cells = []
        for path in ("plain", "chunked"):
            t = statistics.median(times[(path, loss)])
            cells += [f"{args.tokens / t:11,.0f}", f"{base[path] / t:13.3f}"]
        print(f"| {loss:10s} | {cells[0]} | {cells[1]} | {cells[2]:>13s} | {cells[3]} |")
    print("target: each >= 0.9 x forward_kl")


if __name__ == "__main__":
    main()
