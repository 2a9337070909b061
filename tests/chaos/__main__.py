"""``PYTHONPATH=tests .venv/bin/python -m chaos``: a real DDK run on loopback while a seeded schedule SIGKILLs
its parts (a teacher replica, the controller, a Ray Train worker, the ``ddk train`` driver; every kind at least
once when F >= 4) and a supervisor restarts them; then the checks (exit 0 when all pass, 1 otherwise).

It prints the faults per kind, each fault's outcome, the restarts, the time lost and the wall time against the
fault-free run (``--no-baseline`` skips that run).

Run:  PYTHONPATH=tests .venv/bin/python -m chaos --steps 60 --faults 20 --seed 1          # the long schedule
      PYTHONPATH=tests .venv/bin/python -m chaos --steps 9 --faults 4 --seed 2 --no-baseline    # the suite's
      PYTHONPATH=tests .venv/bin/python -m chaos --on-policy --steps 9 --faults 4 --seed 2 --no-baseline
      (kd.on_policy 1: teachers killed mid-grading, workers mid-rollout, the rollout ids checked)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from chaos.chat import write_chat_setup
from chaos.checks import report, run_checks
from chaos.cluster import REPO, Cluster
from chaos.schedule import KINDS, make_schedule
from chaos.supervisor import Supervisor, harvest_logs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    p.add_argument("--faults", type=int, default=20, help="faults to inject (default 20)")
    p.add_argument("--seed", type=int, default=1, help="seed of the schedule and of the run (default 1)")
    p.add_argument("--duration-limit", type=float, default=2400.0, help="seconds for everything (default 2400)")
    p.add_argument("--interval", type=int, default=None, help="mixture.interval_steps (default max(3, steps/10))")
    p.add_argument("--every", type=int, default=None, help="checkpoint.every_steps (default max(2, 2*interval/3))")
    p.add_argument("--batch-size", type=int, default=2, help="rows per worker and step (default 2)")
    p.add_argument("--kinds", default=",".join(KINDS), help="fault kinds to draw from (default all four)")
    p.add_argument("--delay", default="1,5", help="restart delay range in seconds (default 1,5)")
    p.add_argument("--no-baseline", action="store_true", help="skip the fault-free run (no equality check, "
                   "no wall-time comparison)")
    p.add_argument("--kit", default=str(REPO / ".cache" / "kit-quick"), help="the quick kit (built when absent)")
    p.add_argument("--out", default=None, help="working directory (default: a temp dir, removed unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    p.add_argument("--json", default=None, help="write the results and checks as JSON here")
    p.add_argument("--on-policy", action="store_true", help="kd.on_policy 1 on a small conversation domain "
                   "(chaos/chat.py); teachers die mid-grading, workers mid-rollout; rollout ids checked")
    args = p.parse_args(argv)
    args.interval = args.interval or max(3, args.steps // 10)
    args.every = args.every or max(2, (2 * args.interval) // 3)
    args.kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = set(args.kinds) - set(KINDS)
    if unknown or not args.kinds:
        p.error(f"--kinds: unknown {sorted(unknown)} (known: {', '.join(KINDS)})")
    lo, hi = (float(x) for x in args.delay.split(","))
    args.delay = (lo, hi)
    if args.steps < 4:
        p.error("--steps: at least 4")
    return args


def _preload() -> None:
    """Import what the checks need (torch, transformers: seconds on 2 busy cores)."""
    try:
        import safetensors.torch  # noqa: F401
        import transformers  # noqa: F401
    except Exception:  # noqa: BLE001, S110 - the checks import them again and report
        pass


class _Terminated(KeyboardInterrupt):
    pass


def run(args, schedule: list, cl: Cluster, work: Path, deadline: float, t_all: float) -> dict:
    """The fault-free run (unless ``--no-baseline``) and the chaos run on ``cl``; then everything stopped.
    What the checks read: ``base``, ``chaos``, ``history``, ``records``, ``error``, ``left``, ``ports``."""
    out = {"base": None, "chaos": None, "history": [], "records": [], "error": None, "left": [], "ports": [],
           "preload": None}
    tag = f"s{args.seed}-{uuid.uuid4().hex[:6]}"
    try:
        cl.open(timeout=max(30.0, min(300.0, deadline - time.monotonic())))
        print(f"[{time.monotonic() - t_all:6.1f}s] Ray head, 2 teachers and the controller up", flush=True)
        if not args.no_baseline:
            print("fault-free run:", flush=True)
            out["base"] = supervised(args, cl, f"chaos-base-{tag}", work / "base", [], deadline)
        print("chaos run:", flush=True)
        out["chaos"] = supervised(args, cl, f"chaos-{tag}", work / "chaos", schedule, deadline)
        # while everything stops; joined before the checks (run_checks), which import transformers too: two threads
        # in transformers' lazy __init__ at once can see it half-built ("cannot import name AutoModelForCausalLM")
        out["preload"] = threading.Thread(target=_preload, name="preload", daemon=True)
        out["preload"].start()
        out["history"], out["records"] = run_outputs(cl, out["chaos"], work)
    except BaseException as e:  # noqa: BLE001 - reported as a failed check after the cleanup
        out["error"] = f"{type(e).__name__}: {e}"
        if isinstance(e, KeyboardInterrupt):
            print("interrupted: cleaning up", flush=True)
    finally:
        t_close = time.monotonic()
        out["left"] = cl.close()
        out["ports"] = cl.ports_held()
        print(f"[{time.monotonic() - t_all:6.1f}s] everything stopped ({time.monotonic() - t_close:.1f} s)",
              flush=True)
    return out


def supervised(args, cl: Cluster, run_id: str, out: Path, faults: list, deadline: float):
    """One run under the :class:`Supervisor`, its driver log's counts harvested."""
    res = Supervisor(args, cl, run_id, out, faults, deadline).run()
    harvest_logs(cl.drivers[-1].log_text(), res)
    print(f"  finished in {res.wall_s} s (exit {res.rc})", flush=True)
    return res


def run_outputs(cl: Cluster, chaos, work: Path) -> tuple[list[dict], list[dict]]:
    """The controller's history of the chaos run and its metrics.jsonl records."""
    import httpx

    from ddk.trainer.metrics import read_metrics

    history = []
    if cl.controller.up.wait(30):
        url = f"{cl.controller.child.url}/v1/runs/{chaos.run_id}/history"
        history = httpx.get(url, timeout=10).json()["versions"]
    return history, read_metrics(work / "chaos" / "metrics.jsonl")


def forget_own_path() -> None:
    """The runs' processes (driver, teachers, Ray) get this process's environment less the tests/ folder on
    PYTHONPATH that found this package (as when the harness was a script)."""
    tests = Path(__file__).resolve().parents[1]
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != tests]
    if rest:
        os.environ["PYTHONPATH"] = os.pathsep.join(rest)
    else:
        os.environ.pop("PYTHONPATH", None)


def main(argv=None) -> int:
    args = parse_args(argv)
    forget_own_path()
    t_all = time.monotonic()
    deadline = t_all + args.duration_limit
    schedule = make_schedule(args.seed, args.steps, args.faults, args.interval, args.every, args.kinds, args.delay,
                             on_policy=args.on_policy)
    print(f"schedule (seed {args.seed}): " + "; ".join(f"{f.index}: {f.kind} {f.phase} step {f.step} "
                                                        f"(+{f.delay}s)" for f in schedule), flush=True)
    kit = Path(args.kit)
    if not (kit / "train.yaml").is_file():
        from ddk.kit.fixtures import build_kit

        build_kit(kit, quick=True, seed=0)
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ddk-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    args.chat = write_chat_setup(kit, work / "chat", code=False) if args.on_policy else None  # conversations only
    old_term = signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(_Terminated()))
    cl = Cluster(kit, work)
    try:
        out = run(args, schedule, cl, work, deadline, t_all)
    finally:
        signal.signal(signal.SIGTERM, old_term)
    if out.get("preload") is not None:
        out["preload"].join()
    checks = run_checks(args, schedule, out, work)
    if out["chaos"] is not None:
        report(args, schedule, out["chaos"], out["base"], checks)
    else:
        for name, ok, detail in checks:
            print(f"  [{'ok' if ok else 'FAIL'}] {name}" + (f": {detail}" if detail else ""))
        print("chaos: FAILED")
    print(f"total {time.monotonic() - t_all:.1f} s; work dir {work}" + ("" if args.keep or args.out else " (removed)"),
          flush=True)
    passed = all(ok for _, ok, _ in checks)
    if args.json:
        write_json(Path(args.json), passed, checks, schedule, out, time.monotonic() - t_all)
    if not (args.keep or args.out):
        shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(cl.temp_dir, ignore_errors=True)
    return 0 if passed else 1


def write_json(path: Path, passed: bool, checks: list, schedule: list, out: dict, total_s: float) -> None:
    chaos, base = out["chaos"], out["base"]
    path.write_text(json.dumps({
        "passed": passed, "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in checks],
        "schedule": [asdict(f) for f in schedule], "chaos": asdict(chaos) if chaos else None,
        "baseline": asdict(base) if base else None, "total_s": round(total_s, 1)}, indent=1))


if __name__ == "__main__":
    from ddk.runtime import set_process_defaults

    set_process_defaults()
    sys.exit(main())
