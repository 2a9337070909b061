"""Top-k store encodings: bytes per entry and the top-k KL error of each, against float32.

Data: the quick kit's teacher (``ddk fixtures --quick``, built when absent) scores --sequences validation blocks
of --seq tokens from every domain of the kit (HFEngine, float32, in-process); its top-k answers are encoded
with each store encoding and decoded again. An *entry* is one (position, token) pair of the top-k, so bytes per
entry = blob bytes / (positions x k), the per-row and per-blob headers and the target logprob included.

KL error: ``ddk.trainer.loss.topk_kl`` (forward KL on the top-k + tail bucket, T = 1, mean over positions)
between the decoded teacher and the kit's student on the same blocks, relative to the float32 value; also the
worst such relative error over single sequences, and the largest absolute logprob error. The bytes are also
given for the ids of a 128,256-token vocabulary (Llama 3's: 17 bits, 3 whole bytes), as a stand-in for a large
teacher: the kit's ids are mapped one to one onto ids spread over 0..128,255 (a fixed random injection, seed 0),
so the blob holds the same answers with ids of a large vocabulary. It keeps the kit's id statistics (how many
distinct ids a sequence's top-k lists name); a large real teacher names more, which costs compact more.

Run:  .venv/bin/python bench/store.py [--kit .cache/kit-quick] [--top-k 16 64] [--seq 128] [--sequences 16]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from common import REPO

BIG_VOCAB = 128256


def load_blocks(kit: Path, seq: int, per_domain: int) -> np.ndarray:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(kit / "teacher")
    rows = []
    for val in sorted((kit / "data").glob("*/val.jsonl")):
        text = "\n".join(json.loads(line)["text"] for line in val.read_text().splitlines()[:400])
        ids = tok(text)["input_ids"]
        rows += [ids[i * seq:(i + 1) * seq] for i in range(per_domain) if len(ids) >= (i + 1) * seq]
    return np.array(rows, dtype=np.int64)


def measure(kit: Path, ks: list[int], seq: int, per_domain: int) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from ddk.teacher.engines import HFEngine
    from ddk.teacher.store import ENCODINGS, decode_entry, encode_entry
    from ddk.trainer.loss import topk_kl

    blocks = load_blocks(kit, seq, per_domain)
    engine = HFEngine(kit / "teacher", dtype="float32", device="cpu")
    student = AutoModelForCausalLM.from_pretrained(kit / "student", dtype=torch.float32).eval()
    with torch.inference_mode():
        s_logits = student(input_ids=torch.from_numpy(blocks)).logits[:, :-1].float()
    labels = torch.from_numpy(blocks[:, 1:])
    lift = np.random.default_rng(0).choice(BIG_VOCAB, size=engine.vocab_size, replace=False)
    out = []
    for k in ks:
        res = engine.topk(list(blocks), k)
        ids = torch.from_numpy(np.stack([r.ids for r in res]).astype(np.int64))
        ref_lp = np.stack([r.logprobs for r in res])
        ref = topk_kl(s_logits, labels, ids, torch.from_numpy(ref_lp)).item()
        ref_seq = [topk_kl(s_logits[i:i + 1], labels[i:i + 1], ids[i:i + 1], torch.from_numpy(ref_lp[i:i + 1])).item()
                   for i in range(len(blocks))]
        entries = sum(r.ids.size for r in res)
        f32_bytes = sum(r.ids.size * 8 + r.target_logprob.size * 4 for r in res)
        out.append({"k": k, "encoding": "float32 (wire)", "bytes_per_entry": f32_bytes / entries,
                    "bytes_per_entry_128k": f32_bytes / entries, "kl": ref, "kl_rel_err": 0.0,
                    "kl_rel_err_worst_seq": 0.0, "max_abs_lp_err": 0.0})
        for enc in ENCODINGS:
            blobs = [encode_entry(r.ids, r.logprobs, r.target_logprob, encoding=enc, vocab_size=engine.vocab_size)
                     for r in res]
            big = sum(len(encode_entry(lift[r.ids], r.logprobs, r.target_logprob, encoding=enc, vocab_size=BIG_VOCAB))
                      for r in res)
            dec = [decode_entry(b) for b in blobs]
            lp = np.stack([d.logprobs for d in dec])
            assert all(np.array_equal(d.ids, r.ids) for d, r in zip(dec, res))
            kl = topk_kl(s_logits, labels, ids, torch.from_numpy(lp)).item()
            worst = max(abs(topk_kl(s_logits[i:i + 1], labels[i:i + 1], ids[i:i + 1],
                                    torch.from_numpy(lp[i:i + 1])).item() - ref_seq[i]) / ref_seq[i]
                        for i in range(len(blocks)))
            out.append({"k": k, "encoding": enc, "bytes_per_entry": sum(map(len, blobs)) / entries,
                        "bytes_per_entry_128k": big / entries, "kl": kl, "kl_rel_err": abs(kl - ref) / ref,
                        "kl_rel_err_worst_seq": worst, "max_abs_lp_err": float(np.abs(lp - ref_lp).max())})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kit", default=str(REPO / ".cache" / "kit-quick"))
    ap.add_argument("--top-k", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--sequences", type=int, default=16, help="blocks per domain")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    kit = Path(args.kit)
    if not (kit / "teacher" / "config.json").is_file():
        from ddk.kit.fixtures import build_kit

        build_kit(kit, quick=True, seed=0)
    rows = measure(kit, args.top_k, args.seq, args.sequences)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print("| k | encoding | bytes/entry (kit, 2048 ids) | bytes/entry (128,256 ids) | top-k KL | KL rel. error "
          "| worst sequence | max abs logprob error |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {r['encoding']} | {r['bytes_per_entry']:.3f} | {r['bytes_per_entry_128k']:.3f} "
              f"| {r['kl']:.5f} | {100 * r['kl_rel_err']:.4f} % | {100 * r['kl_rel_err_worst_seq']:.4f} % "
              f"| {r['max_abs_lp_err']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "bench"))
    sys.exit(main())
