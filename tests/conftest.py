"""Shared test fixtures: the quick demo kit (built once, reused) and real service processes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# as `ddk` does (services/cli.py): sleeping, not spinning, OpenMP threads for the tests' own torch work
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

# Where the quick kit lives; built once by the first test that needs it and reused afterwards
# (`ddk fixtures` recognises a finished kit). Override with DDK_TEST_KIT.
KIT_DIR = Path(os.environ.get("DDK_TEST_KIT", REPO / ".cache" / "kit-quick"))


@pytest.fixture(scope="session")
def kit() -> Path:
    """The `ddk fixtures --quick` kit: data/, data.yaml, train.yaml, teacher/, student/."""
    from services.trainer.fixtures import build_kit

    return build_kit(KIT_DIR, quick=True, seed=0)
