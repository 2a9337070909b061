"""Both teacher engines on the real kit's teacher (``ddk fixtures --real``) against a plain transformers forward.

    .venv/bin/python bench/real_engines.py [--kit .cache/kit-real] [--backends hf,vllm]

Scores a ragged batch (4 sequences of 6 to 57 tokens, one with the vocabulary's highest ids) with each engine and
prints, per engine, its start-up time and the largest |difference| of its top-16 and target logprobs from
``log_softmax`` of a transformers forward on each sequence alone. Both checks are also tests: the hf engine's in
tests/unit/test_real_kit.py, vLLM's (since 2026-12-07, eager mode, the module's one vLLM server serving this teacher)
in tests/service/test_teacher_vllm.py; this bench adds vLLM with graph compilation and the start-up times.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kit", default=".cache/kit-real")
    ap.add_argument("--backends", default="hf,vllm")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ddk.teacher.engines import load_engine

    teacher = f"{args.kit}/teacher"
    tok = AutoTokenizer.from_pretrained(teacher)
    with open(f"{args.kit}/data/prose/val.jsonl") as f:
        ids = tok(json.loads(f.readline())["text"], add_special_tokens=False).input_ids
    sequences = [ids[:57], ids[5:18], ids[20:52], [49151, 40000, 32768, 2, 1, 17]]
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    refs = []
    for s in sequences:
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([s])).logits[0, :-1].double(), -1)
        refs.append((logp.topk(16, -1).values.numpy(), logp.gather(-1, torch.tensor(s[1:])[:, None])[:, 0].numpy()))
    for backend in args.backends.split(","):
        t0 = time.monotonic()
        engine = load_engine(teacher, backend, max_seq_len=256)
        started = time.monotonic() - t0
        try:
            got = engine.topk(sequences, 16)
        finally:
            engine.close()
        worst = max(max(float(np.abs(a.logprobs - v).max()), float(np.abs(a.target_logprob - t).max()))
                    for a, (v, t) in zip(got, refs))
        print(f"{backend}: start-up {started:.1f}s, max |logprob - transformers| {worst:.2e}", flush=True)


if __name__ == "__main__":
    main()
