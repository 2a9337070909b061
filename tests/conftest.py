"""Shared test fixtures: the quick demo kit (built once, reused) and real service processes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from ddk.runtime import set_process_defaults

set_process_defaults()  # as `ddk` does at start: the tests' own torch work and every process they start

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(items):
    """The order `make test` hands the modules out in (pytest-xdist's loadfile with --no-loadscope-reorder gives
    each worker the next module in this order): tests/e2e/ first, in collection order (its four Ray runs, two
    at a time), then every other module longest first by tests/durations.json, so that the modules handed out last
    are the short ones and the two workers end together (in collection order the last is one of the longest,
    unit/test_xtok_teacher.py). A module the table lacks counts as 0 s. The sort is stable, so modules of equal
    keys keep their collection order and a module's tests stay together, in their order."""
    import json

    seconds = json.loads((Path(__file__).with_name("durations.json")).read_text())["seconds"]

    def key(item):
        module = item.nodeid.split("::")[0]
        e2e = module.startswith("tests/e2e/")
        return (not e2e, 0.0 if e2e else -seconds.get(module, 0.0))

    items.sort(key=key)

# The code each kit's contents depend on: a change to one of its files builds that kit anew (and only that kit).
KIT_CODE = {"quick": ["kit/__init__.py", "kit/fixtures.py", "kit/corpus.py", "fingerprint.py", "vocab.py",
                      "trainer/optim.py", "trainer/evaluate.py"]}
KIT_CODE["real"] = KIT_CODE["quick"] + ["kit/real.py", "kit/prune.py"]


def kit_cache(kind: str = "quick") -> Path:
    """Where a test kit lives: a per-machine cache keyed by the kit builder's code (DDK_TEST_KIT_CACHE, default
    ~/.cache/ddk/test-kits/<kind>-<sha256 of KIT_CODE[kind], 12 hex>), so that a fresh clone on a machine that
    already built this kit with the same code reuses it, as pip reuses its wheel cache; a machine without it builds
    it (the quick kit about 100 s, the real kit about 10 min on a 2-core VM)."""
    digest = hashlib.sha256()
    for rel in KIT_CODE[kind]:
        path = REPO / "services" / rel
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    base = Path(os.environ.get("DDK_TEST_KIT_CACHE", Path.home() / ".cache" / "ddk" / "test-kits"))
    return base / f"{kind}-{digest.hexdigest()[:12]}"


# Where the quick kit lives; built once by the first test that needs it and reused afterwards
# (`ddk fixtures` recognises a finished kit). Override with DDK_TEST_KIT.
KIT_DIR = Path(os.environ.get("DDK_TEST_KIT", kit_cache() / "kit-quick"))


@pytest.fixture(scope="session")
def kit() -> Path:
    """The `ddk fixtures --quick` kit: data/, data.yaml, train.yaml, teacher/, student/."""
    from ddk.kit.fixtures import build_kit

    return build_kit(KIT_DIR, quick=True, seed=0)


# The real kit (`ddk fixtures --real`: the SmolLM2-135M teacher, a pruned and healed student), built once per
# machine (kit_cache) and reused. Override with DDK_TEST_REAL_KIT.
REAL_KIT_DIR = Path(os.environ.get("DDK_TEST_REAL_KIT", kit_cache("real") / "kit-real"))


@pytest.fixture(scope="session")
def real_kit() -> Path:
    """The `ddk fixtures --real` kit: data/, data.yaml, train.yaml, teacher/, student/, tokenizer/."""
    from ddk.kit.real import build_real_kit

    return build_real_kit(REAL_KIT_DIR, seed=0)


# ------------------------------------------------------------------------------------------------------------
# Real servers shared by the whole session (one of each per xdist worker, started by the first test that
# asks). Tests that use them give their runs ids of their own; a test that kills, restarts or configures a
# server differently starts its own.

@pytest.fixture(scope="session")
def server_logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("session-servers")


@pytest.fixture(scope="session")
def teacher_url(kit, server_logs) -> str:
    """`ddk teacher serve` (hf engine) on the kit's teacher, 127.0.0.1."""
    from procs import service

    with service(["teacher", "serve", "--model", str(kit / "teacher"), "--backend", "hf"],
                 log_path=server_logs / "teacher.log") as (url, _):
        yield url


@pytest.fixture(scope="session")
def real_teacher(real_kit, server_logs) -> str:
    """`ddk teacher serve` (hf engine) on the real kit's teacher (SmolLM2-135M), 127.0.0.1: the cross-tokenizer
    teacher of the quick kit's student and the real kit's own."""
    from procs import service

    with service(["teacher", "serve", "--model", str(real_kit / "teacher"), "--backend", "hf"],
                 log_path=server_logs / "real-teacher.log") as (url, _):
        yield url


@pytest.fixture(scope="session")
def controller_url(server_logs) -> str:
    """`ddk controller serve` on a SQLite file of the session, 127.0.0.1, no token."""
    from procs import service

    with service(["controller", "serve", "--db", str(server_logs / "controller.sqlite")],
                 log_path=server_logs / "controller.log", timeout=60) as (url, _):
        yield url

