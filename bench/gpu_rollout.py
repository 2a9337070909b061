"""Student rollouts with transformers ``generate`` at the Llama-3.2-1B shape: new tokens per second.

What the on-policy issue's ``hf`` rollout engine does (the trainer's own student generating with its KV cache;
that engine is not in the package yet, so this calls ``generate`` directly): a random Llama at Llama-3.2-1B's
shape in bf16, ``--prompts`` prompts of ``--prompt-len`` random ids each, ``--new-tokens`` sampled tokens after
each (temperature 1, top-p 1, every row runs to the full length: ``min_new_tokens`` = ``max_new_tokens``), one
warm-up call and ``--reps`` timed ones (the median). tokens/s = prompts x new tokens / seconds (the prompts'
prefill included in the time). The seeded generation is also run twice to check that it repeats.

``--dry-run``: the same code on the CPU with a tiny Llama (bench/gpu_common.py).
"""

from __future__ import annotations

import sys

from gpu_common import llama, median, parser, run_part, timed


def body(target, args) -> dict:
    import torch

    if args.dry_run:
        args.prompts, args.prompt_len, args.new_tokens, args.reps = (min(args.prompts, 4), min(args.prompt_len, 16),
                                                                     min(args.new_tokens, 8), min(args.reps, 2))
    torch.manual_seed(0)
    model = llama(target, torch.bfloat16).eval()
    vocab = model.config.vocab_size
    g = target.generator(2)
    prompts = torch.randint(3, vocab, (args.prompts, args.prompt_len), device=target.device, generator=g)
    mask = torch.ones_like(prompts)

    def generate(seed: int = 0):
        torch.manual_seed(seed)
        with torch.no_grad():
            return model.generate(input_ids=prompts, attention_mask=mask, do_sample=True, temperature=1.0,
                                  top_p=1.0, top_k=0, max_new_tokens=args.new_tokens,
                                  min_new_tokens=args.new_tokens, pad_token_id=0, use_cache=True)

    times = timed(target, generate, args.reps, warmup=1)
    first, again = generate(7), generate(7)
    new = first.shape[1] - args.prompt_len
    sec = median(times)
    tps = args.prompts * new / sec
    repeats = bool(torch.equal(first, again))
    print(f"{target.name}; random Llama (vocab {vocab:,}) in bf16; {args.prompts} prompts x {args.prompt_len} ids, "
          f"{new} new tokens each: {tps:,.0f} new tokens/s ({sec:.3f} s a call); seeded rollout repeats: "
          f"{'yes' if repeats else 'NO'}", flush=True)
    doc = {"prompts": args.prompts, "prompt_len": args.prompt_len, "new_tokens": new, "reps": args.reps,
           "seconds": sec, "tokens_per_s": tps, "per_prompt_tokens_per_s": tps / args.prompts,
           "repeats_with_seed": repeats, "ok": new == args.new_tokens}
    if new != args.new_tokens:
        doc["error"] = f"generate stopped after {new} of {args.new_tokens} new tokens"
    return doc


def main() -> int:
    p = parser("rollout", __doc__)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    return run_part("rollout", p.parse_args(), body)


if __name__ == "__main__":
    sys.exit(main())
