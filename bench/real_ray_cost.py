"""What 2 Ray workers cost the real kit's 4-step test over the in-process run (the run tests/unit/test_real_kit.py
made until 2026-12-07; since then the two-node Ray Job test, tests/e2e/test_ray_job.py, runs a 4-step DDK run of the
real kit on its 2 Ray workers instead, with no launch of its own).

    .venv/bin/python bench/real_ray_cost.py inproc|ray [--kit DIR]

``inproc``: the test's run as it is, the Trainer in this process (tests/loop/inproc.py's ``train``: LocalContext,
one rank). ``ray``: the same overrides with ``ray.num_workers=2``, ``ddk train``'s driver (``ddk.trainer.launch.main``)
on a local Ray cluster started here as tests/e2e/test_train_ray.py starts its own. Both: continued pre-training (no
teacher, no controller), 4 steps of batch 2, evaluation on 2 sequences per domain, a checkpoint and the export at
step 4. Prints the wall time (and for ``ray`` the part that started Ray) and the load average; run the two modes one
after the other, alternating the order, and compare pairs at similar load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ddk.runtime import set_process_defaults

REPO = Path(__file__).resolve().parent.parent
SETS = ["kd.gamma=0", "mixture.policy=fixed", "train.steps=4", "mixture.interval_steps=4", "train.batch_size=2",
        "eval.sequences_per_domain=2", "checkpoint.every_steps=4"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["inproc", "ray"])
    ap.add_argument("--kit", default=str(REPO / ".cache" / "kit-real"))
    args = ap.parse_args()
    set_process_defaults()
    kit = Path(args.kit)
    out = Path(tempfile.mkdtemp(prefix="ddk-bench-ray-cost-"))
    load0, t0 = os.getloadavg()[0], time.monotonic()
    if args.mode == "inproc":
        sys.path.insert(0, str(REPO / "tests" / "loop"))
        from inproc import train

        train(kit, out / "run", "real-cpt", None, None, *SETS, "ray.num_workers=1")
        started = 0.0
    else:
        import ray

        from ddk.trainer.launch import main as train_main

        ray_tmp = tempfile.mkdtemp(prefix="ddkray-", dir="/tmp")  # short: Ray's socket paths have a limit
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_tmp, logging_level="WARNING",
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
        started = time.monotonic() - t0
        sets = ["run_id=real-cpt-ray", f"output_dir={out / 'run'}", f"data.cache_dir={kit.parent / 'token-cache'}",
                "teacher.urls=[]", "controller.url=null", *SETS, "ray.num_workers=2"]
        try:
            assert train_main(argparse.Namespace(config=str(kit / "train.yaml"), overrides=sets)) == 0
        finally:
            ray.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)
    total = time.monotonic() - t0
    assert (out / "run" / "final" / "model.safetensors").is_file()
    shutil.rmtree(out, ignore_errors=True)
    print(f"{args.mode}: {total:.1f} s in all" + (f" ({started:.1f} s starting Ray)" if args.mode == "ray" else "")
          + f"; load average {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
