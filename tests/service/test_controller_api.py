"""The controller as users run it: `ddk controller serve` on 127.0.0.1 with a real SQLite file.

Covers every endpoint and error of the contract, the Python client (retries, lost answers, SSE), the push
to several subscribers, the all-runs stream and progress reports, a SIGKILL restart, concurrent writers,
bearer-token auth, and the web page in headless Chromium, driven over the DevTools protocol so that the page
stays open while the test posts (its live updates arrive over SSE, which a one-shot `--dump-dom` cannot wait
for).

Server processes: one module-scoped server that every test only talking HTTP shares (each test on its own
run ids); for the SIGKILL restart, one server that is killed and one that restarts on its file, the restart
with a token file so that the auth tests run on it too; and one that the live-page test kills and restarts
under the open page.
"""

from __future__ import annotations

import base64
import json
import math
import os
import queue
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from procs import REPO, Proc, free_port, service

from ddk.controller.client import ControllerClient, ControllerError, ControllerUnavailable
from ddk.vocab import is_run_id

pytestmark = pytest.mark.slow

DOMAINS = ["code", "prose", "legal"]
TEACHER = {"code": 1.0, "prose": 2.0, "legal": 0.5}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    db = tmp_path_factory.mktemp("ctl") / "controller.sqlite"
    with service(["controller", "serve", "--db", str(db)], timeout=60) as (url, proc):
        yield url


@pytest.fixture(scope="module")
def client(server):
    with ControllerClient(server, max_retries=2, backoff=0.05) as c:
        yield c


@pytest.fixture(scope="module")
def http():
    """One plain HTTP client for the module's raw requests: httpx.get/post build a client, and with it an SSL
    context (~30 ms), on every call. No keep-alive, so each request still has its own connection as before."""
    with httpx.Client(limits=httpx.Limits(max_keepalive_connections=0)) as c:
        yield c


_counter = iter(range(10**6))


def new_run(client, policy="ddk", **kw) -> str:
    run_id = f"{policy}-{next(_counter)}"
    client.create_run(run_id, DOMAINS, policy=policy, interval_steps=10, **kw)
    return run_id


# -- runs --------------------------------------------------------------------------------------------------
def test_create_run_is_idempotent_and_conflicts_on_a_different_spec(http, server):
    body = {"run_id": "idem", "domains": DOMAINS, "policy": "ddk", "alpha": 0.5, "interval_steps": 10}
    r = http.post(f"{server}/v1/runs", json=body)
    assert r.status_code == 201
    run = r.json()
    assert run["run_id"] == "idem" and run["domains"] == DOMAINS and run["initial_weights"] is None
    assert run["weights"]["version"] == 0 and run["weights"]["step"] is None
    assert run["weights"]["weights"] == pytest.approx({d: 1 / 3 for d in DOMAINS})
    assert set(run) == {"run_id", "domains", "policy", "alpha", "interval_steps", "initial_weights", "created_at",
                        "weights"}
    again = http.post(f"{server}/v1/runs", json=body)
    assert again.status_code == 200 and again.json() == run
    for change in ({"alpha": 0.4}, {"policy": "ddk_raw"}, {"interval_steps": 11}, {"domains": ["code", "prose"]},
                   {"initial_weights": {"code": 0.5, "prose": 0.25, "legal": 0.25}}):
        r = http.post(f"{server}/v1/runs", json={**body, **change})
        assert r.status_code == 409 and r.json()["detail"].startswith("run_id:")
    assert http.get(f"{server}/v1/runs/idem").json() == run
    assert "idem" in [x["run_id"] for x in http.get(f"{server}/v1/runs").json()["runs"]]


@pytest.mark.parametrize("change, field", [
    ({"policy": "kd"}, "policy"),
    ({"alpha": 1.01}, "alpha"),
    ({"alpha": -0.5}, "alpha"),
    ({"interval_steps": 0}, "interval_steps"),
    ({"interval_steps": "ten"}, "interval_steps"),
    ({"domains": ["a", "b", "a"]}, "domains"),
    ({"domains": []}, "domains"),
    ({"domains": "code"}, "domains"),
    ({"initial_weights": {"code": 0.5, "prose": 0.5}}, "initial_weights"),
    ({"initial_weights": {"code": 0.5, "prose": 0.5, "legal": 0.5}}, "initial_weights"),
    ({"initial_weights": {"code": 1.5, "prose": -0.5, "legal": 0.0}}, "initial_weights.prose"),
    ({"run_id": "has space"}, "run_id"),
    ({"run_id": None}, "run_id"),
    ({"colour": "blue"}, "colour"),
])
def test_bad_run_specs_are_422_naming_the_field(http, server, change, field):
    body = {"run_id": "bad", "domains": DOMAINS, **change}
    r = http.post(f"{server}/v1/runs", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(field), r.json()


@pytest.mark.parametrize("run_id", ["a" * 128, "A.b_c-9", "a" * 129, "a:b", "-a", "a\n", "a/b", ""])
def test_the_run_id_rule_is_the_vocab_one(http, server, run_id):
    """The controller accepts exactly the run ids ddk.vocab accepts (1-128 of [A-Za-z0-9._-], first alnum)."""
    r = http.post(f"{server}/v1/runs", json={"run_id": run_id, "domains": DOMAINS})
    if is_run_id(run_id):
        assert r.status_code == 201, r.text
        assert http.get(f"{server}/v1/runs/{run_id}").json()["run_id"] == run_id
    else:
        assert r.status_code == 422 and r.json()["detail"].startswith("run_id:"), r.text
    assert is_run_id(run_id) == (run_id in ("a" * 128, "A.b_c-9"))  # 128 accepted; 129, ':' refused
    if run_id == "a:b":  # a read by path of an id that cannot exist is an unknown run, not a 422
        assert http.get(f"{server}/v1/runs/a:b/weights").status_code == 404


def test_unknown_run_is_404(http, server):
    for path in ("", "/weights", "/history", "/events"):
        r = http.get(f"{server}/v1/runs/nope{path}")
        assert r.status_code == 404 and "nope" in r.json()["detail"]
    r = http.post(f"{server}/v1/runs/nope/evaluations", json={"step": 0, "student_loss": {"code": 1.0}})
    assert r.status_code == 404


# -- evaluations ---------------------------------------------------------------------------------------------
def test_evaluations_produce_the_paper_weights(client):
    run = new_run(client)
    w1 = client.post_evaluation(run, 0, {"code": 2.0, "prose": 2.0, "legal": 0.5}, TEACHER)
    # q = (e, 1, 1): softmax
    e = math.e
    z = math.exp(e) + 2 * math.exp(1)
    assert w1["version"] == 1 and w1["step"] == 0
    assert w1["weights"] == pytest.approx({"code": math.exp(e) / z, "prose": e / z, "legal": e / z})
    # teacher losses reused; q = (1, 1, 1) now: psi ∝ r_prev, r = 0.5 r_prev + 1/6
    w2 = client.post_evaluation(run, 10, {"code": 1.0, "prose": 2.0, "legal": 0.5})
    assert w2["version"] == 2
    assert w2["weights"] == pytest.approx({d: 0.5 * w1["weights"][d] + 1 / 6 for d in DOMAINS})
    current = client.get_weights(run)
    assert {k: current[k] for k in ("version", "step", "weights")} == {k: w2[k] for k in ("version", "step", "weights")}
    hist = client.history(run)["versions"]
    assert [v["version"] for v in hist] == [0, 1, 2] and [v["step"] for v in hist] == [None, 0, 10]
    assert set(hist[1]) == {"version", "step", "student_loss", "teacher_loss", "ratio", "weights", "created_at"}
    assert hist[0]["student_loss"] is None and hist[0]["teacher_loss"] is None and hist[0]["ratio"] is None
    assert hist[1]["ratio"] == pytest.approx({"code": e, "prose": 1.0, "legal": 1.0})
    assert hist[2]["teacher_loss"] == TEACHER


def test_fixed_and_raw_policies(client):
    run = new_run(client, "fixed", initial_weights={"code": 0.6, "prose": 0.3, "legal": 0.1})
    for step in (0, 10):
        w = client.post_evaluation(run, step, {"code": 5.0, "prose": 1.0, "legal": 1.0}, TEACHER)
        assert w["weights"] == pytest.approx({"code": 0.6, "prose": 0.3, "legal": 0.1})
    assert client.get_weights(run)["version"] == 2
    run = new_run(client, "ddk_raw")
    client.post_evaluation(run, 0, {"code": 5.0, "prose": 1.0, "legal": 1.0}, TEACHER)
    w = client.post_evaluation(run, 10, {"code": 1.0, "prose": 2.0, "legal": 0.5})  # q all 1 -> uniform
    assert w["weights"] == pytest.approx({d: 1 / 3 for d in DOMAINS})


def test_old_steps_are_409_and_never_double_applied(http, client, server):
    run = new_run(client)
    client.post_evaluation(run, 0, {"code": 1.0, "prose": 1.0, "legal": 1.0}, TEACHER)
    client.post_evaluation(run, 10, {"code": 1.0, "prose": 1.0, "legal": 1.0})
    for step in (10, 5):
        r = http.post(f"{server}/v1/runs/{run}/evaluations",
                       json={"step": step, "student_loss": {"code": 1.0, "prose": 1.0, "legal": 1.0}})
        assert r.status_code == 409 and r.json()["detail"].startswith("step")
    assert client.get_weights(run)["version"] == 2


@pytest.mark.parametrize("body, field", [
    ('{"step": 0, "student_loss": {"code": NaN, "prose": 1, "legal": 1}, "teacher_loss": %s}', "student_loss.code"),
    ('{"step": 0, "student_loss": {"code": Infinity, "prose": 1, "legal": 1}, "teacher_loss": %s}',
     "student_loss.code"),
    ('{"step": 0, "student_loss": {"code": 1e999, "prose": 1, "legal": 1}, "teacher_loss": %s}', "student_loss.code"),
    ('{"step": 0, "student_loss": {"code": -0.1, "prose": 1, "legal": 1}, "teacher_loss": %s}', "student_loss.code"),
    ('{"step": 0, "student_loss": {"code": 1, "prose": 1}, "teacher_loss": %s}', "student_loss"),
    ('{"step": 0, "student_loss": {"code": 1, "prose": 1, "legal": 1, "math": 1}, "teacher_loss": %s}',
     "student_loss"),
    ('{"step": 0, "student_loss": {"code": 1, "prose": 1, "legal": 1}, "teacher_loss": {"code": 1}}',
     "teacher_loss"),
    ('{"step": 0, "student_loss": {"code": 1, "prose": 1, "legal": 1}}', "teacher_loss"),
    ('{"step": 0, "student_loss": {"code": 1, "prose": 1, "legal": "x"}, "teacher_loss": %s}', "student_loss.legal"),
    ('{"step": -1, "student_loss": {"code": 1, "prose": 1, "legal": 1}, "teacher_loss": %s}', "step"),
    ('{"step": 1.5, "student_loss": {"code": 1, "prose": 1, "legal": 1}, "teacher_loss": %s}', "step"),
    ('{"student_loss": {"code": 1, "prose": 1, "legal": 1}, "teacher_loss": %s}', "step"),
    ('{"step": 0, "student_loss": {"code": 1, "prose": 1, "legal": 1}, "teacher_loss": %s', "body"),
    ('[1, 2, 3]', "body"),
    ('', "body"),
])
def test_bad_evaluations_are_422_naming_the_field(http, client, server, body, field):
    run = new_run(client)
    text = body % json.dumps(TEACHER) if "%s" in body else body
    r = http.post(f"{server}/v1/runs/{run}/evaluations", content=text,
                   headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(field), r.json()
    assert client.get_weights(run)["version"] == 0


def test_oversized_bodies_are_413(http, server):
    big = {"run_id": "big", "domains": ["d" * 100 + str(i) for i in range(12000)]}
    r = http.post(f"{server}/v1/runs", json=big)
    assert r.status_code == 413 and r.json()["detail"].startswith("body")

    def chunks():  # no Content-Length: the limit holds for chunked bodies too
        yield b'{"run_id": "big", "domains": ['
        for _ in range(3000):
            yield b'"' + b"x" * 500 + b'",'
        yield b'"y"]}'

    r = http.post(f"{server}/v1/runs", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert http.get(f"{server}/v1/runs/big").status_code == 404


def test_metrics(http, client, server):
    run = new_run(client)
    client.post_evaluation(run, 0, {"code": 1.0, "prose": 1.0, "legal": 1.0}, TEACHER)
    text = http.get(f"{server}/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    assert values["ddk_controller_runs"] >= 1 and values["ddk_controller_evaluations"] >= 1
    assert "ddk_controller_sse_subscribers" in values
    assert values[f'ddk_controller_weights_version{{run_id="{run}"}}'] == 1
    assert values['ddk_controller_requests_total{method="POST",route="/v1/runs/{run_id}/evaluations",status="200"}'] >= 1


# -- the Python client -------------------------------------------------------------------------------------
def test_client_errors(client):
    with pytest.raises(ControllerError) as e:
        client.get_weights("nope")
    assert e.value.status == 404 and "nope" in e.value.detail
    dead = ControllerClient(f"http://127.0.0.1:{free_port()}", max_retries=2, backoff=0.01)
    t0 = time.monotonic()
    with pytest.raises(ControllerUnavailable):
        dead.get_weights("r")
    assert time.monotonic() - t0 < 5


class _LoseFirstAnswer(httpx.BaseTransport):
    """Forwards to the real server, but loses the answer to the first POST (as a dropped connection would)."""

    def __init__(self):
        self.inner, self.lost = httpx.HTTPTransport(), 0

    def handle_request(self, request):
        response = self.inner.handle_request(request)
        if request.method == "POST" and not self.lost:
            self.lost += 1
            response.read()
            raise httpx.ReadError("connection reset (simulated)", request=request)
        return response


def test_client_retry_after_a_lost_answer_returns_the_recorded_weights(client, server):
    run = new_run(client)
    flaky = ControllerClient(server, max_retries=3, backoff=0.01)
    flaky._http = httpx.Client(base_url=server, transport=_LoseFirstAnswer())
    w = flaky.post_evaluation(run, 0, {"code": 1.0, "prose": 1.0, "legal": 1.0}, TEACHER)
    assert flaky._http._transport.lost == 1
    assert w["version"] == 1 and w["step"] == 0
    assert [v["version"] for v in client.history(run)["versions"]] == [0, 1]  # applied once


# -- the push ----------------------------------------------------------------------------------------------
def test_two_subscribers_get_each_new_version_within_a_second(client, server):
    run = new_run(client)
    received = {0: [], 1: []}
    ready = threading.Barrier(3, timeout=10)

    def listen(i):
        with ControllerClient(server) as c:
            for event in c.events(run):
                received[i].append((time.monotonic(), event))
                if event["version"] == 0:
                    ready.wait()
                if event["version"] >= 2:
                    return

    threads = [threading.Thread(target=listen, args=(i,), daemon=True) for i in received]
    for t in threads:
        t.start()
    ready.wait()  # both have the current weights (version 0) and are subscribed
    posted = {}
    for step in (0, 10):
        posted[step] = time.monotonic()
        client.post_evaluation(run, step, {"code": 1.0 + step, "prose": 1.0, "legal": 1.0}, TEACHER)
        time.sleep(0.2)
    for t in threads:
        t.join(timeout=5)
    history = {v["version"]: v for v in client.history(run)["versions"]}
    for i in received:
        assert [e["version"] for _, e in received[i]] == [0, 1, 2]
        for (at, event), step in zip(received[i][1:], (0, 10)):
            assert event["step"] == step and event["weights"] == history[event["version"]]["weights"]
            assert set(event) == {"version", "step", "weights", "updated_at"}
            assert at - posted[step] < 1.0


def test_raw_sse_stream_and_resume(client, server):
    run = new_run(client)
    client.post_evaluation(run, 0, {"code": 1.0, "prose": 1.0, "legal": 1.0}, TEACHER)
    with httpx.stream("GET", f"{server}/v1/runs/{run}/events", timeout=5) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = []
        for line in r.iter_lines():
            lines.append(line)
            if line.startswith("data:"):
                break
    assert "id: 1" in lines
    assert json.loads(lines[-1][5:]) == client.get_weights(run)
    # resuming after version 1 sends nothing old: the next data is version 2
    got = []

    def resume():
        with httpx.stream("GET", f"{server}/v1/runs/{run}/events", headers={"Last-Event-ID": "1"}, timeout=5) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    got.append(json.loads(line[5:]))
                    return

    t = threading.Thread(target=resume, daemon=True)
    t.start()
    time.sleep(0.5)
    client.post_evaluation(run, 10, {"code": 1.0, "prose": 1.0, "legal": 1.0})
    t.join(timeout=5)
    assert [g["version"] for g in got] == [2]


# -- concurrency -------------------------------------------------------------------------------------------
def test_eight_concurrent_writers_lose_nothing(client, server):
    run = new_run(client, "ddk_raw")
    client.post_evaluation(run, 0, {"code": 1.0, "prose": 1.0, "legal": 1.0}, TEACHER)
    results, errors = [], []
    start = threading.Barrier(8, timeout=10)

    def post(i):
        with ControllerClient(server, max_retries=0) as c:
            start.wait()
            for j in range(3):
                step = 1 + j * 8 + i  # distinct steps, interleaved across threads
                try:
                    results.append((step, c.post_evaluation(run, step, {"code": float(step), "prose": 1.0,
                                                                        "legal": 1.0})))
                except ControllerError as e:
                    if e.status != 409:  # a larger step got in first: refused, not applied
                        errors.append(e)
                except Exception as e:  # noqa: BLE001
                    errors.append(e)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    hist = client.history(run)["versions"]
    assert [v["version"] for v in hist] == list(range(len(hist)))
    steps = [v["step"] for v in hist[1:]]
    assert steps == sorted(set(steps))
    # every accepted POST is exactly one version, with its own step and losses
    assert len(hist) == 2 + len(results)
    by_version = {v["version"]: v for v in hist}
    for step, w in results:
        assert by_version[w["version"]]["step"] == step
        assert by_version[w["version"]]["student_loss"]["code"] == float(step)


# -- restart, and auth on the restarted server --------------------------------------------------------------
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def restarted(tmp_path_factory):
    """A server SIGKILLed after three evaluations, then restarted on its file with ``--token-file``.

    Yields (url, history and weights of run "persist" before the kill). Restarting with a token also shows that
    the state does not depend on how the server is configured; the auth tests use this same process.
    """
    tmp = tmp_path_factory.mktemp("restart")
    db, token_file = tmp / "c.sqlite", tmp / "token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    with service(["controller", "serve", "--db", str(db)], port=port, timeout=60) as (url, proc):
        with ControllerClient(url) as c:
            c.create_run("persist", DOMAINS, interval_steps=10)
            for step in (0, 10, 20):
                c.post_evaluation("persist", step, {"code": 2.0 - step / 20, "prose": 2.5, "legal": 1.0}, TEACHER)
                c.post_progress("persist", step + 5, 40, loss=3.0 - step / 10, ce=2.0, kl=1.0 - step / 20,
                                tokens_per_s=1000.0 + step)
            before = c.history("persist"), c.get_weights("persist")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    with service(["controller", "serve", "--db", str(db), "--token-file", str(token_file)], port=port,
                 timeout=60) as (url, proc):
        yield url, before


def test_sigkill_restart_keeps_history_and_weights(restarted):
    url, (before_hist, before_w) = restarted
    with ControllerClient(url, token=TOKEN) as c:
        assert c.history("persist") == before_hist
        assert c.get_weights("persist") == before_w
        with pytest.raises(ControllerError) as e:
            c.post_evaluation("persist", 20, {"code": 1.0, "prose": 1.0, "legal": 1.0})
        assert e.value.status == 409  # step 20 was recorded before the kill
        assert c.post_evaluation("persist", 30, {"code": 1.0, "prose": 1.0, "legal": 1.0})["version"] == 4


def test_token_auth_guards_writes_only(http, restarted):
    url, _ = restarted
    body = {"run_id": "auth", "domains": DOMAINS}
    r = http.post(f"{url}/v1/runs", json=body)
    assert r.status_code == 401 and r.json()["detail"].startswith("authorization")
    r = http.post(f"{url}/v1/runs", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 403 and r.json()["detail"].startswith("authorization")
    r = http.post(f"{url}/v1/runs", content="{not json", headers={"content-type": "application/json"})
    assert r.status_code == 401  # auth is checked before the body is read
    with ControllerClient(url, token=TOKEN) as c:
        assert c.create_run("auth", DOMAINS)["run_id"] == "auth"
        c.post_evaluation("auth", 0, {"code": 1.0, "prose": 1.0, "legal": 1.0}, TEACHER)
    with ControllerClient(url) as anonymous:  # reads stay open
        assert anonymous.get_weights("auth")["version"] == 1
        assert anonymous.history("auth")["versions"][1]["step"] == 0
        with pytest.raises(ControllerError) as e:
            anonymous.post_evaluation("auth", 10, {"code": 1.0, "prose": 1.0, "legal": 1.0})
        assert e.value.status == 401
    assert http.get(f"{url}/metrics").status_code == 200 and http.get(url + "/").status_code == 200


def test_progress_survives_a_sigkill_restart(restarted):
    url, _ = restarted
    with ControllerClient(url) as c:
        got = c.get_progress("persist")
        status = {r["run_id"]: r for r in c.list_runs()["runs"]}["persist"]["status"]
    assert got["latest"] == {"step": 25, "total_steps": 40, "loss": 1.0, "ce": 2.0, "kl": 0.0,
                             "tokens_per_s": 1020.0, "updated_at": got["latest"]["updated_at"]}
    assert got["points"] == [{"step": 5, "loss": 3.0, "ce": 2.0, "kl": 1.0}, {"step": 15, "loss": 2.0, "ce": 2.0,
                             "kl": 0.5}, {"step": 25, "loss": 1.0, "ce": 2.0, "kl": 0.0}]
    assert (status["state"], status["step"], status["total_steps"]) == ("training", 25, 40)


def test_progress_needs_the_token(http, restarted):
    url, _ = restarted
    body = {"step": 30, "total_steps": 40, "loss": 0.5}
    r = http.post(f"{url}/v1/runs/persist/progress", json=body)
    assert r.status_code == 401 and r.json()["detail"].startswith("authorization")
    r = http.post(f"{url}/v1/runs/persist/progress", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 403
    assert http.get(f"{url}/v1/runs/persist/progress").json()["latest"]["step"] == 25  # refused: no trace
    with ControllerClient(url, token=TOKEN) as c:
        assert c.post_progress("persist", 30, 40, loss=0.5)["step"] == 30
    assert http.get(f"{url}/v1/runs/persist/progress").json()["latest"]["step"] == 30  # reads stay open


@pytest.mark.parametrize("content", ["", "  \n", None])
def test_empty_or_unreadable_token_file_exits_2(tmp_path, content):
    token_file = tmp_path / "token"
    if content is not None:
        token_file.write_text(content)
    # the `ddk` console script's entry point (ddk.cli:main); `python -m ddk.cli` would run cli.py as
    # __main__, whose UsageError is a different class from the one services raise (reported to the lead)
    ddk = [sys.executable, "-c", "import sys; from ddk.cli import main; sys.exit(main())"]
    p = subprocess.run(ddk + ["controller", "serve", "--db", str(tmp_path / "c.sqlite"), "--token-file",
                              str(token_file), "--port", str(free_port())],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("ddk: error: --token-file") and len(p.stderr.strip().splitlines()) == 1


# -- progress ------------------------------------------------------------------------------------------------
def test_progress_is_stored_and_shown_in_the_run_list(http, client, server):
    run = new_run(client)
    assert client.get_progress(run) == {"latest": None, "points": []}
    listed = {r["run_id"]: r for r in http.get(f"{server}/v1/runs").json()["runs"]}
    assert listed[run]["status"]["state"] == "created" and listed[run]["status"]["step"] is None
    p = client.post_progress(run, 3, 40, loss=4.5, ce=4.0, kl=0.5, tokens_per_s=1234.5)
    assert set(p) == {"step", "total_steps", "loss", "ce", "kl", "tokens_per_s", "updated_at"}
    assert (p["step"], p["total_steps"], p["loss"], p["tokens_per_s"]) == (3, 40, 4.5, 1234.5)
    r = http.post(f"{server}/v1/runs/{run}/progress", json={"step": 9, "total_steps": 40})  # the numbers may be absent
    assert r.status_code == 200 and r.json()["loss"] is None
    client.post_progress(run, 12, 40, loss=3.0)
    got = client.get_progress(run)
    assert got["latest"]["step"] == 12 and got["latest"]["kl"] is None
    assert got["points"] == [{"step": 3, "loss": 4.5, "ce": 4.0, "kl": 0.5},   # step 9 had no loss
                             {"step": 12, "loss": 3.0, "ce": None, "kl": None}]
    client.post_evaluation(run, 0, {"code": 1.0, "prose": 1.0, "legal": 1.0}, TEACHER)
    listed = {r["run_id"]: r for r in http.get(f"{server}/v1/runs").json()["runs"]}
    status = listed[run]["status"]
    assert status == {"state": "training", "step": 12, "total_steps": 40, "loss": 3.0, "tokens_per_s": None,
                      "version": 1, "updated_at": status["updated_at"]}
    assert status["updated_at"] >= got["latest"]["updated_at"] and listed[run]["policy"] == "ddk"
    client.post_progress(run, 40, 40, loss=2.0)
    assert {r["run_id"]: r for r in client.list_runs()["runs"]}[run]["status"]["state"] == "finished"
    # the other answers are as before: the run object itself has no status
    assert "status" not in client.get_run(run) and "status" not in http.post(
        f"{server}/v1/runs", json={"run_id": run, "domains": DOMAINS, "interval_steps": 10}).json()


@pytest.mark.parametrize("body, field", [
    ({"total_steps": 10}, "step"),
    ({"step": 1}, "total_steps"),
    ({"step": -1, "total_steps": 10}, "step"),
    ({"step": 1.5, "total_steps": 10}, "step"),
    ({"step": "1", "total_steps": 10}, "step"),
    ({"step": 11, "total_steps": 10}, "step"),
    ({"step": 1, "total_steps": 0}, "total_steps"),
    ({"step": 1, "total_steps": 2**60}, "total_steps"),
    ({"step": 1, "total_steps": 10, "loss": "low"}, "loss"),
    ({"step": 1, "total_steps": 10, "ce": [1]}, "ce"),
    ({"step": 1, "total_steps": 10, "tokens_per_s": -5}, "tokens_per_s"),
    ({"step": 1, "total_steps": 10, "lr": 0.1}, "lr"),
    ('{"step": 1, "total_steps": 10, "kl": NaN}', "kl"),
    ('{"step": 1, "total_steps": 10, "loss": Infinity}', "loss"),
    ('{"step": 1, "total_steps"', "body"),
    ("[1, 2]", "body"),
])
def test_bad_progress_is_422_naming_the_field(http, client, server, body, field):
    run = new_run(client)
    text = body if isinstance(body, str) else json.dumps(body)
    r = http.post(f"{server}/v1/runs/{run}/progress", content=text, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(field), r.json()
    assert client.get_progress(run)["latest"] is None


ONPOLICY = {"generation_s": 3.0, "grading_s": 1.5, "training_s": 0.5, "rollout_tokens_per_s": 42.5,
            "version_lag": 1, "completion_len": {"code": 12.5, "legal": 7}}


def test_onpolicy_numbers_ride_along_with_the_latest_progress(http, client, server):
    """An on-policy step's numbers (issue 28): optional, stored with the latest report and returned by GET; a report
    without them (an older trainer, a step without rollouts) has none, and the answers keep their old keys."""
    run = new_run(client)
    old = client.post_progress(run, 1, 40, loss=4.0)
    assert "onpolicy" not in old and "onpolicy" not in client.get_progress(run)["latest"]
    p = client.post_progress(run, 2, 40, loss=3.5, onpolicy=ONPOLICY)
    want = {**ONPOLICY, "completion_len": {"code": 12.5, "legal": 7.0}}
    assert p["onpolicy"] == want and p["step"] == 2
    got = client.get_progress(run)
    assert got["latest"]["onpolicy"] == want
    assert got["points"] == [{"step": 1, "loss": 4.0, "ce": None, "kl": None},
                             {"step": 2, "loss": 3.5, "ce": None, "kl": None}]
    r = http.post(f"{server}/v1/runs/{run}/progress", json={"step": 3, "total_steps": 40,
                                                           "onpolicy": {"grading_s": 0.25}})  # any subset
    assert r.status_code == 200 and r.json()["onpolicy"] == {"grading_s": 0.25}
    client.post_progress(run, 4, 40, loss=3.0)  # the latest report replaces the previous one, numbers and all
    assert "onpolicy" not in client.get_progress(run)["latest"]


@pytest.mark.parametrize("onpolicy, field", [
    ({"generation_s": -1.0}, "onpolicy.generation_s"),
    ({"grading_s": "slow"}, "onpolicy.grading_s"),
    ('{"training_s": Infinity}', "onpolicy.training_s"),
    ({"rollout_tokens_per_s": -0.5}, "onpolicy.rollout_tokens_per_s"),
    ({"version_lag": 1.5}, "onpolicy.version_lag"),
    ({"version_lag": -1}, "onpolicy.version_lag"),
    ({"completion_len": {"code": -3}}, "onpolicy.completion_len.code"),
    ('{"completion_len": {"code": NaN}}', "onpolicy.completion_len.code"),
    ({"completion_len": {"poetry": 3}}, "onpolicy.completion_len.poetry"),  # not one of the run's domains
    ({"completion_len": [3]}, "onpolicy.completion_len"),
    ({"lag": 0}, "onpolicy.lag"),
    ([1.0], "onpolicy"),
])
def test_bad_onpolicy_numbers_are_422_naming_the_field(http, client, server, onpolicy, field):
    run = new_run(client)
    inner = onpolicy if isinstance(onpolicy, str) else json.dumps(onpolicy)
    text = f'{{"step": 1, "total_steps": 10, "loss": 1.0, "onpolicy": {inner}}}'
    r = http.post(f"{server}/v1/runs/{run}/progress", content=text, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"].split(":")[0] == field, r.json()
    assert client.get_progress(run) == {"latest": None, "points": []}  # refused: nothing stored


def test_progress_of_an_unknown_run_is_404(http, server):
    r = http.post(f"{server}/v1/runs/nope/progress", json={"step": 1, "total_steps": 2})
    assert r.status_code == 404 and "nope" in r.json()["detail"]
    assert http.get(f"{server}/v1/runs/nope/progress").status_code == 404


def test_trainer_progress_never_blocks_and_reaches_the_controller(client, server):
    """Rank 0's ProgressReporter: a report is handed to a background thread at once, at most every few
    seconds unless forced (an evaluation step); with the controller down it neither waits nor raises."""
    from ddk.trainer.loop import ProgressReporter

    run = new_run(client)
    c = ProgressReporter(server, None, run)
    try:
        t0 = time.monotonic()
        assert c.progress(1, 30, 5.0, 4.0, 1.0, 100.0)
        assert not c.progress(2, 30, 4.9, 4.0, 0.9, 100.0)  # within PROGRESS_EVERY_S: skipped
        assert c.progress(10, 30, 4.0, 3.5, float("nan"), 100.0, force=True)  # an evaluation step
        assert time.monotonic() - t0 < 0.1
    finally:
        c.close()  # sends what is still waiting
    got = client.get_progress(run)
    assert got["latest"]["step"] == 10 and got["latest"]["kl"] is None  # NaN goes as null
    assert [p["step"] for p in got["points"]] in ([1, 10], [10])  # the newest report may replace a waiting one
    assert not ProgressReporter(None, None, run).progress(1, 30, force=True)  # no controller: nothing posted
    down = ProgressReporter(f"http://127.0.0.1:{free_port()}", None, run)
    t0 = time.monotonic()
    for step in range(1, 50):
        down.progress(step, 50, 1.0, 1.0, 0.0, 1.0, force=True)
    assert time.monotonic() - t0 < 0.5
    down.close()
    assert time.monotonic() - t0 < ProgressReporter.PROGRESS_TIMEOUT_S + 2


# -- the all-runs stream ---------------------------------------------------------------------------------------
def _read_events(url: str, into: queue.Queue, stop: threading.Event) -> None:
    """Put each (event, data) of the SSE stream at ``url`` into ``into``; the `retry:` line as ("retry", ms)."""
    with httpx.stream("GET", url, timeout=httpx.Timeout(10, read=30)) as r:
        into.put(("status", r.status_code, r.headers.get("content-type")))
        event, data = "message", []
        for line in r.iter_lines():
            if stop.is_set():
                return
            if line.startswith("retry:"):
                into.put(("retry", int(line[6:])))
            elif line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif not line and data:
                into.put((event, json.loads("\n".join(data))))
                event, data = "message", []


def _next(q: queue.Queue, name: str, timeout: float = 5.0, run_id: str | None = None):
    """The next message called ``name`` (for ``run_id`` when given), skipping others (other tests' runs)."""
    deadline = time.monotonic() + timeout
    while True:
        kind, *rest = q.get(timeout=max(0.01, deadline - time.monotonic()))
        if kind == name and (run_id is None or rest[0].get("run_id") == run_id):
            return rest[0] if len(rest) == 1 else rest


def test_all_runs_stream_sends_a_snapshot_then_runs_weights_and_progress(client, server):
    run = new_run(client)
    q, stop = queue.Queue(), threading.Event()
    threading.Thread(target=_read_events, args=(f"{server}/v1/events", q, stop), daemon=True).start()
    try:
        assert _next(q, "status") == [200, "text/event-stream; charset=utf-8"]
        assert _next(q, "retry") == 2000
        snapshot = _next(q, "runs")["runs"]
        listed = {r["run_id"]: r for r in snapshot}
        assert listed[run]["status"]["state"] == "created" and listed[run]["weights"]["version"] == 0
        assert set(listed[run]) == {*client.get_run(run), "status"}
        t0 = time.monotonic()
        other = new_run(client)
        created = _next(q, "run", run_id=other)
        assert created["domains"] == DOMAINS and created["status"]["version"] == 0
        w = client.post_evaluation(run, 0, {"code": 2.0, "prose": 1.0, "legal": 1.0}, TEACHER)
        pushed = _next(q, "weights", run_id=run)
        assert {k: pushed[k] for k in w} == w and pushed["status"]["version"] == 1
        p = client.post_progress(run, 7, 70, loss=2.5, ce=2.0, kl=0.5, tokens_per_s=10.0)
        pushed = _next(q, "progress", run_id=run)
        assert {k: pushed[k] for k in p} == p and pushed["status"]["step"] == 7
        assert pushed["status"]["total_steps"] == 70
        assert time.monotonic() - t0 < 3.0  # each within a second or so
    finally:
        stop.set()


# -- the page ----------------------------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class DevTools:
    """One page in headless Chromium, kept open and read over the DevTools protocol (CDP): ``js(expression)``
    evaluates in the page and returns the value. The websocket client is the minimal part of RFC 6455 that CDP
    needs (text frames, client-masked), in the standard library, so the test needs nothing but chromium."""

    def __init__(self, url: str, profile: Path, timeout: float = 30.0):
        profile.mkdir(parents=True, exist_ok=True)
        self.sock, self.ids, self.buf = None, 0, b""
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--remote-debugging-port=0", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + timeout
            while not (port_file.exists() and port_file.read_text().count("\n") >= 1):  # port, then a path
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("chromium did not open its DevTools port")
                time.sleep(0.05)
            port = int(port_file.read_text().split()[0])
            while not (pages := [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json()
                                 if t["type"] == "page"]):
                time.sleep(0.05)
            ws = urlsplit(pages[0]["webSocketDebuggerUrl"])
            self.sock = socket.create_connection((ws.hostname, ws.port), timeout=timeout)
            key = base64.b64encode(os.urandom(16)).decode()
            self.sock.sendall(f"GET {ws.path} HTTP/1.1\r\nHost: {ws.netloc}\r\nUpgrade: websocket\r\n"
                              f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                              .encode())
            while b"\r\n\r\n" not in self.buf:
                self.buf += self._recv_some()
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            if b" 101 " not in head.split(b"\r\n")[0]:
                raise RuntimeError(f"DevTools websocket refused: {head[:200]!r}")
        except BaseException:
            self.close()
            raise

    def _recv_some(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("DevTools websocket closed")
        return data

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.buf += self._recv_some()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _send(self, text: str) -> None:
        payload, mask = text.encode(), os.urandom(4)
        n = len(payload)
        size = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n) if n < 1 << 16 \
            else bytes([0x80 | 127]) + struct.pack(">Q", n)
        self.sock.sendall(b"\x81" + size + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def _message(self) -> dict:
        data = b""
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else None
            payload = self._read(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if b0 & 0x0F == 8:
                raise ConnectionError("DevTools websocket closed")
            if b0 & 0x0F in (0, 1, 2):  # continuation, text, binary (pings do not come from Chromium)
                data += payload
                if b0 & 0x80:
                    return json.loads(data)

    def call(self, method: str, params: dict | None = None) -> dict:
        """One CDP command (``Page.captureScreenshot``, ...): its ``result``; an error answer raises."""
        self.ids += 1
        self._send(json.dumps({"id": self.ids, "method": method, "params": params or {}}))
        while (msg := self._message()).get("id") != self.ids:  # skip events
            pass
        if "error" in msg:
            raise RuntimeError(f"{method}: {msg['error']}")
        return msg["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result}")
        return result["result"].get("value")

    def screenshot(self, path: Path, clip: dict | None = None) -> bytes:
        """A PNG of the page (of ``clip`` = {x, y, width, height} in CSS pixels when given), also written to
        ``path``; its bytes."""
        params = {"format": "png", "captureBeyondViewport": True}
        if clip is not None:
            params["clip"] = {**clip, "scale": 1}
        png = base64.b64decode(self.call("Page.captureScreenshot", params)["data"])
        path.write_bytes(png)
        return png

    def wait_for(self, expression: str, timeout: float = 10.0):
        """Poll the page (every 50 ms) until ``expression`` is truthy; its value. An expression that throws
        (the page still loading, an element not there yet) counts as not yet."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if value := self.js(expression):
                    return value
            except RuntimeError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the page never had {expression!r} within {timeout} s; it shows:\n"
                                     f"{str(self.js('document.body && document.body.innerText'))[-3000:]}")
            time.sleep(0.05)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def _text(selector: str) -> str:
    return f"(document.querySelector({json.dumps(selector)}) || {{}}).textContent || ''"


def test_page_shows_the_runs_and_their_domains(http, client, server, tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    run = client.create_run("page-run", ["code_domain", "prose_domain", "legal_domain"], interval_steps=10)
    # gaps (1, 0, 0): s^2 = 1/3; se (0.9, 0.6, -): mean(se^2) = 0.39 > 1/3, so the answer warns (issue 24)
    answer = http.post(server + "/v1/runs/page-run/evaluations", json={
        "step": 0, "student_loss": {"code_domain": 2.0, "prose_domain": 1.0, "legal_domain": 1.0},
        "teacher_loss": {"code_domain": 1.0, "prose_domain": 1.0, "legal_domain": 1.0},
        "log_ratio_se": {"code_domain": 0.9, "prose_domain": 0.6}})
    assert answer.json()["warning"] == "the mixture is steering by noise; raise eval tokens", answer.text
    assert run["run_id"] == "page-run"
    # an on-policy step: 3 s generation, 1.5 s grading, 0.5 s training -> 60 / 30 / 10 % of the 5 s
    http.post(server + "/v1/runs/page-run/progress", json={
        "step": 4, "total_steps": 40, "loss": 2.0, "onpolicy": {
            "generation_s": 3.0, "grading_s": 1.5, "training_s": 0.5, "rollout_tokens_per_s": 42.5,
            "version_lag": 1, "completion_len": {"code_domain": 12.5, "legal_domain": 7}}}).raise_for_status()
    client.create_run("page-acc", ["code_domain"], interval_steps=10)  # an accuracy-signal run: its own label
    client.post_evaluation("page-acc", 0, {"code_domain": 1.0}, {"code_domain": 0.0}, signal="accuracy")
    r = http.get(server + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "code_domain" not in r.text  # the names come from the API, rendered by the page's script
    assert "setInterval(refresh" not in r.text and "/v1/events" in r.text  # pushed, not polled
    page = DevTools(server + "/", tmp_path / "profile")
    try:
        page.wait_for("document.querySelectorAll('#run-page-run svg').length >= 3")  # weights, ratios, loss
        dom = page.js("document.documentElement.outerHTML")
        for name in ("page-run", "code_domain", "prose_domain", "legal_domain"):
            assert name in dom, dom[-2000:]
        assert dom.count("<svg") >= 2  # the weights and ratio charts were drawn
        assert "<p class=\"error\">" not in dom  # no "cannot reach the controller" message
        assert page.js("document.getElementById('conn').dataset.state") == "live"
        assert page.js("document.getElementById('status-page-run').dataset.version") == "1"
        # the noise warning, and each ratio with its 95% interval exp(log q -/+ 1.96 se) (none without an se)
        assert "the mixture is steering by noise; raise eval tokens" in page.js(_text("#run-page-run .noise-warning"))
        cells = page.js("Object.fromEntries([...document.querySelectorAll('#run-page-run .gap tbody tr')]"
                        ".map(tr => [tr.dataset.domain, [...tr.querySelectorAll('td')].map(td => td.textContent)]))")
        lo, hi = math.exp(1 - 1.96 * 0.9), math.exp(1 + 1.96 * 0.9)
        assert cells["code_domain"] == ["code_domain", f"{math.e:.4f}", f"{lo:.4f} – {hi:.4f}", "0.9000"]
        assert cells["legal_domain"] == ["legal_domain", "1.0000", "–", "–"]
        # the gap column's label is the run's signal's (ddk.vocab.SIGNAL_LABELS; a ratio run: PPL_S/PPL_T)
        from ddk.vocab import SIGNAL_LABELS

        page.wait_for("document.querySelector('#run-page-acc .gap-label') !== null")
        label = "document.querySelector('#run-%s .gap thead th.gap-label').textContent"
        assert page.js(label % "page-run") == SIGNAL_LABELS["ratio"] == "PPL_S/PPL_T"
        assert page.js(label % "page-acc") == SIGNAL_LABELS["accuracy"]
        # the on-policy step: the split of its time, rollout tokens/s, lag, completion lengths (none for prose)
        page.wait_for("document.querySelector('#run-page-run .onpolicy-wrap') !== null")
        phases = page.js("Object.fromEntries([...document.querySelectorAll('#run-page-run .phases tbody tr')]"
                         ".map(tr => [tr.dataset.phase, [...tr.querySelectorAll('td.num')].map(td => td.textContent)]))")
        assert phases == {"generation": ["3.00", "60.0%"], "grading": ["1.50", "30.0%"], "training": ["0.50", "10.0%"]}
        widths = page.js("[...document.querySelectorAll('#run-page-run .split > span')].map(e => e.style.width)")
        assert widths == ["60%", "30%", "10%"]  # the stacked bar, in the same shares
        assert page.js(_text("#run-page-run .onpolicy-wrap .rollout-tps")) == "rollout 42.5 tokens/s"
        assert page.js(_text("#run-page-run .onpolicy-wrap .lag")) == "1"
        lengths = page.js("Object.fromEntries([...document.querySelectorAll('#run-page-run .completion tbody tr')]"
                          ".map(tr => [tr.dataset.domain, tr.querySelector('td.length').textContent]))")
        assert lengths == {"code_domain": "12.5", "legal_domain": "7.0"}
        assert page.js("document.querySelector('#run-page-acc .onpolicy-wrap')") is None  # no on-policy numbers
    finally:
        page.close()


LOSS_PATH_POINTS = ("document.querySelector('#run-live .loss-chart path[data-series=\"loss\"]')"
                    ".getAttribute('d').split(/[ML]/).length - 1")  # the points of the loss line


def test_page_updates_live_and_rides_out_a_controller_restart(tmp_path):
    """The page stays open while the test posts: a new weights version, progress (step of total, the loss
    curve) and a new run appear without a reload, also after the controller was SIGKILLed and restarted."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    ctl = Proc(["controller", "serve", "--db", str(tmp_path / "c.sqlite")], tmp_path / "controller.log",
               port=free_port(), append=False)
    page = None
    try:
        ctl.start().wait_healthy(timeout=60)
        c = ControllerClient(ctl.url, max_retries=5, backoff=0.2)
        c.create_run("live", DOMAINS, interval_steps=10)
        page = DevTools(ctl.url + "/", tmp_path / "profile")
        page.wait_for("document.getElementById('conn').dataset.state === 'live'")
        page.wait_for("document.getElementById('run-live')?.dataset.version === '0'")
        assert "not started" in page.js(_text("#status-live .progress"))
        page.js("window.__same_page = 1")  # gone if the page were reloaded

        t0 = time.monotonic()
        w = c.post_evaluation("live", 0, {"code": 2.0, "prose": 1.0, "legal": 1.0}, TEACHER)
        page.wait_for("document.getElementById('run-live').dataset.version === '1'")
        pushed_s = time.monotonic() - t0
        shown = page.js("[...document.querySelectorAll('#run-live .current td.weight')].map(e => e.textContent)")
        assert shown == [f"{w['weights'][d]:.4f}" for d in DOMAINS]

        for step, loss in ((3, 5.0), (6, 4.0)):
            c.post_progress("live", step, 40, loss=loss, ce=loss - 1, kl=1.0, tokens_per_s=500.0)
        page.wait_for(f"({_text('#status-live .steps')}) === 'step 6 of 40'")
        assert page.js("document.getElementById('status-live').dataset.state") == "training"
        page.wait_for(f"{LOSS_PATH_POINTS} === 2")  # a line through both points

        c.create_run("second", DOMAINS, interval_steps=10)
        page.wait_for("!!document.getElementById('status-second')")

        ctl.kill()  # the stream drops; EventSource retries (retry: 2000) until the controller is back
        page.wait_for("document.getElementById('conn').dataset.state === 'reconnecting'")
        ctl.start().wait_healthy(timeout=60)
        page.wait_for("document.getElementById('conn').dataset.state === 'live'", timeout=15)
        c.post_evaluation("live", 10, {"code": 1.5, "prose": 1.0, "legal": 1.0})
        c.post_progress("live", 12, 40, loss=3.0)
        page.wait_for("document.getElementById('run-live').dataset.version === '2'")
        page.wait_for(f"({_text('#status-live .steps')}) === 'step 12 of 40'")
        assert page.js("window.__same_page") == 1  # never reloaded
        assert page.js("document.querySelectorAll('#overview-body tr').length") == 2
        page.wait_for(f"{LOSS_PATH_POINTS} === 3")
        # reports faster than the stream reads: two written to the controller's file by another process (nothing
        # wakes the stream), then one through the API. The stream sends one progress message, and it carries the
        # stored curve, so the chart has every point (with the report's point alone it had 4: seen under load)
        from ddk.controller.store import Store

        other = Store(tmp_path / "c.sqlite")
        other.add_progress("live", 14, 40, loss=2.8)
        other.add_progress("live", 16, 40, loss=2.6)
        c.post_progress("live", 18, 40, loss=2.5)
        page.wait_for(f"({_text('#status-live .steps')}) === 'step 18 of 40'")
        page.wait_for(f"{LOSS_PATH_POINTS} === 6")
        # pushed, not polled: the page never asks for /weights (the old page polled it every 5 s)
        urls = page.js("performance.getEntriesByType('resource').map(e => new URL(e.name).pathname)")
        assert not [u for u in urls if u.endswith("/weights")], urls
        assert pushed_s < 2.0
        assert "<p class=\"error\">" not in page.js("document.documentElement.outerHTML")
    finally:
        if page is not None:
            page.close()
        ctl.stop()



# -- policy plug-ins (issue 18) ------------------------------------------------------------------------------
def test_policies_endpoint_lists_every_policy_with_params_and_defaults(http, server):
    from ddk.controller import policies

    r = http.get(f"{server}/v1/policies")
    assert r.status_code == 200
    listed = {p["name"]: p for p in r.json()["policies"]}
    assert list(listed) == list(policies.names()) == ["ddk", "ddk_raw", "fixed", "doremi", "ddk_progress"]
    assert {k: v["default"] for k, v in listed["doremi"]["params"].items()} == {"eta": 1.0, "smoothing": 1e-3}
    assert listed["ddk_progress"]["params"]["min_learnability"]["default"] == 0.0
    assert listed["ddk"]["params"] == {} and listed["ddk"]["run_fields"] == ["alpha", "gap_estimate"]
    assert listed["fixed"]["needs_teacher"] is False
    with ControllerClient(server) as c:
        assert c.list_policies() == r.json()


@pytest.mark.parametrize("policy, params, field", [
    ("doremi", {"eta": -1}, "policy_params.eta"),
    ("doremi", {"eta": "fast"}, "policy_params.eta"),
    ("doremi", {"smoothing": 2}, "policy_params.smoothing"),
    ("ddk_progress", {"min_learnability": 1.5}, "policy_params.min_learnability"),
    ("ddk", {"eta": 1}, "policy_params.eta"),
    ("doremi", "fast", "policy_params"),
])
def test_bad_policy_params_are_422_naming_the_field(http, server, policy, params, field):
    r = http.post(f"{server}/v1/runs", json={"run_id": "badparams", "domains": DOMAINS, "policy": policy,
                                             "policy_params": params})
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(field), r.json()
    assert http.get(f"{server}/v1/runs/badparams").status_code == 404


def test_policy_params_are_part_of_the_run(http, server):
    body = {"run_id": "doremi-params", "domains": DOMAINS, "policy": "doremi", "policy_params": {"eta": 2}}
    r = http.post(f"{server}/v1/runs", json=body)
    assert r.status_code == 201 and r.json()["policy_params"] == {"eta": 2.0, "smoothing": 1e-3}
    assert http.post(f"{server}/v1/runs", json={**body, "policy_params": {"eta": 2.0, "smoothing": 1e-3}}
                     ).status_code == 200
    r = http.post(f"{server}/v1/runs", json={**body, "policy_params": {"eta": 3}})
    assert r.status_code == 409 and "policy_params" in r.json()["detail"]


def test_evaluation_tokens_are_optional_and_checked(http, client, server):
    run = new_run(client, "ddk_progress")
    bad = http.post(f"{server}/v1/runs/{run}/evaluations",
                    json={"step": 0, "student_loss": TEACHER, "teacher_loss": TEACHER, "tokens": {"code": -1}})
    assert bad.status_code == 422 and bad.json()["detail"].startswith("tokens"), bad.text
    client.post_evaluation(run, 0, TEACHER, TEACHER)  # an older trainer: no tokens
    client.post_evaluation(run, 10, TEACHER, tokens={"code": 1, "prose": 2, "legal": 3})
    hist = client.history(run)["versions"]
    assert "tokens" not in hist[1] and hist[2]["tokens"] == {"code": 1.0, "prose": 2.0, "legal": 3.0}
    assert hist[2]["policy_state"]["tokens"] == hist[2]["tokens"]


# -- standard errors of the log-ratio, the gap estimate and the noise warning (issue 24) ------------------------
NOISE = "the mixture is steering by noise; raise eval tokens"


def test_log_ratio_se_is_optional_stored_and_warns_when_the_gaps_are_noise(http, client, server):
    body = {"run_id": f"se-{next(_counter)}", "domains": DOMAINS, "gap_estimate": "shrunk", "interval_steps": 10}
    r = http.post(f"{server}/v1/runs", json=body)
    assert r.status_code == 201 and r.json()["gap_estimate"] == "shrunk", r.text
    run = body["run_id"]
    conflict = http.post(f"{server}/v1/runs", json={**body, "gap_estimate": "raw"})
    assert conflict.status_code == 409 and "gap_estimate" in conflict.json()["detail"]
    bad = http.post(f"{server}/v1/runs", json={**body, "run_id": "se-bad", "gap_estimate": "lcb"})
    assert bad.status_code == 422 and bad.json()["detail"].startswith("gap_estimate:"), bad.text
    # gaps (1, 0, 1.5) of code, prose, legal: m = 5/6, s^2 = (1/36 + 25/36 + 16/36) / 2 = 7/12 = 0.5833;
    # se (1.0, 1.0, -): mean(se^2) = 2/3 > s^2 -> tau^2 = 0: the answer warns
    student = {"code": 2.0, "prose": 2.0, "legal": 2.0}
    url = f"{server}/v1/runs/{run}/evaluations"
    r = http.post(url, json={"step": 0, "student_loss": student, "teacher_loss": TEACHER,
                             "log_ratio_se": {"code": 1.0, "prose": 1.0}})
    assert r.status_code == 200 and r.json()["warning"] == NOISE, r.text
    # shrunk: code and prose fall to the mean 5/6, legal (no se) keeps 1.5; softmax(exp(gaps))
    e = {"code": math.exp(math.exp(5 / 6)), "prose": math.exp(math.exp(5 / 6)), "legal": math.exp(math.exp(1.5))}
    assert r.json()["weights"] == pytest.approx({d: v / sum(e.values()) for d, v in e.items()}, rel=1e-9)
    # an older client's body: no standard errors, no warning key, the answer as before
    r = http.post(url, json={"step": 10, "student_loss": student})
    assert r.status_code == 200 and set(r.json()) == {"version", "step", "weights", "updated_at"}, r.text
    hist = client.history(run)["versions"]
    assert hist[1]["log_ratio_se"] == {"code": 1.0, "prose": 1.0} and hist[1]["warning"] == NOISE
    assert "log_ratio_se" not in hist[2] and "warning" not in hist[2]
    assert client.get_run(run)["gap_estimate"] == "shrunk"


# -- the gap signal (mixture.signal: issue 27 item 4, issue 28 item 5) -------------------------------------------


def test_the_evaluations_signal_is_stored_with_the_run_and_returned(http, client, server):
    run = new_run(client)
    url = f"{server}/v1/runs/{run}/evaluations"
    # accuracies of 4 prompts, eps 1/8: student (1/4, 1, 0), teacher (1, 1, 0), losses -log((acc + e) / (1 + e))
    eps = 1 / 8
    loss = {a: -math.log((a + eps) / (1 + eps)) for a in (0.0, 0.25, 1.0)}
    student = {"code": loss[0.25], "prose": loss[1.0], "legal": loss[0.0]}
    teacher = {"code": loss[1.0], "prose": loss[1.0], "legal": loss[0.0]}
    r = http.post(url, json={"step": 0, "student_loss": student, "teacher_loss": teacher, "signal": "accuracy"})
    assert r.status_code == 200, r.text
    assert client.get_run(run)["signal"] == "accuracy"
    assert [x["run_id"] for x in http.get(f"{server}/v1/runs").json()["runs"] if x.get("signal") == "accuracy"
            ].count(run) == 1
    hist = client.history(run)["versions"]
    # the controller's q = (acc_T + eps) / (acc_S + eps), by hand
    assert hist[1]["signal"] == "accuracy" and hist[1]["ratio"] == pytest.approx(
        {"code": (1 + eps) / (0.25 + eps), "prose": 1.0, "legal": 1.0}, rel=1e-12)
    # through the Python client (the trainer's path), then an evaluation without a signal: ratio again
    client.post_evaluation(run, 10, student, signal="onpolicy")
    assert client.get_run(run)["signal"] == "onpolicy" and client.history(run)["versions"][2]["signal"] == "onpolicy"
    client.post_evaluation(run, 20, student)
    assert "signal" not in client.get_run(run) and "signal" not in client.history(run)["versions"][3]
    assert "signal" not in client.get_run(new_run(client))  # absent: ratio, as rows from before the field


@pytest.mark.parametrize("signal", ['"perplexity"', '1', '["accuracy"]', '"Accuracy"'])
def test_a_bad_signal_is_422_naming_the_field(http, client, server, signal):
    run = new_run(client)
    text = '{"step": 0, "student_loss": %s, "teacher_loss": %s, "signal": %s}' % (
        json.dumps(TEACHER), json.dumps(TEACHER), signal)
    r = http.post(f"{server}/v1/runs/{run}/evaluations", content=text, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"].startswith("signal:"), r.text
    assert client.get_weights(run)["version"] == 0


@pytest.mark.parametrize("se, field", [
    ('{"code": -0.5}', "log_ratio_se.code"), ('{"code": NaN}', "log_ratio_se.code"),
    ('{"code": Infinity}', "log_ratio_se.code"), ('{"code": "0.1"}', "log_ratio_se.code"),
    ('{"math": 0.1}', "log_ratio_se.math"), ('[0.1]', "log_ratio_se"),
])
def test_bad_log_ratio_se_is_422_naming_the_field(http, client, server, se, field):
    run = new_run(client)
    text = '{"step": 0, "student_loss": %s, "teacher_loss": %s, "log_ratio_se": %s}' % (
        json.dumps(TEACHER), json.dumps(TEACHER), se)
    r = http.post(f"{server}/v1/runs/{run}/evaluations", content=text, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"].startswith(field), r.text
    assert client.get_weights(run)["version"] == 0


def test_policy_state_continues_after_a_sigkill_restart(tmp_path):
    """A ddk_progress run: two evaluations, kill -9, restart on the file, a third: the weights are those of the
    policy chained in-process over the three (so the state the third one needed came back from SQLite)."""
    from ddk.controller import policies

    db, port = tmp_path / "c.sqlite", free_port()
    evals = [({"code": 3.0, "prose": 2.5, "legal": 1.5}, {"code": 100, "prose": 100, "legal": 100}),
             ({"code": 3.0, "prose": 2.2, "legal": 0.8}, {"code": 300, "prose": 200, "legal": 150}),
             ({"code": 2.9, "prose": 2.1, "legal": 0.7}, {"code": 500, "prose": 300, "legal": 200})]
    p = policies.get("ddk_progress")
    state, previous, want = None, None, []
    for i, (student, tokens) in enumerate(evals):
        ev = policies.Evaluation(10 * i, tuple(DOMAINS), student, TEACHER, tokens, previous,
                                 {d: 1 / 3 for d in DOMAINS}, 0.5)
        previous, state = p.update(state, ev, p.params())
        state = json.loads(json.dumps(state))
        want.append(previous)
    with service(["controller", "serve", "--db", str(db)], port=port, timeout=60) as (url, proc):
        with ControllerClient(url) as c:
            c.create_run("progress", DOMAINS, policy="ddk_progress", interval_steps=10)
            for i, (student, tokens) in enumerate(evals[:2]):
                w = c.post_evaluation("progress", 10 * i, student, TEACHER, tokens=tokens)
                assert w["weights"] == pytest.approx(want[i], rel=1e-12)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    with service(["controller", "serve", "--db", str(db)], port=port, timeout=60) as (url, proc):
        with ControllerClient(url) as c:
            w3 = c.post_evaluation("progress", 20, evals[2][0], tokens=evals[2][1])
            assert w3["version"] == 3 and w3["weights"] == pytest.approx(want[2], rel=1e-12)
            assert c.history("progress")["versions"][3]["policy_state"] == state
            # the discount did something: code's gap stalled, so it gets less than ddk would give it
            ddk = c.create_run("progress-ddk", DOMAINS, policy="ddk", interval_steps=10)["run_id"]
            for i, (student, _) in enumerate(evals):
                wd = c.post_evaluation(ddk, 10 * i, student, TEACHER)
            assert w3["weights"]["code"] < wd["weights"]["code"]

if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
