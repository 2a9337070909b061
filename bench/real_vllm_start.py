"""What a vLLM teacher start costs the test suite: the quick kit's teacher against the real kit's.

    .venv/bin/python bench/real_vllm_start.py [--quick-kit DIR] [--real-kit DIR] [--rounds 1]

Starts ``ddk teacher serve --backend vllm --enforce-eager --gpu-memory-utilization 0.15`` (the server
tests/service/test_teacher_vllm.py starts) on each kit's teacher, one after the other (alternating the order
each round), until ``/healthz`` answers, then scores one ragged batch (4 sequences of 6 to 57 tokens, top-16)
and stops it. Prints each start's wall time, the median per teacher and the difference: what serving the real
teacher costs the suite over the quick one (or in addition to it), with the load average (``os.getloadavg``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from teacher import REPO  # noqa: I001  (sets OMP_WAIT_POLICY first, as ddk does)
from common import start_server
from ddk.launcher import DDK


def one_start(model: Path, log: Path) -> tuple[float, float]:
    """(seconds to healthy, seconds for one ragged top-16 request) of one vLLM teacher server."""
    from ddk.teacher.client import TeacherClient

    t0 = time.perf_counter()
    url, proc = start_server([*DDK, "teacher", "serve", "--model", str(model), "--backend", "vllm",
                              "--enforce-eager", "--gpu-memory-utilization", "0.15"], log)
    started = time.perf_counter() - t0
    try:
        client = TeacherClient(url)
        t0 = time.perf_counter()
        client.topk_ragged([list(range(100, 157)), list(range(5, 18)), list(range(20, 52)),
                            [2047, 1000, 768, 2, 1, 17]], 16)
        request = time.perf_counter() - t0
        client.close()
    finally:
        proc.stop(timeout=30)
    return started, request


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick-kit", default=str(REPO / ".cache" / "kit-quick"))
    ap.add_argument("--real-kit", default=str(REPO / ".cache" / "kit-real"))
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    kits = {"quick": Path(args.quick_kit), "real": Path(args.real_kit)}
    workdir = Path(tempfile.mkdtemp(prefix="ddk-bench-vllm-start-"))
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; logs in {workdir}", flush=True)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in kits}
    for r in range(args.rounds):
        for name in (("quick", "real") if r % 2 == 0 else ("real", "quick")):
            times[name].append(one_start(kits[name] / "teacher", workdir / f"{name}-{r}.log"))
            print(f"  round {r + 1} {name}: healthy in {times[name][-1][0]:.1f} s, one ragged request "
                  f"{times[name][-1][1]:.2f} s (load {os.getloadavg()[0]:.2f})", flush=True)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    med = {name: statistics.median(t[0] for t in ts) for name, ts in times.items()}
    print(f"median start: quick {med['quick']:.1f} s, real {med['real']:.1f} s; real - quick "
          f"{med['real'] - med['quick']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
