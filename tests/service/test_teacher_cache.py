"""The teacher's top-k cache (`ddk teacher serve --cache-dir`) and its bearer token, for real: hf engine on the
quick kit's teacher, uvicorn on 127.0.0.1, compared with an uncached server (the session's `teacher_url`)."""

from __future__ import annotations

import re
import subprocess

import httpx
import numpy as np
import pytest
import torch

import procs
from procs import DDK, REPO, free_port

pytestmark = pytest.mark.slow

TOKEN = "s3cret-teacher-token"
L = 33


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def rows(n: int, seed: int) -> list[list[int]]:
    g = np.random.default_rng(seed)
    return g.integers(3, 2000, (n, L)).tolist()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def post(url: str, ids, k: int, dtype: str = "float16", headers: dict | None = None) -> httpx.Response:
    return httpx.post(url + "/v1/topk", json={"input_ids": ids, "top_k": k, "dtype": dtype},
                      headers=headers if headers is not None else AUTH, timeout=120)


@pytest.fixture(scope="module")
def cached(kit, tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher-cache")
    (d / "token").write_text(TOKEN + "\n")
    args = ["teacher", "serve", "--model", str(kit / "teacher"), "--backend", "hf",
            "--cache-dir", str(d / "store"), "--token-file", str(d / "token")]
    proc = procs.start(args, d / "teacher.log", free_port())
    try:
        proc.wait_healthy(timeout=180)
        yield {"url": proc.url, "proc": proc, "dir": d}
    finally:
        proc.stop()


def test_token_guards_topk_only(cached, kit):
    from ddk.fingerprint import model_fingerprint

    url = cached["url"]
    body = {"input_ids": [[1, 2, 3]], "top_k": 2}
    r = httpx.post(url + "/v1/topk", json=body)
    assert r.status_code == 401 and "Bearer" in r.json()["detail"]
    assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.post(url + "/v1/topk", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 403 and "wrong token" in r.json()["detail"]
    assert httpx.post(url + "/v1/topk", json=body, headers=AUTH).status_code == 200
    assert httpx.get(url + "/healthz").status_code == 200
    assert httpx.get(url + "/metrics").status_code == 200
    info = httpx.get(url + "/v1/info").json()
    assert info["model_fingerprint"] == model_fingerprint(kit / "teacher")
    assert re.fullmatch(r"[0-9a-f]{32}", info["model_fingerprint"])
    assert 'ddk_teacher_requests_total{status="401"} 1.0' in httpx.get(url + "/metrics").text


def test_second_identical_request_is_served_without_the_engine(cached, teacher_url):
    url = cached["url"]
    ids = rows(4, seed=1)
    tokens0, hits0, misses0 = (metric(url, n) for n in ("ddk_teacher_engine_tokens_total",
                                                          "ddk_teacher_cache_hits_total",
                                                          "ddk_teacher_cache_misses_total"))
    bytes0 = metric(url, "ddk_teacher_cache_bytes")
    first = post(url, ids, 8)
    assert first.status_code == 200
    assert metric(url, "ddk_teacher_engine_tokens_total") - tokens0 == 4 * L
    assert metric(url, "ddk_teacher_cache_misses_total") - misses0 == 4
    assert metric(url, "ddk_teacher_cache_bytes") > bytes0
    second = post(url, ids, 8)
    assert second.status_code == 200
    assert metric(url, "ddk_teacher_engine_tokens_total") - tokens0 == 4 * L  # the engine did not run
    assert metric(url, "ddk_teacher_cache_hits_total") - hits0 == 4
    assert second.content == first.content
    # float16 store + float16 frames: the bytes of a server without a cache
    assert post(teacher_url, ids, 8, headers={}).content == first.content


def test_a_ragged_request_is_served_from_the_cache_the_second_time(cached, teacher_url):
    """Sequences of lengths 5, 17, 2, 33 (each keyed by its own ids): the second request never reaches the
    engine and answers the same bytes; a sequence seen before in another request and length is a hit too."""
    from ddk.teacher.wire import decode_frames

    url = cached["url"]
    g = np.random.default_rng(7)
    ids = [g.integers(3, 2000, n).tolist() for n in (5, 17, 2, 33)]
    tokens0, hits0 = metric(url, "ddk_teacher_engine_tokens_total"), metric(url, "ddk_teacher_cache_hits_total")
    first = post(url, ids, 8)
    assert first.status_code == 200
    assert metric(url, "ddk_teacher_engine_tokens_total") - tokens0 == 5 + 17 + 2 + 33
    second = post(url, ids, 8)
    assert metric(url, "ddk_teacher_engine_tokens_total") - tokens0 == 5 + 17 + 2 + 33  # the engine did not run
    assert metric(url, "ddk_teacher_cache_hits_total") - hits0 == 4
    assert second.content == first.content
    assert post(teacher_url, ids, 8, headers={}).content == first.content
    mixed = [ids[3], g.integers(3, 2000, 9).tolist(), ids[0]]  # two known sequences in other places
    got = sorted(decode_frames(post(url, mixed, 8).content), key=lambda f: f.index)  # hits come first
    want = sorted(decode_frames(post(teacher_url, mixed, 8, headers={}).content), key=lambda f: f.index)
    assert [f.index for f in got] == [0, 1, 2] and [f.ids.shape[0] for f in got] == [32, 8, 4]
    for a, b in zip(got, want):  # float16 store and frames: the numbers of an uncached server, each in its place
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.logprobs, b.logprobs)
        assert np.array_equal(a.target_logprob, b.target_logprob)
    assert metric(url, "ddk_teacher_cache_hits_total") - hits0 == 6


def test_a_smaller_k_is_served_from_a_larger_entry(cached, teacher_url):
    url = cached["url"]
    ids = rows(3, seed=2)
    post(url, ids, 16)
    tokens0 = metric(url, "ddk_teacher_engine_tokens_total")
    small = post(url, ids, 5)
    assert metric(url, "ddk_teacher_engine_tokens_total") == tokens0
    assert small.content == post(teacher_url, ids, 5, headers={}).content


def test_a_mixed_request_answers_every_sequence_in_its_place(cached, teacher_url):
    from ddk.teacher.client import TeacherClient

    url = cached["url"]
    known = rows(2, seed=3)
    post(url, known, 8)
    new = rows(2, seed=4)
    batch = [new[0], known[0], new[1], known[1]]
    tokens0 = metric(url, "ddk_teacher_engine_tokens_total")
    hits0, misses0 = metric(url, "ddk_teacher_cache_hits_total"), metric(url, "ddk_teacher_cache_misses_total")
    with TeacherClient(url, token=TOKEN) as c, TeacherClient(teacher_url) as ref:
        got, want = c.topk(batch, 8), ref.topk(batch, 8)
    assert metric(url, "ddk_teacher_engine_tokens_total") - tokens0 == 2 * L  # only the two new ones
    assert metric(url, "ddk_teacher_cache_hits_total") - hits0 == 2
    assert metric(url, "ddk_teacher_cache_misses_total") - misses0 == 2
    assert torch.equal(got.ids, want.ids)
    assert torch.equal(got.logprobs, want.logprobs)
    assert torch.equal(got.target_logprob, want.target_logprob)
    # the JSON answer is in request order, with the same numbers
    r = httpx.post(url + "/v1/topk", json={"input_ids": batch, "top_k": 8},
                   headers={**AUTH, "Accept": "application/json"}, timeout=60)
    seqs = r.json()["sequences"]
    assert torch.equal(torch.tensor([s["ids"] for s in seqs]), want.ids)
    assert torch.equal(torch.tensor([s["logprobs"] for s in seqs], dtype=torch.float32), want.logprobs)


def test_client_without_the_token_gets_a_request_error(cached):
    from ddk.teacher.client import TeacherClient, TeacherRequestError

    with TeacherClient(cached["url"], max_retries=0) as c:
        with pytest.raises(TeacherRequestError) as e:
            c.topk([[1, 2, 3]], 2)
    assert e.value.status == 401


def test_the_store_outlives_a_restart(cached):
    url, proc = cached["url"], cached["proc"]
    ids = rows(2, seed=5)
    before = post(url, ids, 8).content
    proc.stop()
    proc.start()
    proc.wait_healthy(timeout=180)
    assert post(url, ids, 8).content == before
    assert metric(url, "ddk_teacher_engine_tokens_total") == 0  # a fresh process: the engine never ran
    assert metric(url, "ddk_teacher_cache_hits_total") == 2


def test_bad_cache_and_token_flags_exit_2(kit, tmp_path):
    (tmp_path / "empty").write_text("  \n")
    base = DDK + ["teacher", "serve", "--model", str(kit / "teacher"), "--backend", "hf", "--port", str(free_port())]
    for extra, words in ((["--cache-max-bytes", "1000"], "--cache-dir"),
                         (["--token-file", str(tmp_path / "empty")], "empty"),
                         (["--token-file", str(tmp_path / "absent")], "cannot read"),
                         (["--cache-dir", str(tmp_path / "c"), "--cache-encoding", "int4"], "cache-encoding")):
        r = subprocess.run(base + extra, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (extra, r.stderr)
        assert words in r.stderr, (extra, r.stderr)


def test_compact_encoding_answers_within_its_bound(kit, tmp_path, teacher_url):
    from ddk.teacher.client import TeacherClient
    from ddk.teacher.store import compact_bound

    args = ["teacher", "serve", "--model", str(kit / "teacher"), "--backend", "hf",
            "--cache-dir", str(tmp_path / "store"), "--cache-encoding", "compact", "--cache-max-bytes", "100000"]
    with procs.service(args, log_path=tmp_path / "teacher.log") as (url, _):
        batch = rows(3, seed=6)
        with TeacherClient(url, dtype="float32") as c, TeacherClient(teacher_url, dtype="float32") as ref:
            first, second, want = c.topk(batch, 16), c.topk(batch, 16), ref.topk(batch, 16)
        assert metric(url, "ddk_teacher_cache_hits_total") == 3
        assert metric(url, "ddk_teacher_engine_tokens_total") == 3 * L
        assert 0 < metric(url, "ddk_teacher_cache_bytes") <= 100000
    for a in ("ids", "logprobs", "target_logprob"):  # the first answer is already the stored one
        assert torch.equal(getattr(first, a), getattr(second, a))
    assert torch.equal(first.ids, want.ids)
    bound = torch.from_numpy(compact_bound(want.logprobs.reshape(-1, 16).numpy()).reshape(want.logprobs.shape))
    assert ((first.logprobs.double() - want.logprobs.double()).abs() <= bound).all()
    assert not torch.equal(first.logprobs, want.logprobs)  # it is the compact encoding that answered
