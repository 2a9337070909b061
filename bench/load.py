"""Load on one teacher: N concurrent trainer-like clients for a fixed time, on loopback only.

Each client is a thread that does what a trainer's teacher feed does, with nothing hidden by retries:
build a batch of token ids ([--batch, --seq], valid ids, a new batch each time), POST it to /v1/topk
asking for the binary frames, read and decode the whole stream (and check every sequence came back
with the asked shape), then go again at once. A 503 must carry Retry-After; the client then waits that
long (at most 5 s), as the trainer's client does. Anything else -- another status, a 503 without
Retry-After, a broken or short stream, a timeout -- is an error.

While it runs, a sampler reads the server's resident memory (its process tree, via psutil) and queue
depth (from /metrics) every second. At the end: one table of outcomes, one of latency percentiles of the
answered requests, and the memory over time with its peak. The loop is bounded by --duration and every
request by --timeout; the target must be a loopback address.

Run:  .venv/bin/python bench/load.py                       # starts a teacher on the quick kit (hf backend)
      .venv/bin/python bench/load.py --clients 16 --duration 60 --max-queue 4
      .venv/bin/python bench/load.py --url http://127.0.0.1:8100   # an already running teacher (no RSS)
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent

from common import start_server, tree_rss  # noqa: E402
from ddk.teacher.wire import MEDIA_TYPE, FrameReader, WireError  # noqa: E402
from ddk.launcher import DDK, Child  # noqa: E402


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def queue_depth(url: str) -> float | None:
    try:
        text = httpx.get(url + "/metrics", timeout=2).text
    except httpx.HTTPError:
        return None
    m = re.search(r"^ddk_teacher_queue_depth (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def start_teacher(model: Path, backend: str, max_queue: int, log: Path) -> tuple[str, Child]:
    cmd = [*DDK, "teacher", "serve", "--model", str(model), "--backend", backend,
           "--max-queue", str(max_queue)]
    try:
        return start_server(cmd, log, timeout=600)
    except (RuntimeError, TimeoutError) as e:
        raise SystemExit(f"the teacher did not start: {e}") from None


class Client(threading.Thread):
    """One trainer-like client; results go into the shared ``stats`` under ``lock``."""

    def __init__(self, idx: int, url: str, args, vocab: int, stop_at: float, stats: dict, lock: threading.Lock):
        super().__init__(name=f"client-{idx}", daemon=True)
        self.url, self.args, self.vocab, self.stop_at = url, args, vocab, stop_at
        self.stats, self.lock = stats, lock
        self.rng = np.random.default_rng(idx)

    def record(self, outcome: str, latency: float | None = None, detail: str | None = None) -> None:
        with self.lock:
            self.stats["outcomes"][outcome] += 1
            if latency is not None:
                self.stats["latency"].append(latency)
            if detail and len(self.stats["errors"]) < 10:
                self.stats["errors"].append(detail)

    def run(self) -> None:
        a = self.args
        headers = {"Accept": MEDIA_TYPE, "Content-Type": "application/json"}
        with httpx.Client(base_url=self.url, timeout=httpx.Timeout(a.timeout, connect=5.0)) as http:
            while time.monotonic() < self.stop_at:
                ids = self.rng.integers(0, self.vocab, size=(a.batch, a.seq)).tolist()
                body = json.dumps({"input_ids": ids, "top_k": a.top_k, "dtype": "float16"}).encode()
                t0 = time.perf_counter()
                try:
                    with http.stream("POST", "/v1/topk", content=body, headers=headers) as r:
                        if r.status_code == 503:
                            r.read()
                            ra = r.headers.get("retry-after")
                            if ra is None or not ra.isdigit():
                                self.record("503 without Retry-After", detail=r.text[:200])
                                continue
                            self.record("503 + Retry-After")
                            time.sleep(min(5.0, float(ra), max(0.0, self.stop_at - time.monotonic())))
                            continue
                        if r.status_code != 200:
                            r.read()
                            self.record(f"HTTP {r.status_code}", detail=r.text[:200])
                            continue
                        reader, seen = FrameReader(), 0
                        for chunk in r.iter_bytes():
                            for f in reader.feed(chunk):
                                if f.ids.shape != (a.seq - 1, a.top_k):
                                    raise WireError(f"frame shape {f.ids.shape}")
                                seen += 1
                        reader.close()
                    if seen != a.batch:
                        self.record("short stream", detail=f"{seen} of {a.batch} sequences")
                        continue
                    self.record("200 OK", time.perf_counter() - t0)
                except (httpx.HTTPError, WireError) as e:
                    self.record(type(e).__name__, detail=str(e)[:200])


def sample(url: str, pid: int | None, stop: threading.Event, series: list) -> None:
    t0 = time.monotonic()
    while not stop.wait(1.0):
        series.append((time.monotonic() - t0, tree_rss(pid) if pid else 0, queue_depth(url)))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="an already running teacher (loopback only); default: start one")
    p.add_argument("--model", default=str(REPO / ".cache" / "kit-quick" / "teacher"), help="teacher model to start")
    p.add_argument("--backend", default="hf", choices=["auto", "hf", "vllm"])
    p.add_argument("--max-queue", type=int, default=4, help="the started teacher's --max-queue (default 4)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    p.add_argument("--batch", type=int, default=8, help="sequences per request (default 8)")
    p.add_argument("--seq", type=int, default=129, help="ids per sequence (default 129: 128 + the next token)")
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--timeout", type=float, default=60.0, help="per request (default 60 s)")
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    args = p.parse_args()
    if args.clients < 1 or args.duration <= 0 or args.duration > 3600:
        p.error("--clients must be >= 1 and --duration in (0, 3600]")

    proc = None
    if args.url is None:
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"ddk-load-teacher-{os.getpid()}.log"
        print(f"starting a teacher on {args.model} ({args.backend}, --max-queue {args.max_queue}); log {log}",
              flush=True)
        url, proc = start_teacher(Path(args.model), args.backend, args.max_queue, log)
    else:
        url = args.url.rstrip("/")
        if not is_loopback(url):
            p.error("--url must be a loopback address (127.0.0.0/8, ::1 or localhost)")
    try:
        info = httpx.get(url + "/v1/info", timeout=10).json()
        if args.seq > info["max_seq_len"] or args.top_k > info["max_top_k"]:
            p.error(f"--seq/--top-k exceed the teacher's max_seq_len {info['max_seq_len']} / max_top_k "
                    f"{info['max_top_k']}")
        stats = {"outcomes": Counter(), "latency": [], "errors": []}
        lock, stop, series = threading.Lock(), threading.Event(), []
        pid = proc.pid if proc else None
        rss_before = tree_rss(pid) if pid else 0
        sampler = threading.Thread(target=sample, args=(url, pid, stop, series), daemon=True)
        sampler.start()
        print(f"{args.clients} clients x [{args.batch} x {args.seq}] top-{args.top_k} for {args.duration:.0f} s "
              f"against {url} ({info['backend']})", flush=True)
        t0 = time.monotonic()
        clients = [Client(i, url, args, info["vocab_size"], t0 + args.duration, stats, lock)
                   for i in range(args.clients)]
        for c in clients:
            c.start()
        for c in clients:
            c.join(args.duration + args.timeout + 30)
        wall = time.monotonic() - t0
        stop.set()
        sampler.join(5)
        healthy_after = httpx.get(url + "/healthz", timeout=10).status_code == 200
    finally:
        if proc is not None:
            proc.stop(timeout=30)

    out = stats["outcomes"]
    total = sum(out.values())
    ok = out.get("200 OK", 0)
    errors = total - ok - out.get("503 + Retry-After", 0)
    lat = stats["latency"]
    print(f"\nrequests in {wall:.1f} s: {total} ({total / wall:.1f}/s); answered {ok}, "
          f"{ok * args.batch * args.seq / wall:.0f} tokens/s scored")
    print(f"{'outcome':<26}{'count':>8}{'share':>9}")
    for k, v in sorted(out.items(), key=lambda kv: -kv[1]):
        print(f"{k:<26}{v:>8}{v / total:>9.1%}")
    print(f"{'errors (not 200, not 503+RA)':<26}{errors:>8}")
    print(f"\n{'latency of answered':<26}{'p50':>8}{'p95':>8}{'p99':>8}{'max':>8}")
    print(f"{'seconds':<26}" + "".join(f"{percentile(lat, q):>8.3f}" for q in (50, 95, 99, 100)))
    if proc is not None:
        peak = max((r for _, r, _ in series), default=0)
        print(f"\nserver RSS (process tree): before {rss_before / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB, "
              f"last {series[-1][1] / 2**20 if series else 0:.0f} MiB")
        print(f"{'t (s)':>6}{'RSS MiB':>9}{'queue':>7}")
        step = max(1, len(series) // 12)
        for t, r, q in series[::step]:
            print(f"{t:>6.0f}{r / 2**20:>9.0f}{q if q is not None else float('nan'):>7.0f}")
    print(f"\nhealthy after the load: {healthy_after}")
    for e in stats["errors"]:
        print("  error:", e)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "clients": args.clients, "duration_s": wall, "batch": args.batch, "seq": args.seq, "top_k": args.top_k,
            "outcomes": dict(out), "errors": errors, "latency_s": {f"p{q}": percentile(lat, q) for q in (50, 95, 99)},
            "rss_mib": [(round(t, 1), r / 2**20) for t, r, _ in series], "healthy_after": healthy_after}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
