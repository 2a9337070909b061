"""Process-wide defaults, applied once when a ddk process starts (``ddk`` itself, the tests, the benches).

Importing this module changes nothing; :func:`set_process_defaults` does, and the entry points call it
before anything imports torch. The values are inherited by every child (the teacher, the train driver,
its Ray workers).
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning. Where the teacher, the trainer's workers and other jobs
# share a few cores, spinning threads made steps 2-5x slower (measured on the 2-core VM; docs/benchmarks.md).
PROCESS_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def set_process_defaults(environ: dict | None = None) -> None:
    """Set each default that the environment does not set already (an explicit value wins)."""
    env = os.environ if environ is None else environ
    for key, value in PROCESS_DEFAULTS.items():
        env.setdefault(key, value)
