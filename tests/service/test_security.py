"""Security checks: tokens on every controller write, loopback by default, no code-executing formats,
no model or file path chosen through the APIs.

Fast where possible: the apps are built in-process (their route tables and OpenAPI schemas are what
the servers serve); one real controller process checks the bound address and a refused write end to end.
"""

from __future__ import annotations

import re

import httpx
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from procs import REPO, service

TOKEN = "s3cret-token"
WRITES = {"POST", "PUT", "PATCH", "DELETE"}


def _routes(app) -> set[tuple[str, str]]:
    """Every (method, path) the app answers, hidden routes included (not only the OpenAPI listing)."""
    out = set()
    for r in app.routes:
        for m in getattr(r, "methods", None) or ():
            out.add((m, r.path))
    return out


def _example_path(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "some-run", path)


# -- the controller's token ------------------------------------------------------------------------

@pytest.fixture
def controller_app(tmp_path):
    from ddk.controller.app import create_app

    return create_app(tmp_path / "c.sqlite", token=TOKEN)


def test_every_controller_write_route_needs_the_token(controller_app):
    schema = controller_app.openapi()
    listed = {(m.upper(), p) for p, ops in schema["paths"].items() for m in ops}
    writes = {(m, p) for m, p in _routes(controller_app) | listed if m in WRITES}
    assert ("POST", "/v1/runs") in writes and ("POST", "/v1/runs/{run_id}/evaluations") in writes
    with TestClient(controller_app) as client:
        for method, path in sorted(writes):
            url = _example_path(path)
            r = client.request(method, url, json={})
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (method, path, r.text)
            r = client.request(method, url, json={}, headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 403, (method, path, r.text)
            r = client.request(method, url, json={}, headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code not in (401, 403), (method, path, r.text)  # the token opens it
        # also methods no route declares, and unknown paths: refused before routing
        for method in sorted(WRITES):
            assert client.request(method, "/v1/runs/x/weights").status_code == 401
            assert client.request(method, "/v1/anything").status_code == 401


def test_reads_stay_open_and_a_refused_write_changes_nothing(controller_app):
    spec = {"run_id": "r", "domains": ["a", "b"], "policy": "ddk", "alpha": 0.5, "interval_steps": 4}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(controller_app) as client:
        assert client.post("/v1/runs", json=spec).status_code == 401
        assert client.get("/v1/runs/r").status_code == 404  # not created
        assert client.post("/v1/runs", json=spec, headers=auth).status_code == 201
        ev = {"step": 0, "student_loss": {"a": 2.0, "b": 3.0}, "teacher_loss": {"a": 1.0, "b": 1.0}}
        assert client.post("/v1/runs/r/evaluations", json=ev).status_code == 401
        for path in ("/v1/runs", "/v1/runs/r", "/v1/runs/r/weights", "/v1/runs/r/history", "/metrics", "/healthz"):
            assert client.get(path).status_code == 200, path
        assert client.get("/v1/runs/r/weights").json()["version"] == 0  # the refused evaluation left no trace


def test_token_compare_is_constant_time():
    """The check uses hmac.compare_digest (no early exit on the first differing byte)."""
    src = (REPO / "services" / "controller" / "app.py").read_text()
    assert "hmac.compare_digest" in src


@pytest.mark.slow
def test_controller_process_binds_loopback_and_refuses_unauthenticated_writes(tmp_path):
    (tmp_path / "token").write_text(TOKEN + "\n")
    with service(["controller", "serve", "--db", str(tmp_path / "c.sqlite"), "--token-file",
                  str(tmp_path / "token")]) as (url, proc):
        port = int(url.rsplit(":", 1)[1])
        assert _listening_addresses(proc.pid, port) == {"127.0.0.1"}
        r = httpx.post(url + "/v1/runs", json={"run_id": "x", "domains": ["a"]})
        assert r.status_code == 401 and r.json()["detail"].startswith("authorization")
        assert httpx.get(url + "/v1/runs/x").status_code == 404


def _listening_addresses(pid: int, port: int) -> set[str]:
    import psutil

    procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    addrs = set()
    for p in procs:
        for c in p.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port:
                addrs.add(c.laddr.ip)
    return addrs


# -- loopback by default ------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["teacher", "serve", "--model", "m"], ["controller", "serve"]])
def test_cli_defaults_to_loopback(argv):
    from ddk.cli import build_parser

    assert build_parser().parse_args(argv).host == "127.0.0.1"


def test_servers_pass_the_host_to_uvicorn(kit, tmp_path, monkeypatch):
    """What the servers hand uvicorn: the default host, or the one asked for (no hidden 0.0.0.0)."""
    import uvicorn

    from ddk.cli import build_parser

    bound = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: bound.append(self.config.host))
    monkeypatch.setattr(uvicorn.Server, "started", True, raising=False)
    from ddk.controller.server import main as controller_main
    from ddk.teacher.server import main as teacher_main

    parse = build_parser().parse_args
    teacher_main(parse(["teacher", "serve", "--model", str(kit / "teacher"), "--backend", "hf"]))
    controller_main(parse(["controller", "serve", "--db", str(tmp_path / "c.sqlite")]))
    controller_main(parse(["controller", "serve", "--db", str(tmp_path / "c.sqlite"), "--host", "::1"]))
    assert bound == ["127.0.0.1", "127.0.0.1", "::1"]


# -- no code-executing formats -------------------------------------------------------------------

FORBIDDEN = {
    "pickle": r"^\s*(import|from)\s+(pickle|cPickle|_pickle|cloudpickle|dill|joblib)\b|\bpickle\.loads?\(",
    "torch.load without weights_only=True": r"\btorch\.load\((?![^)]*weights_only\s*=\s*True)",
    "trust_remote_code=True": r"trust_remote_code\s*=\s*True",
    "numpy allow_pickle=True": r"allow_pickle\s*=\s*True",
    "yaml.load (not safe_load)": r"\byaml\.(unsafe_)?load\(|Loader\s*=\s*yaml\.(Unsafe|Full)?Loader",
    "eval/exec": r"(?<![\w.])(eval|exec)\(",
    "unsafe (de)serialisation switches": r"(use_safetensors|safe_serialization)\s*=\s*False",
    "marshal/shelve": r"^\s*(import|from)\s+(marshal|shelve)\b",
}


def _violations(text: str) -> list[str]:
    found = []
    for what, pattern in FORBIDDEN.items():
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.lstrip().startswith("#"):
                continue
            if re.search(pattern, line.split("  #")[0]):
                found.append(f"{line_no}: {what}: {line.strip()}")
    return found


@pytest.mark.parametrize("bad", [
    "import pickle", "from cloudpickle import dumps", "x = pickle.loads(b)", "torch.load(path)",
    "torch.load(path, map_location='cpu')", "AutoModel.from_pretrained(p, trust_remote_code=True)",
    "np.load(f, allow_pickle=True)", "yaml.load(text)", "yaml.load(t, Loader=yaml.Loader)", "eval(code)",
    "model.save_pretrained(p, safe_serialization=False)", "import marshal",
])
def test_the_scan_finds_each_forbidden_pattern(bad):
    assert _violations(bad), bad


@pytest.mark.parametrize("good", [
    "torch.load(path, weights_only=True)", "model.eval()", "yaml.safe_load(text)",
    "from_pretrained(p, trust_remote_code=False)", "save_file(tensors, path)",
])
def test_the_scan_passes_safe_code(good):
    assert not _violations(good), good


def test_no_pickle_or_remote_code_in_services():
    files = sorted((REPO / "services").rglob("*.py"))
    assert len(files) > 20
    found = [f"{f.relative_to(REPO)}:{v}" for f in files for v in _violations(f.read_text())]
    assert not found, "\n".join(found)


def test_model_loading_asks_for_safetensors_and_no_remote_code():
    """Every from_pretrained in services/ either says trust_remote_code=False or is a tokenizer/config load
    whose default is False; model weights load with use_safetensors=True where the trainer loads them."""
    worker = (REPO / "services" / "trainer" / "loop.py").read_text()
    assert re.search(r"from_pretrained\([^)]*use_safetensors=True", worker)
    for f in sorted((REPO / "services").rglob("*.py")):
        for m in re.finditer(r"AutoModel\w*\.from_pretrained\(([^)]*)\)", f.read_text()):
            assert "trust_remote_code=True" not in m.group(1), f


# -- no paths through the APIs --------------------------------------------------------------------

PATHLIKE = re.compile(r"(path|file|dir|model|db|root|url)", re.I)


def test_teacher_api_has_no_route_that_takes_a_model_or_a_path():
    from ddk.teacher.app import create_app

    app = create_app(lambda: None)
    routes = {(m, p) for m, p in _routes(app) if p not in ("/openapi.json", "/docs", "/docs/oauth2-redirect",
                                                          "/redoc")}
    assert routes == {("GET", "/healthz"), ("GET", "/v1/info"), ("POST", "/v1/topk"), ("GET", "/metrics"),
                      ("GET", "/v1/tokenizer"), ("POST", "/v1/generate")}
    for r in app.routes:  # no path or query parameter on any route
        if isinstance(r, APIRoute):
            assert not r.dependant.path_params and not r.dependant.query_params, r.path


def test_teacher_refuses_any_body_field_but_ids_top_k_and_dtype():
    from ddk.teacher.validate import RequestError, parse_topk_request

    for field in ("model", "model_path", "path", "backend", "trust_remote_code"):
        body = f'{{"input_ids": [[1, 2]], "top_k": 1, "{field}": "/etc/passwd"}}'.encode()
        with pytest.raises(RequestError) as e:
            parse_topk_request(body, vocab_size=16, max_seq_len=8, max_top_k=4, max_batch_tokens=64)
        assert e.value.status == 422 and field in e.value.detail


def test_controller_api_takes_no_file_path(controller_app):
    """No body field, path or query parameter of the controller names a file, a model or a database."""
    schema = controller_app.openapi()
    for path, ops in schema["paths"].items():
        for op in ops.values():
            for param in op.get("parameters", []):
                assert param["name"] == "run_id" or not PATHLIKE.search(param["name"]), (path, param)
    for name, comp in schema.get("components", {}).get("schemas", {}).items():
        for prop in comp.get("properties", {}):
            assert not PATHLIKE.search(prop), (name, prop)
    # a run_id cannot walk out of anything either: it is a name, checked against a strict pattern
    with TestClient(controller_app) as client:
        for bad in ("../../etc/passwd", "/abs", "a/b", "..", "a\\b"):
            r = client.post("/v1/runs", json={"run_id": bad, "domains": ["a"]},
                            headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 422 and r.json()["detail"].startswith("run_id"), bad


def test_no_socket_binds_to_all_interfaces_in_services():
    """Nothing in services/ binds 0.0.0.0 or '' by itself (deploy files may, deliberately, and say so)."""
    for f in sorted((REPO / "services").rglob("*.py")):
        text = f.read_text()
        assert "0.0.0.0" not in text and 'host=""' not in text, f
