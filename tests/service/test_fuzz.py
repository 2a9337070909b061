"""Bad input: generated requests against the real services, random configs against the loader.

* The config loader (services/trainer/config.py): any YAML mapping and any ``--set`` override raise
  nothing but ``UsageError`` (exit 2 with a one-line message) -- fast, no servers.
* schemathesis against the OpenAPI schemas that the teacher and the controller serve (real uvicorn
  processes on 127.0.0.1, the controller with a bearer token): schema-valid and schema-violating
  examples for every operation; no 5xx, answers match the declared schemas and content types.
  The teacher reads ``/v1/topk`` by hand (to stream and to bound the body), so FastAPI cannot
  describe its body: the test adds the body and answers of docs/architecture.md's contract to the
  served schema before fuzzing.
* Live property tests on the paths that do the work: top-k answers have the contract's shapes and
  order; any finite losses give the controller finite weights that sum to 1, or a 4xx.
* Bodies over the limit are refused with 413 before they are read whole: a declared length that never
  arrives, and a chunked body that never ends, are both answered.
* Afterwards both processes (same PIDs) still give the answers they gave before the fuzzing.
"""

from __future__ import annotations

import json
import math
import socket
import tempfile
import threading
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from ddk.errors import UsageError
from ddk.trainer.config import SECTIONS, load_config

EXAMPLES = 20          # per operation and generation mode (schemathesis)
TOKEN = "fuzz-token-1"
MAX_BATCH_TOKENS = 4096  # the teacher's body limit is then 16 x 4096 + 4 KiB
FUZZED: Counter = Counter()  # requests sent per service, printed at the end (the figures of docs/reliability.md)


# ----------------------------------------------------------------------------------------------
# the config loader (fast)

_KNOWN = {  # every section and a few of its keys, so generated configs get past the first check
    "teacher": ["urls"], "controller": ["url", "token_file"], "student": ["model"],
    "data": ["file", "domains", "seq_len", "val_fraction", "cache_dir"],
    "train": ["steps", "batch_size", "lr", "warmup_steps", "grad_clip"], "kd": ["gamma", "temperature", "top_k"],
    "mixture": ["policy", "interval_steps", "alpha", "initial_weights"], "eval": ["sequences_per_domain"],
    "ray": ["address", "num_workers", "use_gpu"], "checkpoint": ["every_steps", "keep"],
}
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
                     st.text(max_size=12), st.sampled_from(["student", "data.yaml", "/", "~", ".", "ddk", "fixed",
                                                            "http://127.0.0.1:1", "1e400", "-1", "[", "{"]))
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=8)
_keys = st.one_of(st.sampled_from(sorted(_KNOWN)), st.text(max_size=8))
_sections = st.dictionaries(
    _keys, st.one_of(_values, st.fixed_dictionaries({}, optional={k: _values for k in sum(_KNOWN.values(), [])})),
    max_size=6)
_dotted = st.one_of(st.sampled_from([f"{s}.{k}" for s, ks in _KNOWN.items() for k in ks] + list(SECTIONS)),
                    st.text(max_size=12))
_overrides = st.lists(st.one_of(st.builds(lambda k, v: f"{k}={v}", _dotted, st.text(max_size=12)),
                                st.text(max_size=16)), max_size=3)


@pytest.fixture(scope="module")
def config_dir():
    """A student directory, a data.yaml and a token next to the config file, so paths can resolve."""
    with tempfile.TemporaryDirectory(prefix="ddk-fuzz-config-") as d:
        (Path(d) / "student").mkdir()
        (Path(d) / "data.yaml").write_text("domains: []\n")
        (Path(d) / "token").write_text("t\n")
        yield Path(d)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(raw=st.one_of(_sections, _values), overrides=_overrides, text=st.one_of(st.none(), st.text(max_size=40)))
def test_config_loader_raises_only_usage_errors(config_dir, raw, overrides, text):
    path = config_dir / "train.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(raw, allow_unicode=True))
    try:
        load_config(str(path), overrides)
    except UsageError as e:  # exit 2; the message names the key (it echoes the user's text, newlines included)
        assert str(e).strip(), "an empty message"


_json = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                                st.text(max_size=6)),
                      lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner,
                                                                                            max_size=3)), max_leaves=30)
_rows = st.lists(st.lists(st.one_of(st.integers(-3, 40), _json), min_size=0, max_size=12), min_size=0, max_size=5)


_topk_docs = st.fixed_dictionaries(  # mostly well-formed fields, so that every check is reached
    {"input_ids": st.one_of(_rows, _json), "top_k": st.one_of(st.integers(1, 4), st.integers(-2, 70), _json)},
    optional={"dtype": st.one_of(st.sampled_from(["float16", "float32"]), _json), "model": _json})


@settings(max_examples=400, deadline=None)
@given(doc=st.one_of(_topk_docs, _json), raw=st.one_of(st.none(), st.binary(max_size=40)))
@example(doc=None, raw=b"[" * 50_000 + b"]" * 50_000)  # nested deeper than Python's recursion limit
@example(doc={"input_ids": [[1, 2]], "top_k": 1, "dtype": [1]}, raw=None)  # unhashable: was a 500
def test_topk_body_parser_raises_only_request_errors(doc, raw):
    """The teacher's request parser (pure): any JSON document or bytes give a 413/422 RequestError or a
    request within the limits; never another exception (which the server would turn into a 500)."""
    from ddk.teacher.validate import RequestError, parse_topk_request

    body = raw if raw is not None else json.dumps(doc).encode()
    try:
        req = parse_topk_request(body, vocab_size=32, max_seq_len=10, max_top_k=4, max_batch_tokens=30)
    except RequestError as e:
        assert e.status in (413, 422) and e.detail.split(":")[0] in ("body", "input_ids", "top_k", "dtype") or \
            e.detail.startswith("input_ids["), e.detail
        return
    lengths = [len(seq) for seq in req.input_ids]  # ragged: one array per sequence
    assert lengths and all(2 <= n <= 10 for n in lengths) and sum(lengths) <= 30 and 1 <= req.top_k <= 4
    assert all(seq.min() >= 0 and seq.max() < 32 for seq in req.input_ids)


# ----------------------------------------------------------------------------------------------
# the services

@pytest.fixture(scope="module")
def servers(kit, tmp_path_factory):
    from procs import service

    d = tmp_path_factory.mktemp("fuzz")
    (d / "token").write_text(TOKEN + "\n")
    with service(["teacher", "serve", "--model", str(kit / "teacher"), "--backend", "hf",
                  "--max-batch-tokens", str(MAX_BATCH_TOKENS)], log_path=d / "teacher.log") as (teacher, tproc), \
            service(["controller", "serve", "--db", str(d / "controller.sqlite"), "--token-file", str(d / "token")],
                    log_path=d / "controller.log") as (controller, cproc):
        yield {"teacher": teacher, "controller": controller, "pids": (tproc.pid, cproc.pid), "procs": (tproc, cproc),
               "auth": {"Authorization": f"Bearer {TOKEN}"}}
    print(f"\nfuzz: requests sent: {dict(FUZZED)}")


BATCH = {"input_ids": [[5, 17, 300, 2, 9, 1000, 44, 61], [1, 2, 3, 4, 5, 6, 7, 8]], "top_k": 4}
SPEC = {"run_id": "before-fuzz", "domains": ["a", "b", "c"], "policy": "ddk", "alpha": 0.5, "interval_steps": 4}
EVAL = {"step": 0, "student_loss": {"a": 3.0, "b": 2.0, "c": 5.5}, "teacher_loss": {"a": 2.5, "b": 1.9, "c": 2.0}}


@pytest.fixture(scope="module")
def before(servers):
    """What the services answer before any fuzzing (compared with their answers afterwards)."""
    t, c, auth = servers["teacher"], servers["controller"], servers["auth"]
    topk = httpx.post(t + "/v1/topk", json=BATCH, headers={"Accept": "application/json"}, timeout=60)
    assert topk.status_code == 200, topk.text
    assert httpx.post(c + "/v1/runs", json=SPEC, headers=auth).status_code == 201
    weights = httpx.post(f"{c}/v1/runs/{SPEC['run_id']}/evaluations", json=EVAL, headers=auth)
    assert weights.status_code == 200, weights.text
    return {"topk": topk.json(), "info": httpx.get(t + "/v1/info").json(), "weights": weights.json()["weights"],
            "history": httpx.get(f"{c}/v1/runs/{SPEC['run_id']}/history").json()}


def _teacher_schema(url: str, info: dict) -> dict:
    """The teacher's served schema plus the /v1/topk body and answers of the contract."""
    raw = httpx.get(url + "/openapi.json").json()
    vocab = info["vocab_size"]
    error = {"application/json": {"schema": {"type": "object", "required": ["detail"],
                                             "properties": {"detail": {"type": "string"}}}}}
    token = {"type": "integer", "minimum": 0, "maximum": vocab - 1}
    row = {"type": "array", "minItems": 2, "maxItems": 24, "items": token}
    body = {"type": "object", "required": ["input_ids", "top_k"], "additionalProperties": False, "properties": {
        "input_ids": {"type": "array", "minItems": 1, "maxItems": 4, "items": row},
        "top_k": {"type": "integer", "minimum": 1, "maximum": info["max_top_k"]},
        "dtype": {"enum": ["float16", "float32"]}}}
    floats = {"type": "array", "items": {"type": "number", "maximum": 0}}
    answer = {"type": "object", "required": ["sequences"], "properties": {"sequences": {"type": "array", "items": {
        "type": "object", "required": ["ids", "logprobs", "target_logprob"], "additionalProperties": False,
        "properties": {"ids": {"type": "array", "items": {"type": "array", "items": {
                                   "type": "integer", "minimum": 0, "maximum": vocab - 1}}},
                       "logprobs": {"type": "array", "items": floats}, "target_logprob": floats}}}}}
    op = raw["paths"]["/v1/topk"]["post"]
    assert "requestBody" not in op, "the teacher now declares its body: drop this patch"
    op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    op["responses"] = {"200": {"description": "top-k", "content": {"application/json": {"schema": answer},
                                                                 "application/x-ddk-topk": {"schema": {}}}},
                       **{str(s): {"description": "refused", "content": error} for s in (413, 422, 503)}}
    return raw


def _well_formed(case):
    """Schema-valid top-k examples that the contract also accepts, so that they reach the engine rather
    than stopping at a 422: whole numbers as JSON integers (JSON Schema counts 10.0 as an integer, the
    teacher does not) and rows trimmed to one length (which JSON Schema cannot say)."""
    body = case.body
    rows = [[int(v) for v in r] for r in body["input_ids"]]
    n = min(len(r) for r in rows)
    case.body = {**body, "input_ids": [r[:n] for r in rows], "top_k": int(body["top_k"])}
    return case


_names = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12)
_run_specs = st.fixed_dictionaries(  # run specs that may be accepted (the schema alone gives almost only 422s)
    {"run_id": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,30}", fullmatch=True),  # vocab.RUN_ID_PATTERN
     "domains": st.lists(_names, min_size=1, max_size=6, unique=True),
     "policy": st.sampled_from(["ddk", "ddk_raw", "fixed", "fixed", "other"]),
     "alpha": st.one_of(st.floats(0, 1), st.floats(-1, 2)), "interval_steps": st.integers(1, 10**6)},
    optional={"initial_weights": st.dictionaries(_names, st.floats(0, 2), max_size=3)})


def _with_body(strategy, bodies):
    def put(pair):
        case, body = pair
        case.body = body
        return case
    return st.tuples(strategy, bodies).map(put)


def _fuzz(schema, base_url: str, headers: dict, service: str, *, run_id: str | None = None,
          check=None) -> Counter:
    """Every operation (but SSE streams) x {positive, negative} examples; any failed check fails the test."""
    import schemathesis
    from schemathesis import checks as C

    checks = [C.not_a_server_error, C.response_schema_conformance, C.content_type_conformance]
    statuses: Counter = Counter()
    for result in schema.get_all_operations():
        op = result.ok()
        if op.path.endswith("/events"):  # an endless stream: checked in test_events_of_unknown_run_is_404
            continue
        for mode in schemathesis.GenerationMode:
            strategy = op.as_strategy(generation_mode=mode)
            if run_id is not None and "{run_id}" in op.path:  # half of them on a run that exists
                strategy = st.one_of(strategy, op.as_strategy(generation_mode=mode, path_parameters={"run_id": run_id}))
            if mode == schemathesis.GenerationMode.NEGATIVE and not len(op.body):
                continue  # only bodies can be made schema-violating here (paths are free strings)
            if mode == schemathesis.GenerationMode.POSITIVE and op.path == "/v1/topk":
                strategy = st.one_of(strategy, strategy.map(_well_formed))
            if mode == schemathesis.GenerationMode.POSITIVE and op.method == "post" and op.path == "/v1/runs":
                strategy = st.one_of(strategy, _with_body(strategy, _run_specs))

            @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def one(case):
                response = case.call_and_validate(base_url=base_url, headers=headers, checks=checks, timeout=60)
                statuses[(f"{op.method.upper()} {op.path}", mode.value, response.status_code)] += 1
                FUZZED[service] += 1
                if check is not None:
                    check(op, case, response)

            one()
    return statuses


def _check_topk_answer(op, case, response) -> None:
    """A 200 from /v1/topk has the contract's shapes: (L-1) rows of k ids and descending logprobs."""
    if op.path != "/v1/topk" or response.status_code != 200:
        return
    rows, k = case.body["input_ids"], case.body["top_k"]
    seqs = response.json()["sequences"]
    assert len(seqs) == len(rows)
    for row, seq in zip(rows, seqs):
        assert len(seq["ids"]) == len(seq["logprobs"]) == len(seq["target_logprob"]) == len(row) - 1
        for ids, lps in zip(seq["ids"], seq["logprobs"]):
            assert len(ids) == len(set(ids)) == len(lps) == k
            assert all(a >= b for a, b in zip(lps, lps[1:]))


@pytest.mark.slow
def test_schemathesis_teacher(servers, before):
    import schemathesis

    schema = schemathesis.openapi.from_dict(_teacher_schema(servers["teacher"], before["info"]))
    statuses = _fuzz(schema, servers["teacher"], {"Accept": "application/json"}, "teacher", check=_check_topk_answer)
    print("\nteacher:", sorted(statuses.items()))
    codes = {s for (_, _, s) in statuses}
    assert 200 in codes and 422 in codes  # both the engine and the validation were reached
    assert not any(s >= 500 for s in codes)


@pytest.mark.slow
def test_schemathesis_controller(servers, before):
    import schemathesis

    schema = schemathesis.openapi.from_url(servers["controller"] + "/openapi.json")
    statuses = _fuzz(schema, servers["controller"], servers["auth"], "controller", run_id=SPEC["run_id"])
    print("\ncontroller:", sorted(statuses.items()))
    by_op = Counter()
    for (op, _, status), n in statuses.items():
        by_op[(op, status // 100)] += n
    assert by_op[("POST /v1/runs", 2)] and by_op[("POST /v1/runs", 4)]  # runs created and refused
    assert by_op[("POST /v1/runs/{run_id}/evaluations", 4)]
    assert by_op[("GET /v1/runs/{run_id}/weights", 2)]  # the existing run was reached


_STEPS: Counter = Counter()  # the last step posted per run


@pytest.mark.slow
@settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_any_finite_losses_give_weights_that_sum_to_one_or_a_4xx(servers, data):
    """Huge, tiny, zero and negative losses, in any order, on real runs of every policy."""
    c, auth = servers["controller"], servers["auth"]
    policy = data.draw(st.sampled_from(["ddk", "ddk_raw", "fixed"]))
    run = f"losses-{policy}"
    httpx.post(c + "/v1/runs", json={"run_id": run, "domains": ["a", "b", "c"], "policy": policy,
                                     "alpha": 0.5, "interval_steps": 2}, headers=auth).raise_for_status()
    loss = st.floats(min_value=-1.0, max_value=1e308, allow_nan=False, allow_infinity=False)
    losses = st.fixed_dictionaries({d: loss for d in "abc"})
    _STEPS[run] += data.draw(st.sampled_from([1, 1, 1, 0, -1, 2**40]))  # mostly the next step; some stale or huge
    step = _STEPS[run]
    body = {"step": step, "student_loss": data.draw(losses), "teacher_loss": data.draw(st.one_of(st.none(), losses))}
    r = httpx.post(f"{c}/v1/runs/{run}/evaluations", json=body, headers=auth, timeout=30)
    FUZZED["controller"] += 1
    assert r.status_code in (200, 409, 422), r.text
    if r.status_code == 200:
        w = r.json()["weights"]
        assert all(math.isfinite(v) and v >= 0 for v in w.values()) and math.isclose(sum(w.values()), 1, abs_tol=1e-9)
    else:
        assert isinstance(r.json()["detail"], str) and r.json()["detail"]
    versions = [v["version"] for v in httpx.get(f"{c}/v1/runs/{run}/history").json()["versions"]]
    assert versions == list(range(len(versions)))


@pytest.mark.slow
def test_events_of_unknown_run_is_404(servers):
    r = httpx.get(servers["controller"] + "/v1/runs/no-such-run/events", timeout=10)
    assert r.status_code == 404 and "run_id" in r.json()["detail"]


# -- bodies over the limit -----------------------------------------------------------------------

def _status_of(sock: socket.socket) -> tuple[int, bytes]:
    """Read an HTTP/1.1 answer's status and body (Content-Length framed) from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next((int(h.split(":", 1)[1]) for h in lines[1:] if h.lower().startswith("content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), body


def _post_raw(url: str, path: str, headers: dict, first: bytes, more=None) -> tuple[int, bytes]:
    """POST with hand-made framing: ``first`` after the headers, then ``more()`` from a thread (errors
    ignored: the server may close the socket once it has answered). The answer is read meanwhile."""
    u = urlsplit(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=60)
    try:
        head = f"POST {path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        sock.sendall(head.encode() + first)

        def send_more():
            try:
                more(sock)
            except OSError:
                pass

        sender = threading.Thread(target=send_more, daemon=True) if more else None
        if sender:
            sender.start()
        answer = _status_of(sock)
        if sender:
            sender.join(30)
        return answer
    finally:
        sock.close()


def _endless_chunks(limit: int):
    """A chunked body: twice the limit in 16 KiB chunks, and never the terminating chunk."""
    def more(sock):
        piece = b"[" + b"1," * 8191 + b"1"
        for _ in range(2 * limit // len(piece) + 1):
            sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
    return more


@pytest.mark.slow
@pytest.mark.parametrize("service", ["teacher", "controller"])
def test_oversized_bodies_get_413_before_being_read_whole(servers, service):
    url = servers[service]
    path = "/v1/topk" if service == "teacher" else "/v1/runs"
    auth = servers["auth"] if service == "controller" else {}
    limit = 16 * MAX_BATCH_TOKENS + 4096 if service == "teacher" else 1 << 20
    # 1. a declared gigabyte, of which only a few bytes ever come: answered at once
    status, body = _post_raw(url, path, {**auth, "Content-Length": str(1 << 30)}, b'{"input_ids": [[')
    assert status == 413 and "body" in json.loads(body)["detail"]
    # 2. a chunked body (no length) that never ends: answered once it passes the limit
    status, body = _post_raw(url, path, {**auth, "Transfer-Encoding": "chunked"}, b"", _endless_chunks(limit))
    assert status == 413 and "body" in json.loads(body)["detail"]
    # 3. a body just over the limit with an honest length
    r = httpx.post(url + path, content=b" " * (limit + 1), headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 413


@pytest.mark.slow
@pytest.mark.parametrize("service", ["teacher", "controller"])
def test_deeply_nested_json_is_a_4xx(servers, service):
    url = servers[service] + ("/v1/topk" if service == "teacher" else "/v1/runs")
    body = b"[" * 30_000 + b"]" * 30_000  # within both body limits, deeper than Python's recursion limit
    r = httpx.post(url, content=body, headers={**servers["auth"], "Content-Type": "application/json"}, timeout=30)
    assert 400 <= r.status_code < 500 and r.status_code != 413 and "body" in r.json()["detail"], r.text


# -- afterwards ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_both_services_answer_as_before_afterwards(servers, before):
    t, c, auth = servers["teacher"], servers["controller"], servers["auth"]
    assert all(p.poll() is None for p in servers["procs"])  # the same processes, never restarted
    assert httpx.get(t + "/healthz").status_code == 200 and httpx.get(c + "/healthz").status_code == 200
    again = httpx.post(t + "/v1/topk", json=BATCH, headers={"Accept": "application/json"}, timeout=60)
    assert again.status_code == 200 and again.json() == before["topk"]
    # the binary answer of the Python client carries the same numbers
    from ddk.teacher.client import TeacherClient

    with TeacherClient(t, dtype="float32") as client:
        out = client.topk(BATCH["input_ids"], BATCH["top_k"])
    for i, seq in enumerate(before["topk"]["sequences"]):
        assert out.ids[i].tolist() == seq["ids"]
        np.testing.assert_allclose(out.logprobs[i].numpy(), np.array(seq["logprobs"]), atol=1e-6)
    # the controller: the run made before is untouched, and the same spec and evaluation give the same weights
    assert httpx.get(f"{c}/v1/runs/{SPEC['run_id']}/history").json() == before["history"]
    spec = {**SPEC, "run_id": "after-fuzz"}
    assert httpx.post(c + "/v1/runs", json=spec, headers=auth).status_code == 201
    r = httpx.post(f"{c}/v1/runs/after-fuzz/evaluations", json=EVAL, headers=auth)
    assert r.status_code == 200 and r.json()["weights"] == before["weights"]
