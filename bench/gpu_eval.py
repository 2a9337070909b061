"""One evaluation batch at a 128k vocabulary: peak memory of the chunked loss against the full-logits path.

The Llama-3.2-1B shape (vocabulary 128,256) in bf16 with random weights, under ``torch.no_grad`` as evaluation
runs, one batch of ``--batch x --seq`` tokens with synthetic teacher top-k (k = 16):
  chunked      the student's final hidden states (:func:`ddk.trainer.scale.last_hidden_states`) and
               :func:`ddk.trainer.loss.chunked_distill_loss` (the output projection inside each chunk)
  full logits  the model's own ``[B, T, V]`` logits and :func:`ddk.trainer.loss.distill_loss`; its CE is also
               computed by ``F.cross_entropy`` on those logits, the textbook reference for both
Peak memory of each is the peak above what the model and the batch already hold (GPU: max_memory_allocated
after a reset). Target: chunked / full peak well under 1 (the step's bench aims at <= 0.25), the same CE and
KL to bf16 rounding.

``--dry-run``: the same code on the CPU with a tiny Llama (bench/gpu_common.py).
"""

from __future__ import annotations

import sys
import time

from gpu_common import llama, one_line, parser, run_part

TOP_K = 16


def body(target, args) -> dict:
    import torch
    import torch.nn.functional as F

    from ddk.trainer.loss import chunked_distill_loss, default_chunk_tokens, distill_loss
    from ddk.trainer.scale import last_hidden_states

    if args.dry_run:
        args.batch, args.seq = min(args.batch, 2), min(args.seq, 64)
        args.chunk_tokens = args.chunk_tokens or 16  # several chunks, as at 128k
    torch.manual_seed(0)
    model = llama(target, torch.bfloat16).eval()
    vocab = model.config.vocab_size
    gen = target.generator(1)
    ids = torch.randint(0, vocab, (args.batch, args.seq + 1), device=target.device, generator=gen)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    stride = vocab // TOP_K  # k distinct teacher ids per position
    t_ids = torch.randint(0, stride, (args.batch, args.seq, TOP_K), device=target.device, generator=gen) \
        + torch.arange(TOP_K, device=target.device) * stride
    t_lp = torch.log_softmax(torch.randn(args.batch, args.seq, TOP_K + 1, device=target.device, generator=gen) * 2,
                             -1)[..., :TOP_K].contiguous()
    head = model.get_output_embeddings().weight
    chunk = args.chunk_tokens or default_chunk_tokens(vocab)
    gamma = 0.5

    def chunked():
        hidden = last_hidden_states(model, inputs)
        total, parts = chunked_distill_loss(hidden, head, labels, t_ids, t_lp, gamma, 1.0, chunk_tokens=chunk)
        return parts["ce"], parts["kl"], None

    def full():
        logits = model(input_ids=inputs, use_cache=False).logits
        total, parts = distill_loss(logits, labels, t_ids, t_lp, gamma, 1.0)
        ce_ref = F.cross_entropy(logits.float().reshape(-1, vocab), labels.reshape(-1))
        return parts["ce"], parts["kl"], ce_ref

    rows = {}
    with torch.no_grad():
        for name, fn in (("chunked", chunked), ("full", full), ("chunked_again", chunked)):
            target.empty_cache()
            target.reset_peak()
            base = target.allocated()
            target.sync()
            t0 = time.perf_counter()
            oom = None
            try:
                ce, kl, ce_ref = fn()
            except torch.OutOfMemoryError as e:
                if name != "full":  # the chunked path must fit; the full logits out of memory is a result
                    raise
                oom = f"out of memory: {one_line(e)}"[:300]
            if oom:
                target.empty_cache()
                rows[name] = {"error": oom}
                print(f"full logits: {oom}", flush=True)
                continue
            target.sync()
            seconds = time.perf_counter() - t0
            rows[name] = {"peak_above_gib": max(0, target.peak() - base) / 2**30, "seconds": seconds,
                          "ce": float(ce), "kl": float(kl)}
            if ce_ref is not None:
                rows[name]["ce_reference"] = float(ce_ref)
            del ce, kl, ce_ref
    c, f = rows["chunked_again"], rows["full"]  # the second chunked pass: kernels and allocator warm
    if "error" in f:
        ok = c["ce"] == c["ce"] and c["kl"] == c["kl"]  # finite enough: NaN is the failure here
        return {"vocab": vocab, "batch": args.batch, "seq": args.seq, "chunk_tokens": chunk, "rows": rows,
                "chunked_peak_gib": c["peak_above_gib"], "full_peak_gib": None, "full_error": f["error"],
                "memory_measure": target.memory_measure, "ok": ok}
    print(f"{target.name}; vocab {vocab:,}, batch {args.batch} x {args.seq}, bf16, no_grad; peak above the model "
          f"and batch: chunked {c['peak_above_gib']:.3f} GiB, full logits {f['peak_above_gib']:.3f} GiB; "
          f"CE {c['ce']:.4f} vs {f['ce']:.4f} (F.cross_entropy {f['ce_reference']:.4f}); "
          f"KL {c['kl']:.4f} vs {f['kl']:.4f}", flush=True)
    ratio = c["peak_above_gib"] / f["peak_above_gib"] if f["peak_above_gib"] > 0 else None
    tol = 2e-2 * max(1.0, abs(f["ce_reference"]))  # bf16 logits: a few parts in a thousand
    same = abs(c["ce"] - f["ce_reference"]) <= tol and abs(c["kl"] - f["kl"]) <= tol
    doc = {"vocab": vocab, "batch": args.batch, "seq": args.seq, "chunk_tokens": chunk,
           "rows": rows, "chunked_peak_gib": c["peak_above_gib"], "full_peak_gib": f["peak_above_gib"],
           "chunked_over_full_peak": ratio, "chunked_over_full_seconds": c["seconds"] / f["seconds"],
           "ce_abs_diff": abs(c["ce"] - f["ce_reference"]), "kl_abs_diff": abs(c["kl"] - f["kl"]),
           "same_loss": same, "memory_measure": target.memory_measure, "ok": same}
    if not same:
        doc["error"] = f"the chunked and full-logits losses differ beyond {tol:.3g}"
    return doc


def main() -> int:
    p = parser("eval", __doc__)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--chunk-tokens", type=int, default=None, help="default: default_chunk_tokens(vocab)")
    return run_part("eval", p.parse_args(), body)


if __name__ == "__main__":
    sys.exit(main())
