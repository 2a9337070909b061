"""The GPU check's shared pieces (bench/gpu.sh): the one switch between the GPU and the CPU dry run, the model
shapes, and the wrapper that turns each part into one JSON file and one line of verdict.

Every CUDA-only call of the parts goes through :class:`Target` (device, synchronisation, peak memory, the
collective backend, the card's peak), so ``--dry-run`` runs the very same code on the CPU at tiny shapes.

``python bench/gpu_common.py summarize OUT PART=STATUS ...`` (called by gpu.sh at the end) writes the JSON of a part
that died without one (timed out, killed, crashed before its wrapper could write) and ``OUT/summary.json``, and
prints one line per part.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

PARTS = ("student", "eval", "teacher", "rollout", "fsdp")
VLLM_NOTE = ("vLLM not measured: its wheels (and the CUDA libraries they pull) are far over the 64 MiB a run "
             "may carry to the GPU machine, and nothing can be fetched there; the transformers engine stands in")

# Llama-3.2-1B's shape (random weights built on the spot, no download); the dry run's stand-in is tiny
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
                tie_word_embeddings=True, rope_theta=500000.0)
TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True,
            rope_theta=500000.0)
DRY_PEAK_TFLOPS = 1.0  # nominal, so that the dry run's MFU arithmetic runs; its value means nothing


class Target:
    """Where a part runs: the GPU (``cuda``, NCCL) or, for ``--dry-run``, the CPU (gloo). The only place that
    calls CUDA-only functions."""

    def __init__(self, dry_run: bool) -> None:
        import torch

        self.torch = torch
        self.dry_run = dry_run
        self.cuda = not dry_run
        if self.cuda and not torch.cuda.is_available():
            raise RuntimeError("no CUDA device here (bench/gpu.sh --dry-run rehearses every part on the CPU)")
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.dist_backend = "nccl" if self.cuda else "gloo"
        self.shape = dict(LLAMA_1B if self.cuda else TINY)
        if self.cuda:
            torch.cuda.set_device(0)  # float32 matmuls stay IEEE (no TF32): the FSDP check compares fp32 to 1e-4
        else:
            torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    @property
    def name(self) -> str:
        return self.torch.cuda.get_device_name() if self.cuda else f"CPU ({platform.machine()}, dry run)"

    @property
    def memory_measure(self) -> str:
        return ("torch.cuda.max_memory_allocated since the last reset" if self.cuda
                else "the process's max RSS so far (ru_maxrss; not resettable: a dry-run stand-in)")

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()

    def allocated(self) -> int:
        """Bytes held now (GPU: allocated tensors; CPU: RSS)."""
        if self.cuda:
            return int(self.torch.cuda.memory_allocated())
        import psutil

        return int(psutil.Process().memory_info().rss)

    def peak(self) -> int:
        if self.cuda:
            return int(self.torch.cuda.max_memory_allocated())
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def empty_cache(self) -> None:
        import gc

        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def peak_tflops(self, given: float | None) -> tuple[float | None, str]:
        """The dense bf16 peak for MFU and its source: ``--peak-tflops``, else the card's known peak
        (ddk.trainer.scale), else none; the dry run's is nominal."""
        if given:
            return float(given), "--peak-tflops"
        if self.dry_run:
            return DRY_PEAK_TFLOPS, "nominal (dry run)"
        from ddk.trainer.scale import known_peak_tflops

        peak = known_peak_tflops(self.name)
        return peak, ("the card's known dense bf16 peak (ddk.trainer.scale)" if peak
                      else f"unknown card {self.name!r}: pass --peak-tflops")

    def generator(self, seed: int):
        return self.torch.Generator(device=self.device).manual_seed(seed)


def llama(target: Target, dtype=None):
    """A random Llama of the target's shape on the target's device (float32 unless ``dtype``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**target.shape)
    with torch.device(target.device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype) if dtype is not None else model


def timed(target: Target, fn: Callable, reps: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``reps`` calls of ``fn`` after ``warmup`` untimed ones, synchronised."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        target.sync()
        t0 = time.perf_counter()
        fn()
        target.sync()
        out.append(time.perf_counter() - t0)
    return out


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}"[:400] if text else type(e).__name__


def parser(part: str, doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"bench/gpu_{part}.py" if part != "fsdp" else "bench/fsdp_check.py",
                                description=doc.strip().splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="on the CPU at tiny shapes (same code paths)")
    p.add_argument("--json", default=None, help="write the part's JSON here")
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak (default: known)")
    return p


def run_part(part: str, args: argparse.Namespace, body: Callable[[Target, argparse.Namespace], dict]) -> int:
    """Run one part: its JSON (``{"part", "ok", "dry_run", "device", "versions", "wall_s", ...}``, with
    ``"error"`` in one line when it failed) and one verdict line; exit status 0 if it passed."""
    t0 = time.perf_counter()
    doc: dict = {"part": part, "ok": False, "dry_run": bool(args.dry_run)}
    try:
        import torch
        import transformers

        doc["versions"] = {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__}
        target = Target(args.dry_run)
        doc["device"] = target.name
        result = body(target, args)
        doc.update(result)
        doc["ok"] = bool(result.get("ok", True))
        if not doc["ok"] and "error" not in doc:
            doc["error"] = "a check failed (see its fields)"
    except BaseException as e:  # noqa: BLE001 - the part's failure is its result; the next part still runs
        doc["ok"] = False
        doc["error"] = one_line(e)
        traceback.print_exc()
        if isinstance(e, KeyboardInterrupt):
            raise
    doc["wall_s"] = time.perf_counter() - t0
    if args.json:
        Path(args.json).write_text(json.dumps(sanitize(doc), indent=2) + "\n")
    verdict = "ok" if doc["ok"] else f"FAILED: {doc['error']}"
    print(f"[{part}] {verdict} ({doc['wall_s']:.1f} s)", flush=True)
    return 0 if doc["ok"] else 1


def sanitize(obj):
    """JSON has no NaN or infinity: such a number becomes a string saying what it was."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return repr(obj)
    if isinstance(obj, dict):
        return {str(k): sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize(v) for v in obj]
    return obj


# -- the end of gpu.sh ----------------------------------------------------------------------------------------

def summarize(out: Path, rcs: dict[str, int], log: Path | None, meta: dict) -> int:
    """Fill in the JSON of each part that ran but left none, write summary.json, print one line per part."""
    tails = {}
    if log and log.is_file():
        lines = log.read_text(errors="replace").splitlines()
        for part in rcs:  # the last non-empty line of the part's own output, for a part that left no JSON
            mine = [ln for ln in lines if ln.startswith(f"{part}| ") and ln[len(part) + 2:].strip()]
            tails[part] = mine[-1][len(part) + 2:].strip() if mine else ""
    parts = {}
    for part, rc in rcs.items():
        path = out / f"{part}.json"
        doc = None
        if path.is_file():
            try:
                doc = json.loads(path.read_text())
            except ValueError as e:
                doc = {"part": part, "ok": False, "error": f"its JSON does not parse: {e}"}
        if doc is None:
            why = (f"timed out (killed by gpu.sh's time limit)" if rc in (124, 137)
                   else f"exited with status {rc} before writing its JSON")
            tail = tails.get(part)
            doc = {"part": part, "ok": False, "error": why + (f"; last line: {tail[:300]}" if tail else "")}
        if rc != 0 and doc.get("ok"):
            doc = {**doc, "ok": False, "error": f"exited with status {rc} after reporting success"}
        path.write_text(json.dumps(sanitize(doc), indent=2) + "\n")
        parts[part] = {"ok": bool(doc.get("ok")), "rc": rc, "error": doc.get("error"), "wall_s": doc.get("wall_s")}
    summary = {**meta, "ok": all(p["ok"] for p in parts.values()), "parts": parts, "vllm": VLLM_NOTE}
    (out / "summary.json").write_text(json.dumps(sanitize(summary), indent=2) + "\n")
    print("GPU check summary" + (" (dry run)" if meta.get("dry_run") else "") + ":")
    for part, p in parts.items():
        print(f"  {part:8s} {'ok' if p['ok'] else 'FAILED: ' + str(p['error'])}")
    print(f"  vllm     {VLLM_NOTE}")
    return 0 if summary["ok"] else 1


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench/gpu_common.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("summarize", help="gpu.sh's last step: missing part JSONs, summary.json")
    s.add_argument("out")
    s.add_argument("rcs", nargs="+", help="PART=EXIT_STATUS, one per part that ran")
    s.add_argument("--log", default=None, help="the combined log (lines 'PART| ...')")
    s.add_argument("--dry-run", action="store_true")
    s.add_argument("--gpu", default="", help="nvidia-smi's line")
    s.add_argument("--wheels", default="", help="what gpu.sh did with the carried wheels")
    s.add_argument("--commit", default="")
    s.add_argument("--wall-s", type=float, default=None)
    args = p.parse_args(argv)
    rcs = {}
    for item in args.rcs:
        part, _, rc = item.partition("=")
        if part not in PARTS or not rc.lstrip("-").isdigit():
            p.error(f"rcs: expected PART=STATUS with PART one of {', '.join(PARTS)}, got {item!r}")
        rcs[part] = int(rc)
    meta = {"dry_run": args.dry_run, "gpu": args.gpu, "wheels": args.wheels, "commit": args.commit,
            "wall_s": args.wall_s, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return summarize(Path(args.out), rcs, Path(args.log) if args.log else None, meta)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
