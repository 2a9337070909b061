"""Process-wide defaults for heavy torch work, applied where that work starts; importing this module changes nothing.

``OMP_WAIT_POLICY=PASSIVE``: idle OpenMP threads sleep instead of spinning. Where the teacher, the trainer's
workers and other jobs share a few cores, spinning threads made steps 2-10x slower (measured on the 2-core
VM; docs/benchmarks.md).

When the setting counts: torch's Linux wheels bundle GNU OpenMP (``torch/lib/libgomp.so.1``), which reads
``OMP_WAIT_POLICY`` once, when the library is loaded, i.e. at ``import torch`` (with
``OMP_DISPLAY_ENV=VERBOSE`` it prints ``GOMP_SPINCOUNT = '300000'`` when unset, ``'0'`` with PASSIVE, at the
import). Set later, it changes nothing for that process's own threads, only for the processes it starts
afterwards. So:

* ``ddk`` itself (:func:`set_process_defaults` first thing in ``ddk.cli.main``), the tests (conftest) and the
  benches set it before anything imports torch;
* the library entry points that start heavy torch work call :func:`apply_process_defaults` where that work
  starts: the kit builder (``ddk.kit.fixtures.build_kit`` / ``build_specialist``), which, when torch was loaded
  before the default was in force, runs its training in a fresh process that loads torch with it
  (:func:`call_in_fresh_process`); ``Trainer``; the teacher engines (``HFEngine`` imports torch after the call,
  vLLM's engine processes inherit it); ``ddk train``'s driver before it starts Ray (the workers load torch
  after). Where the process's own OpenMP was loaded already and the work stays in it (``Trainer``), a warning
  says so once.

An explicit value in the environment always wins.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from importlib import import_module
from typing import Any

log = logging.getLogger("ddk.runtime")

PROCESS_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}
OPENMP_SETTINGS = ("OMP_WAIT_POLICY",)  # read by OpenMP when it loads (with torch)

_warned: set[str] = set()
_late: set[str] = set()  # OpenMP settings this module set after torch had loaded: too late for this process


def set_process_defaults(environ: dict | None = None) -> list[str]:
    """Set each default that the environment does not set already (an explicit value wins); the names set now."""
    env = os.environ if environ is None else environ
    set_now = []
    for key, value in PROCESS_DEFAULTS.items():
        if key not in env:
            env[key] = value
            set_now.append(key)
    return set_now


def openmp_loaded() -> bool:
    """Whether this process has loaded torch, and with it its OpenMP runtime (which has read its settings)."""
    return "torch" in sys.modules


def apply_process_defaults(where: str | None = None) -> list[str]:
    """For a library entry point, where its heavy torch work starts: :func:`set_process_defaults` (the
    processes it starts inherit them). Returns the OpenMP settings that came too late for this process
    (set by this module after torch had loaded): its own OpenMP threads still spin. With ``where`` (the work's name),
    such a late setting is also a warning, once per process. A later call returns them again (the process's
    OpenMP still runs with what it read), as long as they keep the value set then."""
    if openmp_loaded():
        _late.update(k for k in set_process_defaults() if k in OPENMP_SETTINGS)
    else:
        set_process_defaults()
    late = [k for k in sorted(_late) if os.environ.get(k) == PROCESS_DEFAULTS[k]]
    if not late:
        return []
    if where and where not in _warned:
        _warned.add(where)
        log.warning("%s: %s was not set when this process imported torch, so its OpenMP threads spin between "
                    "parallel regions (slow where other processes share the cores); set it before importing "
                    "torch (the ddk command does)", where,
                    ", ".join(f"{k}={PROCESS_DEFAULTS[k]}" for k in late))
    return late


def call_in_fresh_process(target: str, kwargs: dict[str, Any], log_level: str | int | None = None) -> Any:
    """``module:function(**kwargs)`` in a new Python process that inherits this one's environment (the
    defaults included, so its torch loads OpenMP with them), its console this one's; JSON in and out.
    A failure there is a RuntimeError here (its message and traceback are on the console)."""
    module, _, func = target.partition(":")
    if not module or not func:
        raise ValueError(f"target: expected module:function, got {target!r}")
    level = log_level if log_level is not None else logging.getLevelName(logging.getLogger().getEffectiveLevel())
    with tempfile.TemporaryDirectory(prefix="ddk-call-") as tmp:
        result = os.path.join(tmp, "result.json")
        code = ("import json, sys\n"
                "from ddk.logsetup import setup_logging\n"
                "from ddk.runtime import _run_target\n"
                "setup_logging(sys.argv[4])\n"
                "_run_target(sys.argv[1], sys.argv[2], sys.argv[3])\n")
        proc = subprocess.run([sys.executable, "-c", code, target, json.dumps(kwargs), result, str(level)],
                              env=dict(os.environ))
        if proc.returncode != 0:
            raise RuntimeError(f"{target} failed in its own process (exit {proc.returncode})")
        with open(result, encoding="utf-8") as fh:
            return json.load(fh)


def _run_target(target: str, kwargs_json: str, result_path: str) -> None:
    """The child side of :func:`call_in_fresh_process`."""
    module, _, func = target.partition(":")
    value = getattr(import_module(module), func)(**json.loads(kwargs_json))
    with open(result_path, "w", encoding="utf-8") as fh:
        json.dump(value, fh)
