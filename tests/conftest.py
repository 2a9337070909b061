"""Shared test fixtures: the quick demo kit (built once, reused) and real service processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ddk.runtime import set_process_defaults

set_process_defaults()  # as `ddk` does at start: the tests' own torch work and every process they start

REPO = Path(__file__).resolve().parent.parent

# Where the quick kit lives; built once by the first test that needs it and reused afterwards
# (`ddk fixtures` recognises a finished kit). Override with DDK_TEST_KIT.
KIT_DIR = Path(os.environ.get("DDK_TEST_KIT", REPO / ".cache" / "kit-quick"))


@pytest.fixture(scope="session")
def kit() -> Path:
    """The `ddk fixtures --quick` kit: data/, data.yaml, train.yaml, teacher/, student/."""
    from ddk.kit.fixtures import build_kit

    return build_kit(KIT_DIR, quick=True, seed=0)
