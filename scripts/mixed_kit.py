"""A kit whose domains mix easy and hard documents (issue 24's results): the quick or default kit's models and
tokenizer, with its four domains' documents redistributed into four *mixed* domains.

Each original domain's documents (train and validation alike) are dealt to the mixed domains in fixed shares,
by a seeded shuffle, so that every mixed domain holds some math documents (the kits' widest teacher-student gap)
among documents of a narrower gap, and the validation files list the narrow-gap documents first (the order that
misled the first-blocks evaluation sets of before 2026-12-06):

=========  ==========================================
mixed      documents of the original domains
=========  ==========================================
``mix_p``  70 % of prose, 10 % of math
``mix_c``  70 % of code, 10 % of math
``mix_l``  70 % of legal, 10 % of math
``mix_m``  70 % of math, 30 % each of prose, code, legal
=========  ==========================================

    python scripts/mixed_kit.py --kit .cache/kit-quick --out .cache/kit-mixed [--seed 0]

writes ``OUT/data/<mixed>/{train,val}.jsonl``, ``OUT/data.yaml`` and ``OUT/train.yaml`` (the kit's, with the
student path made absolute); the teacher is the kit's (serve ``KIT/teacher``). The models are not retrained: the
kit's student and teacher saw all of these documents' kinds already.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import yaml

SHARES = {  # original domain -> [(mixed domain, share of its documents)], shares of one original sum to 1
    "prose": [("mix_p", 0.7), ("mix_m", 0.3)],
    "code": [("mix_c", 0.7), ("mix_m", 0.3)],
    "legal": [("mix_l", 0.7), ("mix_m", 0.3)],
    "math": [("mix_p", 0.1), ("mix_c", 0.1), ("mix_l", 0.1), ("mix_m", 0.7)],
}
HARD = "math"


def deal(docs: list[str], shares: list[tuple[str, float]], rng: random.Random) -> dict[str, list[str]]:
    """The documents, shuffled, cut into consecutive pieces of the given shares (the last takes the rest)."""
    docs = list(docs)
    rng.shuffle(docs)
    out, start = {}, 0
    for i, (name, share) in enumerate(shares):
        stop = len(docs) if i == len(shares) - 1 else start + round(share * len(docs))
        out[name] = docs[start:stop]
        start = stop
    return out


def read_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def build(kit: Path, out: Path, seed: int) -> dict[str, dict[str, dict[str, int]]]:
    """Write the mixed kit; returns {mixed: {split: {original: documents}}}."""
    rng = random.Random(seed)
    mixed: dict[str, dict[str, list[tuple[str, str]]]] = {}
    for split in ("train", "val"):
        for original, shares in SHARES.items():
            for name, docs in deal(read_texts(kit / "data" / original / f"{split}.jsonl"), shares, rng).items():
                mixed.setdefault(name, {}).setdefault(split, []).extend((original, d) for d in docs)
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for name, splits in sorted(mixed.items()):
        for split, docs in splits.items():
            if split == "val":  # the narrow-gap documents first, math last
                docs.sort(key=lambda od: od[0] == HARD)
            else:
                rng.shuffle(docs)
            path = out / "data" / name / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps({"text": d}) + "\n" for _, d in docs), encoding="utf-8")
            counts.setdefault(name, {})[split] = {o: sum(1 for oo, _ in docs if oo == o) for o in SHARES}
    names = sorted(mixed)
    (out / "data.yaml").write_text(yaml.safe_dump({"domains": [
        {"name": n, "files": [f"data/{n}/train.jsonl"], "val_files": [f"data/{n}/val.jsonl"]} for n in names]},
        sort_keys=False))
    cfg = yaml.safe_load((kit / "train.yaml").read_text())
    cfg["student"]["model"] = str((kit / cfg["student"]["model"]).resolve())
    cfg["run_id"] = "ddk-mixed"
    cfg["output_dir"] = "runs/ddk-mixed"
    (out / "train.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return counts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kit", required=True, type=Path, help="a finished quick or default kit")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if not (a.kit / "kit.json").exists():
        p.error(f"{a.kit}: not a finished kit (no kit.json)")
    for name, splits in build(a.kit, a.out, a.seed).items():
        print(name, json.dumps(splits))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
