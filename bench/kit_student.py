"""How the student's pre-training steps set a kit's ratios: retrain only the student of a built kit.

For each --steps S, the kit's student is pre-trained again from scratch with the build's own functions, seed and
data (``ddk.kit.fixtures``: same tokenizer, same init seed, S steps instead of the spec's), and its validation
loss is set against the kit's teacher (``teacher_loss`` in kit.json): the ratio table the build would print for
a kit whose student had S steps. With S equal to the kit's own steps it reproduces the kit's table.

Run:  .venv/bin/python bench/kit_student.py --kit .cache/kit-default --steps 120 160
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kit", required=True)
    ap.add_argument("--steps", type=int, nargs="+", required=True)
    args = ap.parse_args()
    from transformers import AutoTokenizer, LlamaForCausalLM

    from ddk.kit.corpus import read_jsonl
    from ddk.kit.fixtures import DEFAULT, QUICK, llama_config, pretrain, tokenize_domains, val_loss

    kit = Path(args.kit)
    info = json.loads((kit / "kit.json").read_text())
    spec = QUICK if info["quick"] else DEFAULT
    seed = info["seed"]
    torch.set_num_threads(os.cpu_count() or 1)
    torch.use_deterministic_algorithms(True)
    tokenizer = AutoTokenizer.from_pretrained(kit / "tokenizer")
    docs = {split: {d: read_jsonl(kit / "data" / d / f"{split}.jsonl") for d in info["domains"]}
            for split in ("train", "val")}
    train_ids, val_ids = tokenize_domains(tokenizer, docs["train"]), tokenize_domains(tokenizer, docs["val"])
    print(f"kit {kit} (seed {seed}); teacher PPL " + ", ".join(f"{d} {math.exp(v):.2f}" for d, v in info["teacher_loss"].items()))
    print("| student steps | " + " | ".join(info["domains"]) + " | min |")
    print("|---:|" + "---:|" * (len(info["domains"]) + 1))
    for steps in args.steps:
        size = dataclasses.replace(spec.student, steps=steps)
        torch.manual_seed(seed * 1000 + 1)
        model = LlamaForCausalLM(llama_config(size, len(tokenizer), 2 * spec.seq_len))
        pretrain(model, train_ids, size, spec.seq_len, seed * 1000 + 1, desc=f"student {steps} steps")
        loss = val_loss(model, val_ids, spec.seq_len, spec.eval_blocks)
        r = {d: math.exp(loss[d] - info["teacher_loss"][d]) for d in info["domains"]}
        print(f"| {steps} | " + " | ".join(f"{r[d]:.3f}" for d in info["domains"]) + f" | {min(r.values()):.3f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
