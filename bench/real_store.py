"""The top-k store's bytes per entry at the real 49,152-token vocabulary (the real kit's teacher).

    .venv/bin/python bench/real_store.py [--kit DIR] [--top-k 16] [--seq 256] [--sequences 4]

bench/store.py's measurement (``measure``: the teacher scores --sequences validation blocks of --seq tokens per
domain in-process, each answer is encoded with every store encoding and decoded again) on the real kit instead of
the quick one: bytes per (position, token) entry, headers and target logprobs included, against float32 wire
arrays, and the top-k KL error against the kit's student. Bytes do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import REPO
from store import measure


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kit", default=str(REPO / ".cache" / "kit-real"))
    ap.add_argument("--top-k", type=int, nargs="+", default=[16])
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--sequences", type=int, default=4, help="blocks per domain")
    args = ap.parse_args()
    rows = measure(Path(args.kit), args.top_k, args.seq, args.sequences)
    f32 = {r["k"]: r["bytes_per_entry"] for r in rows if r["encoding"] == "float32 (wire)"}
    print(f"real teacher, vocabulary 49,152; {args.sequences} blocks of {args.seq} tokens per domain")
    print("| k | encoding | bytes/entry | of float32 | top-k KL | KL rel. error | worst sequence "
          "| max abs logprob error |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['k']} | {r['encoding']} | {r['bytes_per_entry']:.3f} | {r['bytes_per_entry'] / f32[r['k']]:.3f} "
              f"| {r['kl']:.5f} | {100 * r['kl_rel_err']:.4f} % | {100 * r['kl_rel_err_worst_seq']:.4f} % "
              f"| {r['max_abs_lp_err']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
