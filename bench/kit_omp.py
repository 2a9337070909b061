"""The kit builder called from Python (not `ddk`) while a second process keeps a core busy (issue 25).

A Python caller imports ``ddk.kit.fixtures`` (and with it torch, whose GNU OpenMP reads ``OMP_WAIT_POLICY``
when it loads) without setting the variable. ``build_kit`` then sets ``OMP_WAIT_POLICY=PASSIVE`` and, since
this process's OpenMP read the default already, pre-trains in a fresh process that loads torch with it
(ddk.runtime). Timed, in one run, on a small kit whose teacher has the quick kit's size (4 x 128, vocab 2048,
16 x 128 tokens a step) and ``--steps`` pre-training steps (kit.json's ``teacher.train_seconds``):

  (a) idle        build_kit from this process, nothing else of ours running
  (b) busy        the same while a second process spins on one core (a pure-Python loop)
  (c) busy, old   what build_kit did before: ``pretrain`` in this process (OpenMP's default policy, spinning
                  threads), same busy process, ``--old-steps`` steps

Target: (b)/(a) <= 1.5. The load average of the machine (other tenants) is printed beside the numbers.

Run:  .venv/bin/python bench/kit_omp.py [--steps 8] [--old-steps 3]   (about 2 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if "OMP_WAIT_POLICY" in os.environ and os.environ.get("DDK_BENCH_REEXEC") != "1":  # a library caller's env
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    os.execve(sys.executable, [sys.executable, *sys.argv], {**env, "DDK_BENCH_REEXEC": "1"})

import torch  # noqa: E402  (loaded before any ddk entry point runs: the case of the issue)

from ddk.kit import fixtures as fx  # noqa: E402


def bench_spec(steps: int) -> fx.KitSpec:
    """QUICK's tokenizer, sequence length and teacher size, a small corpus, ``steps`` teacher steps."""
    q = fx.QUICK
    return fx.KitSpec(vocab_size=q.vocab_size, seq_len=q.seq_len, max_chars=60_000, val_fraction=0.1,
                      doc_chars=q.doc_chars, teacher=fx.ModelSize(**{**q.teacher.__dict__, "steps": steps}),
                      student=fx.ModelSize(**{**q.student.__dict__, "steps": 1}), eval_blocks=2,
                      train_steps=2, train_batch_size=2, train_lr=1e-3, interval_steps=1, eval_sequences=2,
                      checkpoint_every=1)


def busy() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "x = 0\nwhile True:\n    x += 1"])


def timed_build(out: Path, spec: fx.KitSpec) -> float:
    """Seconds per teacher pre-training step of build_kit (its own measure, kit.json)."""
    fx.build_kit(out, quick=True, seed=0, spec=spec)
    teacher = json.loads((out / "kit.json").read_text())["teacher"]
    return teacher["train_seconds"] / teacher["steps"]


def old_path(spec: fx.KitSpec, steps: int) -> float:
    """Seconds per step of ``pretrain`` in this process (its OpenMP read the default policy at import)."""
    from ddk.kit.corpus import build_corpus
    from transformers import LlamaForCausalLM

    corpus = build_corpus(0, spec.max_chars, spec.val_fraction, spec.doc_chars)
    tok = fx.wrap_tokenizer(fx.train_tokenizer((d for ds in corpus.train.values() for d in ds), spec.vocab_size),
                            2 * spec.seq_len)
    ids = fx.tokenize_domains(tok, corpus.train)
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = LlamaForCausalLM(fx.llama_config(spec.teacher, len(tok), 2 * spec.seq_len))
    size = fx.ModelSize(**{**spec.teacher.__dict__, "steps": 1})
    fx.pretrain(model, ids, size, spec.seq_len, 0, desc="warm-up")  # first step: allocations
    size = fx.ModelSize(**{**spec.teacher.__dict__, "steps": steps})
    t0 = time.perf_counter()
    fx.pretrain(model, ids, size, spec.seq_len, 0, desc="old path")
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--old-steps", type=int, default=3)
    args = ap.parse_args()
    assert "OMP_WAIT_POLICY" not in os.environ
    spec = bench_spec(args.steps)
    load = [os.getloadavg()]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ddk-kit-omp-") as tmp:
        idle = timed_build(Path(tmp) / "a", spec)
        load.append(os.getloadavg())
        proc = busy()
        try:
            time.sleep(1.0)
            loaded = timed_build(Path(tmp) / "b", spec)
            load.append(os.getloadavg())
            os.environ.pop("OMP_WAIT_POLICY")  # as this process had it; its OpenMP read the default anyway
            old = old_path(spec, args.old_steps)
            load.append(os.getloadavg())
        finally:
            proc.kill()
            proc.wait()
    wall = time.perf_counter() - t_start
    print(f"\nkit builder called from Python, teacher {spec.teacher.layers}x{spec.teacher.hidden}, "
          f"{spec.teacher.batch_size}x{spec.seq_len} tokens a step; {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"  (a) idle                            {idle:.3f} s/step ({args.steps} steps)")
    print(f"  (b) busy second process             {loaded:.3f} s/step ({args.steps} steps)")
    print(f"  (c) busy, in-process default OMP    {old:.3f} s/step ({args.old_steps} steps)")
    print(f"  (b)/(a) {loaded / idle:.2f} (target <= 1.5)   (c)/(a) {old / idle:.2f}")
    print("  load average (1 min) at start, after (a), (b), (c): " + ", ".join(f"{x[0]:.2f}" for x in load))
    print(f"  wall {wall:.0f} s")


if __name__ == "__main__":
    main()
