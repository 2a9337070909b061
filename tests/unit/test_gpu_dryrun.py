"""The GPU check kept from rotting (issue 30): ``bench/gpu.sh --dry-run`` runs every part on the CPU at tiny shapes
with the same code paths and files, and the wheels of bench/device/wheels.txt are all the device machine lacks.

One dry run for the module, in a **device-like venv** when its wheels can be had: a clean venv (no site-packages
of its own) that sees, through a .pth file, only the distributions of this interpreter that the GPU machine's image
also holds (bench/device/image-packages.txt; the CPU torch stands in for the CUDA one) -- the few the check
imports and their dependencies -- and that gets everything else from the pinned wheels, which gpu.sh installs
with ``pip install --no-index --no-deps``. Python here is not the machine's 3.12, so the venv takes the same pinned
versions built for this interpreter (only pydantic-core is compiled; the rest are the very same py3 files), fetched
once into .cache/gpu-wheels/ (PyPI, as CI reaches it). Offline, the dry run falls back to this interpreter and the
venv test skips, saying why. The cp312 wheels themselves are checked against a clean Python 3.12 where one is
installed (pyenv's, here), and their dependencies against the image's list.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEVICE = REPO / "bench" / "device"
CACHE = REPO / ".cache" / "gpu-wheels"
PARTS = ("student", "eval", "teacher", "rollout", "fsdp")
# the image's distributions the dry run imports (their dependencies come along)
IMAGE_NEEDS = ("torch", "transformers", "numpy", "safetensors", "tokenizers", "httpx", "psutil", "pyyaml",
               "prometheus-client", "pip")
# every part's JSON: these fields, numbers finite (and > 0 where the name says a rate, a time or a size)
FIELDS = {
    "student": ("tokens_per_s", "mfu", "peak_mem_gib", "mfu_target", "plain_over_chunked_tokens_per_s", "rows"),
    "eval": ("chunked_peak_gib", "full_peak_gib", "ce_abs_diff", "kl_abs_diff", "chunk_tokens", "rows"),
    "teacher": ("in_process_tokens_per_s", "service_tokens_per_s", "in_process_mfu", "service_mfu",
                "service_over_in_process", "same_ids_fraction", "max_logprob_diff", "vllm"),
    "rollout": ("tokens_per_s", "seconds", "new_tokens", "prompts"),
    "fsdp": ("world_size", "backend", "checks"),
}
POSITIVE = ("tokens_per_s", "mfu", "seconds", "new_tokens", "prompts", "world_size", "chunk_tokens")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    out = {}
    for line in (DEVICE / "wheels.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[norm(name)] = version
    return out


def image_names() -> set[str]:
    return {norm(ln.strip()) for ln in (DEVICE / "image-packages.txt").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")}


def wheel_name(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return norm(name), version


def wheels_for(python_version: str) -> tuple[Path | None, str]:
    """A folder holding exactly the pinned wheels for CPython ``python_version`` (e.g. "3.11"), fetched into
    .cache/gpu-wheels/cpXY once; (None, why) when they cannot be had."""
    tag = "cp" + python_version.replace(".", "")
    want = pins()
    if tag == "cp312":  # bench/device/fetch_wheels.sh's own folder, if someone filled it
        own = DEVICE / "wheels"
        if own.is_dir() and {wheel_name(p) for p in own.glob("*.whl")} == set(want.items()):
            return own, "bench/device/wheels"
    folder = CACHE / tag
    have = {wheel_name(p) for p in folder.glob("*.whl")} if folder.is_dir() else set()
    if have != set(want.items()):
        shutil.rmtree(folder, ignore_errors=True)
        r = subprocess.run(["bash", str(DEVICE / "fetch_wheels.sh"), str(folder), "--python-version", python_version],
                           env={**os.environ, "PY": sys.executable}, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            lines = [ln for ln in (r.stderr + r.stdout).splitlines() if ln.strip() and "WARNING" not in ln]
            return None, f"cannot fetch the pinned {tag} wheels (offline?): {lines[-1] if lines else r.returncode}"
    return folder, str(folder.relative_to(REPO))


def image_closure() -> dict[str, metadata.Distribution]:
    """This interpreter's distributions that stand in for the image's: IMAGE_NEEDS and, recursively, what they
    require (installed here and not one of the names only the wheels bring)."""
    from packaging.requirements import Requirement

    site = sysconfig.get_paths()["purelib"]
    installed = {norm(d.metadata["Name"]): d for d in metadata.distributions(path=[site])}
    carried_only = set(pins()) - image_names()
    todo, out = list(IMAGE_NEEDS), {}
    while todo:
        name = norm(todo.pop())
        if name in out or name in carried_only or name not in installed:
            continue
        dist = out[name] = installed[name]
        for req in dist.requires or []:
            r = Requirement(req)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    return out


def make_device_venv(root: Path) -> tuple[Path, list[str]]:
    """A venv with no packages of its own and a .pth to a folder of links to :func:`image_closure`'s files."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    image = root / "image"
    image.mkdir()
    dists = image_closure()
    for dist in dists.values():
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops - {"__pycache__"}:
            src = Path(dist.locate_file(top))
            if src.exists() and not (image / top).exists():
                (image / top).symlink_to(src)
    py = root / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "device_image.pth").write_text(str(image) + "\n")
    return py, sorted(dists)


def python312() -> str | None:
    """A CPython 3.12 on this machine that runs (pyenv's shims on PATH may not): python3.12, else pyenv's."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    cands = [shutil.which("python3.12"), *sorted(map(str, pyenv.glob("3.12*/bin/python3.12")), reverse=True)]
    for cand in filter(None, cands):
        r = subprocess.run([cand, "-c", "import sys; print(sys.version_info[:2] == (3, 12))"], capture_output=True,
                           text=True, timeout=60)
        if r.returncode == 0 and r.stdout.strip() == "True":
            return cand
    return None


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """bench/gpu.sh --dry-run, once: (OUT folder, the completed process, how it ran, why not in the venv)."""
    base = tmp_path_factory.mktemp("gpu-dry")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    how, why = "this interpreter", None
    wheels, note = wheels_for(f"{sys.version_info.major}.{sys.version_info.minor}")
    if wheels is None:
        why = note
        env["PY"] = sys.executable
    else:
        py, dists = make_device_venv(base / "venv")
        env.update(PY=str(py), WHEELS=str(wheels))
        how = f"device-like venv ({len(dists)} image distributions, wheels from {note})"
    out = base / "out"
    env["OUT"] = str(out)
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--dry-run"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)
    return out, r, how, why, env


def numbers(obj, path=""):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from numbers(v, f"{path}[{i}]")


@pytest.mark.slow
def test_dry_run_writes_every_part_with_finite_numbers(dry_run):
    out, r, how, _, _ = dry_run
    tail = (r.stdout + r.stderr)[-3000:]
    assert r.returncode == 0, f"gpu.sh --dry-run ({how}) exited {r.returncode}:\n{tail}"
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted([f"{p}.json" for p in PARTS] + ["gpu.log", "summary.json"]), files
    assert len(files) <= 8  # what the device tool brings back
    for part in PARTS:
        doc = json.loads((out / f"{part}.json").read_text())
        assert doc["part"] == part and doc["ok"] is True and doc["dry_run"] is True, doc.get("error")
        assert "error" not in doc
        for field in FIELDS[part]:
            assert field in doc, f"{part}.json lacks {field}"
            assert doc[field] is not None, f"{part}.json: {field} is null"
        for where, x in numbers(doc):
            assert math.isfinite(x), f"{part}.json{where} = {x}"
            if where.count(".") == 1 and where[1:] in POSITIVE:  # the part's own top-level figures
                assert x > 0, f"{part}.json{where} = {x}"
        assert doc["wall_s"] > 0 and doc["versions"]["torch"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] is True and set(summary["parts"]) == set(PARTS) and "vLLM" in summary["vllm"]
    log = (out / "gpu.log").read_text()
    for part in PARTS:
        assert f"{part}| [{part}] ok" in log
    assert "vllm| not measured" in log
    # the checks that mean something even at tiny shapes
    ev = json.loads((out / "eval.json").read_text())
    assert ev["ce_abs_diff"] < 1e-2 and ev["kl_abs_diff"] < 1e-2
    assert ev["chunk_tokens"] < ev["batch"] * ev["seq"]  # several chunks: the chunked path really chunked
    te = json.loads((out / "teacher.json").read_text())
    assert te["same_ids_fraction"] >= 0.99 and te["max_logprob_diff"] < 0.05
    fs = json.loads((out / "fsdp.json").read_text())
    assert {c["check"] for c in fs["checks"]} == {"resume", "bf16", "fp32 equals unsharded", "export loads"}
    ro = json.loads((out / "rollout.json").read_text())
    assert ro["repeats_with_seed"] is True


@pytest.mark.slow
def test_the_wheels_are_what_a_device_like_venv_lacks(dry_run):
    out, r, how, why, env = dry_run
    if why:
        pytest.skip(f"the dry run ran in this interpreter, not a device-like venv: {why}")
    py = env["PY"]
    # the venv is clean: the service's packages are not there without the wheels, the image's are
    r_missing = subprocess.run([py, "-c", "import fastapi"], capture_output=True, text=True, env=env)
    assert r_missing.returncode != 0
    subprocess.run([py, "-c", "import torch, transformers, numpy, httpx, yaml, prometheus_client"],
                   check=True, env=env, timeout=120)
    assert r.returncode == 0, f"gpu.sh --dry-run in the {how} exited {r.returncode}:\n{(r.stdout + r.stderr)[-3000:]}"
    log = (out / "gpu.log").read_text()
    assert f"wheels| installed {len(pins())} wheels" in log, log[:2000]
    assert json.loads((out / "summary.json").read_text())["ok"] is True


def test_wheels_txt_pins_the_service_path_and_fits():
    """Pure: the pins name every distribution the service path needs that the image lacks, one version each."""
    p, image = pins(), image_names()
    for name in ("fastapi", "starlette", "uvicorn", "pydantic", "pydantic-core"):
        assert name in p and name not in image
    assert all(re.fullmatch(r"\d+(\.\d+)*(\.post\d+)?", v) for v in p.values()), p
    assert {"torch", "transformers", "numpy", "httpx", "prometheus-client"} <= image
    assert not ({"ray", "vllm", "pydantic", "fastapi", "uvicorn"} & image)


@pytest.mark.slow
def test_cp312_wheels_close_over_the_image_and_install_into_python312(tmp_path):
    wheels, note = wheels_for("3.12")
    if wheels is None:
        pytest.skip(note)
    from packaging.requirements import Requirement

    files = sorted(wheels.glob("*.whl"))
    assert {wheel_name(f) for f in files} == set(pins().items())
    total = sum(f.stat().st_size for f in files)
    assert total <= 48 * 2**20, f"{total / 2**20:.1f} MiB of wheels (limit 48 MiB)"
    carried, image = set(pins()), image_names()
    env312 = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
              "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
    for f in files:
        with zipfile.ZipFile(f) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            reqs = [ln.split(":", 1)[1].strip() for ln in z.read(meta).decode().splitlines()
                    if ln.startswith("Requires-Dist:")]
        for req in map(Requirement, reqs):
            if req.marker is None or req.marker.evaluate(env312):
                assert norm(req.name) in carried | image, f"{f.name} needs {req} : neither carried nor in the image"
    py312 = python312()
    if not py312:
        pytest.skip("no Python 3.12 here to install the cp312 wheels into")
    venv = tmp_path / "venv312"
    subprocess.run([str(py312), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = tmp_path / "site"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([str(py312), "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--target", str(site), *map(str, files)], check=True, env=env, timeout=300)
    code = ("import sys, fastapi, uvicorn, pydantic, pydantic_core, starlette, anyio, h11, click\n"
            "from fastapi import FastAPI\nfrom pydantic import BaseModel\n"
            "class M(BaseModel):\n    x: int\n"
            "assert M(x='3').x == 3 and FastAPI().openapi()['openapi']\n"
            "print(sys.version_info[:2], fastapi.__version__, pydantic.__version__, uvicorn.__version__)")
    r = subprocess.run([str(venv / "bin" / "python"), "-c", code], env={**env, "PYTHONPATH": str(site)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("(3, 12)"), r.stdout


def test_a_part_that_died_gets_a_json_saying_why_in_one_line(tmp_path):
    """gpu.sh's last step: a part killed at its limit, or dead before its JSON, still gets one, with the reason
    in one line (and its last printed line); a passing part stays as it wrote itself; summary.json says which."""
    (tmp_path / "eval.json").write_text(json.dumps({"part": "eval", "ok": True, "wall_s": 1.5}))
    (tmp_path / "gpu.log").write_text("student| building\nstudent| CUDA error: an illegal memory access\n"
                                      "fsdp| started\n\nrollout| half\n")
    r = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_common.py"), "summarize", str(tmp_path),
                        "student=1", "eval=0", "fsdp=124", "--log", str(tmp_path / "gpu.log"), "--dry-run"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    student = json.loads((tmp_path / "student.json").read_text())
    assert student == {"part": "student", "ok": False, "error": "exited with status 1 before writing its JSON; "
                       "last line: CUDA error: an illegal memory access"}
    fsdp = json.loads((tmp_path / "fsdp.json").read_text())
    assert fsdp["ok"] is False and fsdp["error"].startswith("timed out") and "last line: started" in fsdp["error"]
    assert json.loads((tmp_path / "eval.json").read_text())["ok"] is True
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] is False and summary["dry_run"] is True
    assert {p: v["ok"] for p, v in summary["parts"].items()} == {"student": False, "eval": True, "fsdp": False}
    assert not (tmp_path / "rollout.json").exists()  # not run: not invented
    lines = r.stdout.splitlines()
    assert any(ln.split() == ["eval", "ok"] for ln in lines)
    assert all("\n" not in v["error"] for v in summary["parts"].values() if v["error"])
    bad = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_common.py"), "summarize", str(tmp_path),
                          "nonsense=1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "PART=STATUS" in bad.stderr


def test_the_student_part_halves_its_batch_on_out_of_memory_and_keeps_the_plain_oom_as_a_result():
    """Pure logic of bench/gpu_student.py (a fake step that runs out of memory above a batch size)."""
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    try:
        from gpu_student import rows_halving_on_oom
    finally:
        sys.path.remove(str(REPO / "bench"))
    calls, freed = [], []

    def run_row(chunk, batch):
        calls.append((chunk, batch))
        if batch > (2 if chunk is None else 1):  # chunked fits at 2, plain at 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return {"loss": "chunked" if chunk is None else "plain", "batch": batch}

    rows, ooms = rows_halving_on_oom(run_row, 8, lambda: freed.append(1))
    assert calls == [(None, 8), (None, 4), (None, 2), (0, 2)]
    assert rows[0] == {"loss": "chunked", "batch": 2}
    assert rows[1]["loss"] == "plain" and rows[1]["batch"] == 2 and rows[1]["error"].startswith(
        "out of memory at batch 2: OutOfMemoryError: CUDA out of memory")
    assert [o.split(":")[0] for o in ooms] == ["out of memory at batch 8", "out of memory at batch 4"]
    assert len(freed) == 3
    rows, ooms = rows_halving_on_oom(lambda c, b: (_ for _ in ()).throw(torch.OutOfMemoryError("x")), 2,
                                     lambda: None)
    assert [r["batch"] for r in rows] == [1, 1] and all("error" in r for r in rows) and len(ooms) == 1
