"""Packaging: the wheel holds every module of services/ and the controller's page, and a fresh venv with nothing
but the wheel installed (no editable install; the dependencies borrowed from .venv's site-packages through a .pth
line, so nothing is downloaded) imports every module and finds every registered policy.

Issue 23 item 7: a non-editable install once shipped without ``ddk.controller.policies`` (the packages were
listed by hand in pyproject.toml); setup.py now finds them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SERVICES = REPO / "services"

pytestmark = pytest.mark.slow

IMPORT_ALL = """
import importlib, json, sys
import ddk
failed = {}
for name in json.loads(sys.argv[1]):
    try:
        importlib.import_module(name)
    except Exception as e:  # every failure reported, not just the first
        failed[name] = f"{type(e).__name__}: {e}"
from importlib.resources import files
from ddk.controller import policies
names = list(policies.names())
got = {n: policies.get(n).name for n in names}
print(json.dumps({"ddk": ddk.__file__, "failed": failed, "policies": names, "got": got,
                  "page": (files("ddk.controller") / "static" / "index.html").is_file()}))
"""


def source_modules() -> list[str]:
    """Every module of the source tree as its import name (services/x/y.py -> ddk.x.y)."""
    out = []
    for p in sorted(SERVICES.rglob("*.py")):
        parts = list(p.relative_to(SERVICES).with_suffix("").parts)
        out.append(".".join(["ddk", *(parts[:-1] if parts[-1] == "__init__" else parts)]))
    return out


def build_wheel(tmp: Path) -> Path:
    """``pip wheel --no-deps --no-build-isolation`` of a copy of the project (the build writes build/ and
    *.egg-info next to its sources: not into the shared checkout)."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, src / name)
    shutil.copytree(SERVICES, src / "services", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(out), str(src)], check=True, capture_output=True, text=True, timeout=120)
    (wheel,) = out.glob("ddk-*.whl")
    return wheel


def fresh_venv(tmp: Path, wheel: Path) -> Path:
    """A plain venv (no pip in it), the wheel installed with --no-deps by .venv's pip, and .venv's
    site-packages appended to its path by a .pth line (the dependencies, not ddk: the editable install's own
    .pth files there are not processed, since only site-packages folders themselves are)."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "-q", str(wheel)], check=True, capture_output=True, text=True, timeout=120)
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    (purelib / "zz-dependencies-from-dot-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def test_the_wheel_installs_alone_and_imports_every_module_and_policy(tmp_path):
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(p.relative_to(SERVICES.parent)).replace("services/", "ddk/", 1)
                for p in SERVICES.rglob("*.py")}
    assert expected - names == set(), f"modules missing from the wheel: {sorted(expected - names)}"
    assert "ddk/controller/static/index.html" in names
    assert not any(n.startswith("services/") for n in names)

    python = fresh_venv(tmp_path, wheel)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    modules = source_modules()
    proc = subprocess.run([str(python), "-c", IMPORT_ALL, json.dumps(modules)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(got["ddk"]).is_relative_to(tmp_path / "venv"), got["ddk"]  # the wheel's ddk, not the checkout's
    assert got["failed"] == {}
    assert got["page"] is True
    # every policy module of the source tree registered its policy in the installed copy (one module, one policy)
    files = sorted(p.stem for p in (SERVICES / "controller" / "policies").glob("*.py") if not p.stem.startswith("_"))
    assert len(got["policies"]) == len(files) and len(files) >= 5, (got["policies"], files)
    assert got["got"] == {n: n for n in got["policies"]}
