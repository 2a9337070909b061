"""The teacher service for real: HF engine, uvicorn servers on 127.0.0.1, the Python client.

Expected numbers come from an independent reference computed here with plain transformers
(float32 forward, float64 log_softmax over the full vocabulary), never from the service's code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

import procs
from procs import DDK, REPO, Proc, free_port

pytestmark = pytest.mark.slow

TOL = 1e-4  # fp32 engine vs fp32/fp64 reference
SEQ = 64


# -- reference and data ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(kit) -> Path:
    return kit / "teacher"


@pytest.fixture(scope="module")
def ref_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def reference_logprobs(ref_model, ids: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logprobs [B, L-1, V] (float64) of the token after each position."""
    with torch.inference_mode():
        logits = ref_model(input_ids=ids).logits[:, :-1]
    return torch.log_softmax(logits.double(), dim=-1)


def check_against_reference(out, ids: torch.Tensor, k: int, ref: torch.Tensor, tol: float = TOL) -> None:
    """Top-k values equal the reference's k largest; each returned id carries its reference value
    (so ties may reorder ids without failing); target logprobs match; no id repeats in a row."""
    b, length = ids.shape
    assert tuple(out.ids.shape) == (b, length - 1, k) and out.ids.dtype == torch.int64
    assert tuple(out.logprobs.shape) == (b, length - 1, k) and out.logprobs.dtype == torch.float32
    assert tuple(out.target_logprob.shape) == (b, length - 1)
    top = ref.topk(k, dim=-1).values
    assert (out.logprobs.double() - top).abs().max().item() <= tol
    assert (ref.gather(-1, out.ids) - out.logprobs.double()).abs().max().item() <= tol
    target = ref.gather(-1, ids[:, 1:, None])[..., 0]
    assert (out.target_logprob.double() - target).abs().max().item() <= tol
    assert (out.logprobs[..., 1:] <= out.logprobs[..., :-1] + 1e-6).all()
    assert all(len(set(row)) == k for row in out.ids.reshape(-1, k).tolist())


@pytest.fixture(scope="module")
def batch(kit, model_dir) -> torch.Tensor:
    """[16, SEQ]: validation text of every domain of the kit, tokenised with the teacher's tokenizer,
    plus two rows of random ids (flat, unusual distributions)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for val in sorted((kit / "data").glob("*/val.jsonl")):
        text = "\n".join(json.loads(line)["text"] for line in val.read_text().splitlines()[:50])
        ids = tok(text)["input_ids"]
        rows += [ids[i * SEQ:(i + 1) * SEQ] for i in range(3) if len(ids) >= (i + 1) * SEQ]
    g = torch.Generator().manual_seed(0)
    rows = rows[:14] + torch.randint(0, len(tok), (2, SEQ), generator=g).tolist()
    assert len(rows) >= 8
    return torch.tensor(rows, dtype=torch.long)


@pytest.fixture(scope="module")
def ref(ref_model, batch) -> torch.Tensor:
    return reference_logprobs(ref_model, batch)


# -- servers ---------------------------------------------------------------------------------

def start_teacher(model_dir, *extra, port=None, log_path=None) -> Proc:
    """`ddk teacher serve` started (not yet healthy) on ``port`` or a free one."""
    return procs.start(["teacher", "serve", "--model", str(model_dir), *extra], log_path, port or free_port())


def first_health_status(url, proc, timeout=120.0) -> int:
    """The status of the first /healthz answer after the port opens."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "teacher exited during start-up"
        try:
            return httpx.get(url + "/healthz", timeout=2).status_code
        except httpx.TransportError:
            time.sleep(0.02)
    raise TimeoutError(url)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """One hf-backend server: small per-request token limit and a short queue, so that the queue
    limit is reachable in a test."""
    log = tmp_path_factory.mktemp("teacher") / "hf.log"
    proc = start_teacher(model_dir, "--backend", "hf", "--max-batch-tokens", "4096", "--max-queue", "2",
                         log_path=log)
    url = proc.url
    try:
        first = first_health_status(url, proc)
        proc.wait_healthy(timeout=120)
        yield {"url": url, "proc": proc, "first_health": first, "log": log}
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(server):
    from ddk.teacher.client import TeacherClient

    c = TeacherClient(server["url"], dtype="float32")
    yield c
    c.close()


def metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(url + "/metrics").text
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


# -- engine in-process -----------------------------------------------------------------------

def test_hf_engine_matches_reference_with_mixed_lengths_and_k(model_dir, ref_model, batch, ref):
    from ddk.teacher.engines import HFEngine

    engine = HFEngine(model_dir, dtype="float32", device="cpu")
    short = batch[:3, :10]
    seqs = [s.numpy() for s in batch] + [s.numpy() for s in short]
    ks = [16] * len(batch) + [1, 5, 64]
    res = engine.topk(seqs, ks)  # one padded batch: long and short rows, different k
    for r, k, ids, rf in zip(res, ks, list(batch) + list(short),
                             list(ref) + list(reference_logprobs(ref_model, short))):
        out = type("Out", (), {})()
        out.ids = torch.from_numpy(r.ids.astype(np.int64))[None]
        out.logprobs = torch.from_numpy(r.logprobs)[None]
        out.target_logprob = torch.from_numpy(r.target_logprob)[None]
        check_against_reference(out, ids[None], k, rf[None])


# -- HTTP ------------------------------------------------------------------------------------

def test_health_is_503_while_loading_then_info(server, client, model_dir):
    from transformers import AutoTokenizer

    from ddk.fingerprint import tokenizer_fingerprint

    assert server["first_health"] == 503
    assert httpx.get(server["url"] + "/healthz").status_code == 200
    info = httpx.get(server["url"] + "/v1/info").json()
    cfg = json.loads((model_dir / "config.json").read_text())
    assert set(info) == {"model", "backend", "vocab_size", "max_seq_len", "max_top_k", "tokenizer_fingerprint",
                         "model_fingerprint"}
    assert info["backend"] == "hf"
    assert info["vocab_size"] == cfg["vocab_size"]
    assert info["max_seq_len"] == cfg["max_position_embeddings"]
    assert info["max_top_k"] == 64
    assert info["tokenizer_fingerprint"] == tokenizer_fingerprint(AutoTokenizer.from_pretrained(model_dir))
    assert client.info() == info  # what the trainer reads to refuse a mismatched student


def test_binary_frames_match_reference_and_json(server, client, batch, ref):
    out = client.topk(batch, 16)
    check_against_reference(out, batch, 16, ref)
    # the same request as JSON carries the same numbers
    r = httpx.post(server["url"] + "/v1/topk", json={"input_ids": batch.tolist(), "top_k": 16},
                   headers={"Accept": "application/json"}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    seqs = r.json()["sequences"]
    assert len(seqs) == len(batch)
    assert torch.equal(torch.tensor([s["ids"] for s in seqs]), out.ids)
    assert torch.equal(torch.tensor([s["logprobs"] for s in seqs], dtype=torch.float32), out.logprobs)
    assert torch.equal(torch.tensor([s["target_logprob"] for s in seqs], dtype=torch.float32), out.target_logprob)
    # binary is the default media type, and the body is exactly B frames of the documented size
    raw = httpx.post(server["url"] + "/v1/topk", json={"input_ids": batch[:2].tolist(), "top_k": 16}, timeout=60)
    assert raw.headers["content-type"] == "application/x-ddk-topk"
    assert len(raw.content) == 2 * (24 + (SEQ - 1) * 16 * (4 + 4) + (SEQ - 1) * 4)


RAGGED = (5, 17, 2, 33)


def test_ragged_request_matches_reference_per_sequence(server, client, ref_model, batch):
    """Sequences of lengths 5, 17, 2, 33 in one request (one padded engine batch): each sequence's rows equal
    the unpadded reference of that sequence alone, in binary frames (client) and in JSON; ragged frames carry
    their own rows."""
    from ddk.teacher.wire import decode_frames

    seqs = [batch[i, :n] for i, n in enumerate(RAGGED)]
    refs = [reference_logprobs(ref_model, s[None])[0] for s in seqs]
    k = 8
    outs = client.topk_ragged(seqs, k)
    assert len(outs) == len(seqs)
    for out, s, rf in zip(outs, seqs, refs):
        as_batch = type("Out", (), {a: getattr(out, a)[None] for a in ("ids", "logprobs", "target_logprob")})
        check_against_reference(as_batch, s[None], k, rf[None])
    r = httpx.post(server["url"] + "/v1/topk", json={"input_ids": [s.tolist() for s in seqs], "top_k": k},
                   headers={"Accept": "application/json"}, timeout=60)
    assert r.status_code == 200
    answer = r.json()["sequences"]
    for got, out in zip(answer, outs):  # JSON: the same numbers as the frames, in request order
        assert torch.equal(torch.tensor(got["ids"]), out.ids)
        assert torch.equal(torch.tensor(got["logprobs"], dtype=torch.float32), out.logprobs)
        assert torch.equal(torch.tensor(got["target_logprob"], dtype=torch.float32), out.target_logprob)
    raw = httpx.post(server["url"] + "/v1/topk", json={"input_ids": [s.tolist() for s in seqs], "top_k": k},
                     timeout=60).content
    frames = sorted(decode_frames(raw), key=lambda f: f.index)
    assert [f.ids.shape for f in frames] == [(n - 1, k) for n in RAGGED]
    assert len(raw) == sum(24 + (n - 1) * k * 8 + (n - 1) * 4 for n in RAGGED)
    with pytest.raises(ValueError, match="topk_ragged"):  # the equal-length API stays as it was
        client.topk([s.tolist() for s in seqs], k)


def test_float16_frames_within_half_precision(batch, server, client):
    from ddk.teacher.client import TeacherClient

    full = client.topk(batch, 8)
    with TeacherClient(server["url"], dtype="float16") as half_client:
        half = half_client.topk(batch, 8)
    assert torch.equal(half.ids, full.ids)
    bound = full.logprobs.abs() * 2 ** -11 + 1e-7
    assert ((half.logprobs - full.logprobs).abs() <= bound).all()
    tbound = full.target_logprob.abs() * 2 ** -11 + 1e-7
    assert ((half.target_logprob - full.target_logprob).abs() <= tbound).all()


BAD = [  # (body: str, dict, or a function of /v1/info giving the dict), status, words of the detail
    ("not json", 422, "body"),
    ('["input_ids", "top_k"]', 422, "body"),
    ({"input_ids": [[1, 2]]}, 422, "top_k"),
    ({"input_ids": [[1, 2]], "top_k": 0}, 422, "top_k"),
    ({"input_ids": [[1, 2]], "top_k": 65}, 422, "top_k"),
    ({"input_ids": [[1, 2]], "top_k": "3"}, 422, "top_k"),
    ({"input_ids": [], "top_k": 3}, 422, "input_ids"),
    ({"input_ids": [[1, 2], [3]], "top_k": 3}, 422, "input_ids[1]"),
    ({"input_ids": [[5]], "top_k": 3}, 422, "at least 2"),
    ({"input_ids": [[1, 2.5]], "top_k": 3}, 422, "input_ids[0][1]"),
    ({"input_ids": [[1, -1]], "top_k": 3}, 422, "input_ids[0][1]"),
    (lambda info: {"input_ids": [[1, info["vocab_size"]]], "top_k": 3}, 422, "input_ids[0][1]"),
    ({"input_ids": [[1, 2]], "top_k": 3, "dtype": "int4"}, 422, "dtype"),
    ({"input_ids": [[1] * 50] * 83, "top_k": 3}, 413, "limit of 4096"),
    (lambda info: {"input_ids": [[1] * (info["max_seq_len"] + 1)], "top_k": 3}, 413, "max_seq_len"),
]


@pytest.mark.parametrize("body, status, field", BAD, ids=[f"{i}-{s}" for i, (_, s, _) in enumerate(BAD)])
def test_bad_input_is_4xx_naming_the_field(server, body, status, field):
    url = server["url"]
    if callable(body):
        body = body(httpx.get(url + "/v1/info").json())
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(url + "/v1/topk", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert field in r.json()["detail"]
    assert httpx.get(url + "/healthz").status_code == 200  # still serving


def test_body_over_the_limit_is_413(server):
    limit = 16 * 4096 + 4096
    r = httpx.post(server["url"] + "/v1/topk", content=b"{" + b" " * limit + b"}",
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "body" in r.json()["detail"]


def test_metrics_count_requests_and_tokens(server, client, batch):
    url = server["url"]
    before = metric(url, "ddk_teacher_tokens_total")
    ok_before = metric(url, "ddk_teacher_requests_total", '{status="200"}')
    bad_before = metric(url, "ddk_teacher_requests_total", '{status="422"}')
    client.topk(batch[:5, :33], 4)
    httpx.post(url + "/v1/topk", json={"input_ids": [[1]], "top_k": 1})
    assert metric(url, "ddk_teacher_tokens_total") - before == 5 * 33
    assert metric(url, "ddk_teacher_requests_total", '{status="200"}') - ok_before == 1
    assert metric(url, "ddk_teacher_requests_total", '{status="422"}') - bad_before == 1
    text = httpx.get(url + "/metrics").text
    for name in ("ddk_teacher_request_seconds_bucket", "ddk_teacher_queue_depth", "ddk_teacher_batch_seconds_count"):
        assert name in text


def test_eight_concurrent_clients_all_get_correct_answers(server, batch, ref):
    """8 clients at once (more than the queue of 2 holds: the client retries the 503s); the server
    batches requests together."""
    from ddk.teacher.client import TeacherClient

    url = server["url"]
    before_count = metric(url, "ddk_teacher_batch_sequences_count")
    before_le4 = metric(url, "ddk_teacher_batch_sequences_bucket", '{le="4.0"}')
    barrier = threading.Barrier(8)

    def work(i):
        rows = [(2 * i + j) % len(batch) for j in range(4)]
        with TeacherClient(url, dtype="float32", backoff=0.05) as c:
            barrier.wait()
            return rows, c.topk(batch[rows], 8)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(8)))
    for rows, out in results:
        check_against_reference(out, batch[rows], 8, ref[rows])
    batches = metric(url, "ddk_teacher_batch_sequences_count") - before_count
    small = metric(url, "ddk_teacher_batch_sequences_bucket", '{le="4.0"}') - before_le4
    assert batches < 8 and small < batches, "no engine batch held more than one request"


def test_full_queue_answers_503_with_retry_after(server, batch):
    """Requests of 4096 tokens run one per engine batch; with 2 allowed to wait, a burst of 8
    must see 503s, each with Retry-After and a JSON detail; the rest succeed."""
    url = server["url"]
    body = json.dumps({"input_ids": batch[:, :].repeat(4, 1)[:64].tolist(), "top_k": 4})
    barrier = threading.Barrier(8)

    def post(_):
        barrier.wait()
        return httpx.post(url + "/v1/topk", content=body, headers={"Content-Type": "application/json"}, timeout=60)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(post, range(8)))
    codes = sorted(r.status_code for r in answers)
    assert set(codes) == {200, 503} and codes.count(200) >= 3, codes
    for r in answers:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1
            assert "queue" in r.json()["detail"]
    assert httpx.get(url + "/healthz").status_code == 200


# -- client failover -------------------------------------------------------------------------

def test_failover_when_a_replica_dies_mid_stream_and_comes_back(server, model_dir, ref_model, tmp_path):
    """Two replicas (A, started here, and the module's server as B) and a stream of batches; A is
    killed while one of them is in flight on it. Every batch still completes with the right
    numbers; restarted on its port, A gets traffic again after the cool-down.

    To make "in flight" certain rather than a race, A is frozen (SIGSTOP) first: the next batch
    the client sends to A waits on the open connection, and only then is A killed (SIGKILL)."""
    from ddk.teacher.client import TeacherClient

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 2000, (8, 8, SEQ), generator=g)
    port_a = free_port()
    proc_a = start_teacher(model_dir, "--backend", "hf", port=port_a, log_path=tmp_path / "a.log")
    a, b = proc_a.url, server["url"]
    try:
        proc_a.wait_healthy()
        client = TeacherClient([a, b], dtype="float32", backoff=0.05, cooldown=1.0, max_retries=6)
        in_flight_on_a = [0]  # requests sent to A whose response has not begun

        def on_request(request):  # httpx event hooks of the client's per-replica keep-alive clients
            if request.url.port == port_a:
                in_flight_on_a[0] += 1

        def on_response(response):
            if response.request.url.port == port_a:
                in_flight_on_a[0] -= 1

        for rep in client._replicas:
            rep.http.event_hooks = {"request": [on_request], "response": [on_response]}
        outs, done = [], threading.Event()

        def run():
            for batch in ids:
                outs.append(client.topk(batch, 4))
            done.set()

        t = threading.Thread(target=run)
        t.start()
        while len(outs) < 3 and t.is_alive():
            time.sleep(0.005)
        os.kill(proc_a.pid, signal.SIGSTOP)  # A's uvicorn process stops answering
        deadline = time.monotonic() + 60
        while True:  # until a batch has been waiting on A for a while (the client sends one within 2 batches)
            assert time.monotonic() < deadline, "no batch went to replica A"
            if in_flight_on_a[0] > 0:
                time.sleep(0.3)
                if in_flight_on_a[0] > 0:
                    break
            time.sleep(0.01)
        assert not done.is_set()
        proc_a.kill()  # A dies (SIGKILL) with the request in flight
        t.join(120)
        assert done.is_set() and len(outs) == len(ids)
        # restart A on its port now, so that its start-up overlaps the reference check
        proc_a.start()  # the same command, port and log
        flat = ids.reshape(-1, SEQ)
        got = type("Out", (), {k: torch.cat([getattr(o, k) for o in outs])
                               for k in ("ids", "logprobs", "target_logprob")})
        check_against_reference(got, flat, 4, reference_logprobs(ref_model, flat))

        proc_a.wait_healthy()
        time.sleep(1.0)  # the cool-down
        for batch in ids[:4]:
            client.topk(batch, 4)
        assert metric(a, "ddk_teacher_requests_total", '{status="200"}') >= 1
        client.close()
    finally:
        proc_a.stop()  # SIGTERM and SIGCONT (it may be frozen), then SIGKILL


def test_client_retries_a_stream_cut_mid_frame(server, client, batch):
    """A replica that sends the first 1.5 frames of a correct answer and hangs up: the client
    must not return partial data; it retries on the healthy replica."""
    from ddk.teacher.client import TeacherClient

    real = httpx.post(server["url"] + "/v1/topk", json={"input_ids": batch[:4].tolist(), "top_k": 4,
                                                        "dtype": "float32"}, timeout=60).content
    cut = real[:len(real) * 3 // 8]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    hits = []

    def serve():
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(1 << 20)
                hits.append(1)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ddk-topk\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(real) + cut)

    threading.Thread(target=serve, daemon=True).start()
    try:
        bad = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with TeacherClient([bad, server["url"]], dtype="float32", backoff=0.01, cooldown=60) as c:
            outs = [c.topk(batch[:4], 4) for _ in range(3)]
        expected = client.topk(batch[:4], 4)
        for out in outs:
            assert torch.equal(out.ids, expected.ids) and torch.equal(out.logprobs, expected.logprobs)
        assert len(hits) == 1  # marked down after the cut stream, then skipped during the cool-down
    finally:
        sock.close()


def test_client_gives_up_with_teacher_unavailable_and_reports_4xx():
    from ddk.teacher.client import TeacherClient, TeacherRequestError, TeacherUnavailable

    dead = f"http://127.0.0.1:{free_port()}"
    with TeacherClient(dead, max_retries=2, backoff=0.01) as c:
        with pytest.raises(TeacherUnavailable):
            c.topk([[1, 2, 3]], 2)
    with pytest.raises(ValueError):
        TeacherClient([], dtype="float16")
    assert issubclass(TeacherRequestError, ValueError)


def test_client_retries_for_its_time_budget_then_gives_up():
    """Without max_retries the client keeps trying a dead teacher for retry_for seconds (a restart
    takes time), with waits capped at max_backoff, and then raises TeacherUnavailable."""
    import time

    from ddk.teacher.client import TeacherClient, TeacherUnavailable

    dead = f"http://127.0.0.1:{free_port()}"
    with TeacherClient(dead, backoff=0.05, max_backoff=0.2, retry_for=1.5) as c:
        t0 = time.monotonic()
        with pytest.raises(TeacherUnavailable) as err:
            c.topk([[1, 2, 3]], 2)
        took = time.monotonic() - t0
    assert 1.0 <= took < 10.0
    attempts = int(str(err.value).split(" after ")[1].split()[0])
    assert attempts >= 5  # many short waits, not a handful of long ones


def test_client_raises_request_error_on_4xx_without_retrying(server):
    from ddk.teacher.client import TeacherClient, TeacherRequestError

    before = metric(server["url"], "ddk_teacher_requests_total", '{status="422"}')
    with TeacherClient(server["url"]) as c:
        with pytest.raises(TeacherRequestError) as e:
            c.topk([[1, 2, 3]], 1000)
    assert e.value.status == 422 and "top_k" in str(e.value.detail)
    assert metric(server["url"], "ddk_teacher_requests_total", '{status="422"}') - before == 1


# -- command line ----------------------------------------------------------------------------

def test_serve_exit_codes(model_dir, tmp_path):
    missing = subprocess.run(DDK + ["teacher", "serve", "--model", str(tmp_path / "nope"), "--port", str(free_port())],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "--model" in missing.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(model_dir / "config.json", broken / "config.json")  # no weights: loading fails
    r = subprocess.run(DDK + ["teacher", "serve", "--model", str(broken), "--backend", "hf", "--port", str(free_port())],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "failed" in r.stderr
