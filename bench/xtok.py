"""Cross-tokenizer foundation (issue 29): the cost of ``xtok_distill_loss`` against ``distill_loss`` and of the
alignment, on CPU, one thread. Prints numbers and ratios; asserts nothing about time.

  loss   forward + backward on ``[B, T, V]`` random logits, top-k random teacher: ``distill_loss`` (today's path),
         ``xtok_distill_loss`` with the identity alignment (every id shared), and with half the vocabulary
         unshared (so the ULD term does work); best of ``--repeat``.
  align  the quick kit's tokenizer on 12,000 characters of services/trainer/loss.py: byte spans from offsets,
         from pieces, from ids (a byte-length table), and ``align_groups`` + ``compared_positions``.

    .venv/bin/python bench/xtok.py [--B 4 --T 256 --V 8192 --k 16 --repeat 5]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ddk.trainer.align import (align_groups, byte_spans, compared_positions, spans_from_ids, vocab_byte_lengths)
from ddk.trainer.loss import distill_loss
from ddk.trainer.xtok_loss import identity_positions, xtok_distill_loss

REPO = Path(__file__).resolve().parents[1]


def best(f, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--T", type=int, default=256)
    ap.add_argument("--V", type=int, default=8192)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--tokenizer", default=str(REPO / ".cache" / "kit-quick" / "student" / "tokenizer.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    B, T, V, k = a.B, a.T, a.V, a.k
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, -1] = -100
    t_lp, t_ids = torch.log_softmax(torch.randn(B, T, V, generator=g), -1).topk(k, -1)
    pos = identity_positions(labels)
    g_ids, g_lp = t_ids.reshape(-1, k)[pos], t_lp.reshape(-1, k)[pos]
    ident, shared = torch.arange(V), torch.ones(V, dtype=torch.bool)
    half, half_shared = ident.clone(), shared.clone()
    half[V // 2:] = -1
    half_shared[V // 2:] = False

    def step(fn):
        def run():
            x = logits.clone().requires_grad_(True)
            fn(x)[0].backward()
        return run

    base = best(step(lambda x: distill_loss(x, labels, t_ids, t_lp, 1.0, 1.0)), a.repeat)
    same = best(step(lambda x: xtok_distill_loss(x, labels, pos, g_ids, g_lp, ident, shared, 1.0, 1.0)), a.repeat)
    halfs = best(step(lambda x: xtok_distill_loss(x, labels, pos, g_ids, g_lp, half, half_shared, 1.0, 1.0)),
                 a.repeat)
    print(f"loss fwd+bwd B={B} T={T} V={V} k={k}: distill_loss {base * 1e3:.1f} ms; xtok identity "
          f"{same * 1e3:.1f} ms (x{same / base:.2f}); xtok half shared {halfs * 1e3:.1f} ms (x{halfs / base:.2f})")

    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(a.tokenizer)
    text = (REPO / "services" / "trainer" / "loss.py").read_text(encoding="utf-8")[:12000]
    enc = tok.encode(text, add_special_tokens=False)
    offsets, pieces, ids = enc.offsets, enc.tokens, enc.ids
    table = vocab_byte_lengths(tok.get_vocab(), "byte_level", [t.content for t in tok.get_added_tokens_decoder().values()])
    t_off = best(lambda: byte_spans(text, offsets), a.repeat)
    t_pc = best(lambda: byte_spans(text, offsets, pieces, "byte_level"), a.repeat)
    t_id = best(lambda: spans_from_ids(ids, table), a.repeat)
    s1, s2 = byte_spans(text, offsets, pieces, "byte_level"), byte_spans(text, offsets)
    t_al = best(lambda: compared_positions(align_groups(s1, s2)), a.repeat)
    print(f"align {len(ids)} tokens, {len(text.encode())} bytes: spans from offsets {t_off * 1e3:.2f} ms, from "
          f"pieces {t_pc * 1e3:.2f} ms, from ids {t_id * 1e3:.2f} ms; align_groups + compared_positions "
          f"{t_al * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
