"""The service cache in a comparison: ``ddk compare`` (policies kd, kd_uniform, ddk_raw, ddk x 2 seeds on the
quick kit) without and with ``ddk teacher serve --cache-dir``.

The same comparison twice, each against a teacher of its own started here (``--backend hf``), once without a
cache and once with one in a fresh folder; compare itself adds no store (``--no-cache``: the only cache is the
service's). Every arm of one comparison draws from the same packed blocks, so with the cache a block is scored by
the engine once, whichever arm asks first.

Printed (targets of issue 13):
  engine tokens     ``ddk_teacher_engine_tokens_total`` of each teacher's ``/metrics`` after its comparison
  distinct tokens   the tokens of the distinct sequences the comparison sent: the entries of the cache's store
                    (one per sequence; each a block of seq_len + 1 tokens)
  with / distinct   [target <= 1.1]: the cache scores each sequence about once (two requests missing on the same
                    sequence at the same moment both reach the engine)
  wall with / without  [target <= 0.7]: the comparison's wall time, teacher start-up excluded

By default each arm runs in this process (the Trainer under LocalContext, one rank: ``ddk train``'s steps without
Ray, as tests/loop/inproc.py ``run_train_argv``), so that Ray's start-up does not dilute the teacher's share;
``--ray`` runs every arm as compare does by default, a ``ddk train`` child under Ray.

Run:  .venv/bin/python bench/cache.py [--steps 120] [--seeds 2] [--policies kd,kd_uniform,ddk_raw,ddk] [--ray]
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from common import start_server  # noqa: E402
from ddk.launcher import kill_group  # noqa: E402


def metric(url: str, name: str) -> float:
    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def distinct_tokens(store_file: Path) -> tuple[int, int]:
    """(sequences, tokens) in a store: one entry per distinct sequence, its rows + 1 tokens (from the headers)."""
    from ddk.teacher.store import HEADER

    db = sqlite3.connect(store_file)
    try:
        heads = [bytes(h) for (h,) in db.execute("SELECT substr(blob, 1, 16) FROM topk")]
    finally:
        db.close()
    return len(heads), sum(HEADER.unpack(h)[4] + 1 for h in heads)


def run_in_process(run_id: str, argv: list[str]) -> int:
    """``ddk train CONFIG --set ...`` in this process: prepare, the Trainer under LocalContext, finish."""
    from ddk.cli import build_parser
    from ddk.trainer.config import load_config
    from ddk.trainer.launch import finish, prepare
    from ddk.trainer.loop import LocalContext, Trainer

    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    Trainer(prepare(cfg), LocalContext(cfg.output_dir)).fit()
    finish(Path(cfg.output_dir))
    return 0


def one(kit: Path, work: Path, cached: bool, sets: list[str], args) -> dict:
    """One comparison against a teacher of its own (with a cache when ``cached``); its numbers."""
    from ddk.experiments.compare import main as compare

    name = "with" if cached else "without"
    argv = ["teacher", "serve", "--model", str(kit / "teacher"), "--backend", "hf"]
    if cached:
        argv += ["--cache-dir", str(work / name / "teacher-cache")]
    url, proc = start_server([sys.executable, "-m", "ddk.cli", *argv], work / f"teacher-{name}.log", timeout=300)
    try:
        ns = argparse.Namespace(config=str(kit / "train.yaml"), policies=args.policies, seeds=args.seeds,
                                out=str(work / name), teacher_model=None, no_cache=True,
                                overrides=[*sets, f"teacher.urls=[{url}]"])
        t0 = time.perf_counter()
        compare(ns, runner=None if args.ray else run_in_process)
        wall = time.perf_counter() - t0
        out = {"wall_s": wall, "engine_tokens": metric(url, "ddk_teacher_engine_tokens_total"),
               "hits": metric(url, "ddk_teacher_cache_hits_total"),
               "misses": metric(url, "ddk_teacher_cache_misses_total")}
    finally:
        kill_group(proc)
    if cached:
        out["sequences"], out["distinct_tokens"] = distinct_tokens(work / name / "teacher-cache" / "topk.sqlite")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kit", default=str(REPO / ".cache" / "kit-quick"))
    ap.add_argument("--policies", default="kd,kd_uniform,ddk_raw,ddk")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="train.steps of every arm (default: the kit's)")
    ap.add_argument("--interval", type=int, default=None, help="mixture.interval_steps (default: the kit's, or "
                                                               "steps / 4 when --steps is below it)")
    ap.add_argument("--ray", action="store_true", help="every arm a `ddk train` child under Ray (compare's default)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from ddk.kit.fixtures import build_kit
    from ddk.trainer.config import load_config

    kit = build_kit(Path(args.kit), quick=True, seed=0)
    base = load_config(str(kit / "train.yaml"), [])
    work = Path(tempfile.mkdtemp(prefix="ddk-bench-cache-"))
    sets = ["checkpoint.every_steps=1000000", f"data.cache_dir={work / 'tokens'}"]
    if not args.ray:
        sets.append("ray.num_workers=1")  # one in-process rank
    steps = args.steps or base.train.steps
    if args.steps:
        sets.append(f"train.steps={steps}")
    interval = args.interval or (base.mixture.interval_steps if steps >= base.mixture.interval_steps
                                 else max(1, steps // 4))
    sets.append(f"mixture.interval_steps={interval}")
    load_start = os.getloadavg()
    try:
        without = one(kit, work, False, sets, args)
        cached = one(kit, work, True, sets, args)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()
    per = cached["engine_tokens"] / cached["distinct_tokens"]
    wall = cached["wall_s"] / without["wall_s"]
    rows = [
        ("engine tokens without the cache", f"{without['engine_tokens']:,.0f}", ""),
        ("engine tokens with the cache", f"{cached['engine_tokens']:,.0f}",
         f"{cached['hits']:,.0f} sequences from the cache, {cached['misses']:,.0f} missed"),
        ("distinct tokens scored", f"{cached['distinct_tokens']:,}", f"{cached['sequences']:,} distinct sequences"),
        ("with / distinct  [target <= 1.1]", f"{per:.3f}", "met" if per <= 1.1 else "NOT met"),
        ("compare wall without", f"{without['wall_s']:.1f} s", ""),
        ("compare wall with", f"{cached['wall_s']:.1f} s", ""),
        ("wall with / without  [target <= 0.7]", f"{wall:.3f}", "met" if wall <= 0.7 else "NOT met"),
    ]
    print(f"\ncache bench: kit {kit.name}, ddk compare --policies {args.policies} --seeds {args.seeds}, {steps} "
          f"steps, K={interval}, arms {'under Ray' if args.ray else 'in-process'}; load average at the start "
          f"{load_start[0]:.2f}, at the end {load[0]:.2f}")
    w, v = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    for name, value, note in rows:
        print(f"  {name.ljust(w)}  {value.rjust(v)}  {note}")
    if args.keep:
        print(f"(work dir {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
