"""What one Ray Train launch costs on this machine, with nothing of ddk in it: the floor under every test and demo
that runs `ddk train` on Ray (the suite makes nine such launches, docs/tests.md).

    .venv/bin/python bench/ray_launch.py [--rounds 2] [--workers 2]

Each round, in a fresh process (so that imports count as they do for `ddk train`): import Ray Train, ``ray.init`` a
local cluster of ``--workers`` CPUs (its own temp dir, no dashboard, as tests/e2e/test_train_ray.py starts its own),
``TorchTrainer.fit`` of a training function that does nothing, on ``--workers`` workers (gloo), then
``ray.shutdown``. Prints each phase's wall seconds, the CPU the whole machine spent during the round (core-seconds
from /proc/stat, so run it on an otherwise idle machine: Ray's processes are not this process's children, so its own
rusage would miss them), the median over the rounds and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROUND = r'''
import json, sys, tempfile, time
t0 = time.perf_counter()
import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
t1 = time.perf_counter()
workers = int(sys.argv[1])
ray.init(num_cpus=workers, include_dashboard=False, logging_level="ERROR",
         _temp_dir=tempfile.mkdtemp(prefix="ddkbench-", dir="/tmp"))
t2 = time.perf_counter()
TorchTrainer(lambda config: None, scaling_config=ScalingConfig(num_workers=workers, use_gpu=False),
             run_config=RunConfig(storage_path=tempfile.mkdtemp(), name="noop")).fit()
t3 = time.perf_counter()
ray.shutdown()
t4 = time.perf_counter()
print("ROUND " + json.dumps({"import": t1 - t0, "ray_init": t2 - t1, "fit_noop": t3 - t2, "shutdown": t4 - t3}))
'''


def busy_core_seconds() -> float:
    """Core-seconds the machine has spent not idle since boot (/proc/stat's first line, USER_HZ ticks)."""
    ticks = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def one_round(workers: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a cluster of its own, never another one
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    before = busy_core_seconds()
    with tempfile.TemporaryDirectory() as cwd:
        r = subprocess.run([sys.executable, "-c", ROUND, str(workers)], capture_output=True, text=True, timeout=600,
                           env=env, cwd=cwd)
    cpu = busy_core_seconds() - before
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("ROUND ")]
    if r.returncode != 0 or not lines:
        raise SystemExit(f"ray_launch: a round failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
    return {**json.loads(lines[-1][len("ROUND "):]), "machine_cpu": cpu}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    if args.rounds < 1 or args.workers < 1:
        print("ray_launch: --rounds and --workers must be >= 1", file=sys.stderr)
        return 2
    print(f"load average before: {os.getloadavg()[0]:.2f}; {args.workers} workers, {args.rounds} rounds", flush=True)
    rounds = []
    for i in range(args.rounds):
        got = one_round(args.workers)
        rounds.append(got)
        print(f"round {i + 1}: " + ", ".join(f"{k} {v:.1f} s" for k, v in got.items()), flush=True)
    print("median: " + ", ".join(f"{k} {statistics.median(r[k] for r in rounds):.1f} s" for k in rounds[0]))
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
