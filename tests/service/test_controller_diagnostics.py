"""Per-domain distillation diagnostics at the controller (issue 14): the evaluation's optional ``diagnostics``
``{domain: {"kl", "ce", "topk_mass", "tokens", "route"}}``, checked field by field (422 naming it), stored with
the version (a column added to older files), returned in the history, and shown on the page, live.

The HTTP tests share the session's controller (``controller_url``), each on runs of its own; the page test starts
its own controller and drives headless Chromium over the DevTools protocol (the helpers of
``test_controller_api``), takes a screenshot and reads what the page shows.
"""

from __future__ import annotations

import json
import sqlite3
import struct
import time
import zlib
from itertools import count

import numpy as np
import pytest
from procs import Proc, free_port
from test_controller_api import CHROMIUM, DOMAINS, TEACHER, DevTools

from ddk.controller.client import ControllerClient, ControllerError
from ddk.controller.spec import Invalid
from ddk.controller.store import Store

pytestmark = pytest.mark.slow

_ids = count()


@pytest.fixture(scope="module")
def client(controller_url):
    with ControllerClient(controller_url, max_retries=2, backoff=0.05) as c:
        yield c


def new_run(client, policy="ddk") -> str:
    run_id = f"diag-{policy}-{next(_ids)}-{time.monotonic_ns()}"
    client.create_run(run_id, DOMAINS, policy=policy, interval_steps=10)
    return run_id


CODE = {"kl": 0.1234, "ce": 1.5, "topk_mass": 0.875, "tokens": 1234567, "route": "http://127.0.0.1:9/specialist"}


# -- the contract ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("diagnostics, field", [
    ('{"math": {"kl": 0.1}}', "diagnostics.math"),                        # not one of the run's domains
    ('{"code": {"topk_mass": 1.5}}', "diagnostics.code.topk_mass"),
    ('{"code": {"topk_mass": -0.01}}', "diagnostics.code.topk_mass"),
    ('{"code": {"topk_mass": "0.5"}}', "diagnostics.code.topk_mass"),
    ('{"code": {"kl": NaN}}', "diagnostics.code.kl"),
    ('{"code": {"kl": Infinity}}', "diagnostics.code.kl"),
    ('{"prose": {"ce": -1}}', "diagnostics.prose.ce"),
    ('{"prose": {"ce": true}}', "diagnostics.prose.ce"),
    ('{"code": {"tokens": -1}}', "diagnostics.code.tokens"),
    ('{"code": {"tokens": 1.5}}', "diagnostics.code.tokens"),
    ('{"code": {"tokens": "12"}}', "diagnostics.code.tokens"),
    ('{"code": {"tokens": 1e300}}', "diagnostics.code.tokens"),
    ('{"code": {"route": 3}}', "diagnostics.code.route"),
    ('{"code": {"mass": 0.5}}', "diagnostics.code.mass"),                 # an unknown field
    ('{"code": 0.5}', "diagnostics.code"),
    ('[{"kl": 0.1}]', "diagnostics"),
])
def test_bad_diagnostics_are_422_naming_the_field(client, controller_url, diagnostics, field):
    import httpx

    run = new_run(client)
    body = '{"step": 0, "student_loss": %s, "teacher_loss": %s, "diagnostics": %s}' % (
        json.dumps(TEACHER), json.dumps(TEACHER), diagnostics)
    r = httpx.post(f"{controller_url}/v1/runs/{run}/evaluations", content=body,
                   headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(field + ":"), r.json()
    assert client.get_weights(run)["version"] == 0  # nothing recorded
    sent = json.loads(diagnostics)
    if isinstance(sent, dict) and all(isinstance(v, dict) for v in sent.values()) and "NaN" not in diagnostics \
            and "Infinity" not in diagnostics:
        with pytest.raises(ControllerError) as e:  # the client passes them through, and raises the 422
            client.post_evaluation(run, 0, TEACHER, TEACHER, diagnostics=sent)
        assert e.value.status == 422 and e.value.detail.startswith(field + ":"), e.value.detail


def test_diagnostics_round_trip_in_the_history(client):
    run = new_run(client)
    plain = client.post_evaluation(run, 0, TEACHER, TEACHER)  # an older trainer: no diagnostics
    sent = {"prose": {"kl": np.float32(0.25), "ce": 2.0, "topk_mass": 0.5, "tokens": np.int64(2048), "route": None},
            "code": dict(CODE), "legal": {}}
    w = client.post_evaluation(run, 10, TEACHER, diagnostics=sent)
    assert w["version"] == plain["version"] + 1 == 2
    versions = client.history(run)["versions"]
    assert "diagnostics" not in versions[0] and "diagnostics" not in versions[1]
    assert set(versions[1]) == {"version", "step", "student_loss", "teacher_loss", "ratio", "weights", "created_at"}
    got = versions[2]["diagnostics"]
    # in the run's domain order, each domain with the fields it was sent (None left out), the values equal
    assert list(got) == ["code", "prose", "legal"]
    assert got == {"code": CODE, "prose": {"kl": 0.25, "ce": 2.0, "topk_mass": 0.5, "tokens": 2048}, "legal": {}}
    assert isinstance(got["code"]["tokens"], int) and isinstance(got["prose"]["tokens"], int)
    # the weights do not depend on them: the same losses without diagnostics give the same weights
    other = new_run(client)
    client.post_evaluation(other, 0, TEACHER, TEACHER)
    assert client.post_evaluation(other, 10, TEACHER)["weights"] == w["weights"]
    # an empty object is no diagnostics
    client.post_evaluation(run, 20, TEACHER, diagnostics={})
    assert "diagnostics" not in client.history(run)["versions"][3]


# -- a file from before the column -----------------------------------------------------------------------------
SCHEMA_BEFORE_DIAGNOSTICS = """
CREATE TABLE runs (run_id TEXT PRIMARY KEY, domains TEXT NOT NULL, policy TEXT NOT NULL, alpha REAL NOT NULL,
    interval_steps INTEGER NOT NULL, initial_weights TEXT, created_at TEXT NOT NULL, policy_params TEXT);
CREATE TABLE versions (run_id TEXT NOT NULL REFERENCES runs(run_id), version INTEGER NOT NULL, step INTEGER,
    student_loss TEXT, teacher_loss TEXT, ratio TEXT, weights TEXT NOT NULL, created_at TEXT NOT NULL,
    state TEXT, tokens TEXT, PRIMARY KEY (run_id, version));
"""


def test_a_file_from_before_the_diagnostics_keeps_working(tmp_path):
    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path)
    con.executescript(SCHEMA_BEFORE_DIAGNOSTICS)
    con.execute("INSERT INTO runs VALUES ('old', '[\"a\", \"b\"]', 'ddk', 0.5, 10, NULL, '2026-01-01T00:00:00.000Z', "
                "NULL)")
    con.execute("INSERT INTO versions VALUES ('old', 0, NULL, NULL, NULL, NULL, '{\"a\": 0.5, \"b\": 0.5}', 't0', "
                "NULL, NULL)")
    con.execute("INSERT INTO versions VALUES ('old', 1, 0, '{\"a\": 2.0, \"b\": 2.0}', '{\"a\": 1.0, \"b\": 1.0}', "
                "'{\"a\": 2.7, \"b\": 2.7}', '{\"a\": 0.7, \"b\": 0.3}', 't1', NULL, '{\"a\": 10.0, \"b\": 5.0}')")
    con.commit()
    con.close()
    store = Store(path)
    assert "diagnostics" in {r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(versions)")}
    assert [set(v) for v in store.history("old")][1] == {"version", "step", "student_loss", "teacher_loss", "ratio",
                                                         "weights", "created_at", "tokens"}
    diag = {"b": {"kl": 0.01, "topk_mass": 1.0, "route": "teacher"}}
    w2 = store.add_evaluation("old", 10, {"a": 2.0, "b": 2.0}, diagnostics=diag)
    assert w2["version"] == 2 and w2["weights"] == pytest.approx({"a": 0.5 * 0.7 + 0.25, "b": 0.5 * 0.3 + 0.25})
    again = Store(path)  # opening it again: nothing to migrate, the diagnostics are there
    hist = again.history("old")
    assert "diagnostics" not in hist[1] and hist[2]["diagnostics"] == diag
    with pytest.raises(Invalid, match=r"^diagnostics\.c: unknown domain"):  # the store checks them too
        again.add_evaluation("old", 20, {"a": 2.0, "b": 2.0}, diagnostics={"c": {"kl": 0.1}})
    with pytest.raises(Invalid, match=r"^diagnostics\.a\.topk_mass:"):
        again.add_evaluation("old", 20, {"a": 2.0, "b": 2.0}, diagnostics={"a": {"topk_mass": 2}})
    assert again.weights("old")["version"] == 2


# -- the page --------------------------------------------------------------------------------------------------
def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) of a PNG, from its IHDR chunk (which must come first)."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR", png[:16]
    return struct.unpack(">II", png[16:24])


def png_pixels(png: bytes) -> list[tuple[int, int, int]]:
    """The (r, g, b) of every pixel of an 8-bit RGB or RGBA PNG, row by row, decoded with the standard library
    (small images: it is pure Python)."""
    width, height = png_size(png)
    pos, idat, header = 8, b"", None
    while pos < len(png):
        n, kind = struct.unpack(">I4s", png[pos:pos + 8])
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", png[pos + 8:pos + 8 + n])
        elif kind == b"IDAT":
            idat += png[pos + 8:pos + 8 + n]
        pos += 12 + n
    depth, ctype = header[2:4]
    assert depth == 8 and ctype in (2, 6), header
    bpp = 3 if ctype == 2 else 4
    raw, stride, out, prev = zlib.decompress(idat), width * bpp, [], bytearray(width * bpp)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a, b = (line[i - bpp] if i >= bpp else 0), prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 0xFF
            elif f == 2:
                line[i] = (line[i] + b) & 0xFF
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        out += [tuple(line[i:i + 3]) for i in range(0, stride, bpp)]
        prev = line
    return out


DIAG = "#run-diag .diagnostics"
ROWS = f"[...document.querySelectorAll('{DIAG} tbody tr')].map(tr => [...tr.children].map(td => td.textContent))"


def test_page_shows_the_diagnostics_and_updates_them_live(tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    ctl = Proc(["controller", "serve", "--db", str(tmp_path / "c.sqlite")], tmp_path / "controller.log",
               port=free_port(), append=False)
    page = None
    try:
        ctl.start().wait_healthy(timeout=60)
        c = ControllerClient(ctl.url, max_retries=5, backoff=0.2)
        c.create_run("diag", DOMAINS, interval_steps=10)
        c.post_evaluation("diag", 0, TEACHER, TEACHER, diagnostics={
            "code": CODE,
            "prose": {"kl": 0.05, "ce": 2.25, "topk_mass": 0.9, "tokens": 2048, "route": "http://127.0.0.1:9/general"}})
        page = DevTools(ctl.url + "/", tmp_path / "profile")
        page.wait_for(f"document.querySelectorAll('{DIAG} tbody tr').length === 2")
        page.js("window.__same_page = 1")  # gone if the page were reloaded
        assert page.js(ROWS) == [
            ["code", "0.1234", "1.5000", "87.5%", "1,234,567", "http://127.0.0.1:9/specialist"],
            ["prose", "0.0500", "2.2500", "90.0%", "2,048", "http://127.0.0.1:9/general"]]  # legal sent none
        assert page.js(f"[...document.querySelectorAll('{DIAG} th')].map(e => e.textContent)") == [
            "domain", "KL", "CE", "top-k mass", "tokens", "route"]
        text = page.js("document.body.innerText")
        for shown in ("distillation diagnostics", "evaluation at step 0 (version 1)", "0.1234", "87.5%", "1,234,567",
                      "http://127.0.0.1:9/specialist"):
            assert shown in text, text[-2000:]

        # the screenshot: the whole page, and the table alone, which has text drawn on it (dark pixels)
        page.call("Emulation.setDeviceMetricsOverride",
                  {"width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": False})
        page.js(f"document.querySelector('{DIAG} table').scrollIntoView()")
        full = page.screenshot(tmp_path / "page.png")
        width, height = png_size(full)
        assert (tmp_path / "page.png").stat().st_size == len(full) > 1000 and width == 1400 and height >= 600
        box = page.js(f"(r => ({{x: r.x + scrollX, y: r.y + scrollY, width: r.width, height: r.height}}))"
                      f"(document.querySelector('{DIAG} table').getBoundingClientRect())")
        assert box["width"] > 200 and box["height"] > 30, box
        table_png = page.screenshot(tmp_path / "diagnostics.png", box)
        assert png_size(table_png) == (round(box["width"]), round(box["height"])), (png_size(table_png), box)
        pixels = png_pixels(table_png)
        dark = sum(1 for p in pixels if sum(p) < 300)
        light = sum(1 for p in pixels if sum(p) > 700)
        assert dark > 0.01 * len(pixels) and light > 0.5 * len(pixels), (dark, light, len(pixels))

        # live: a new evaluation's diagnostics replace the table, over SSE, without a reload
        t0 = time.monotonic()
        c.post_evaluation("diag", 10, TEACHER, diagnostics={
            "code": {"kl": 0.0567, "ce": 1.25, "topk_mass": 0.5, "tokens": 2469134,
                     "route": "http://127.0.0.1:9/general"},
            "legal": {"topk_mass": 1.0}})
        page.wait_for(f"document.querySelector('{DIAG} .diag-wrap').dataset.version === '2'")
        assert time.monotonic() - t0 < 5.0
        assert page.js(ROWS) == [
            ["code", "0.0567", "1.2500", "50.0%", "2,469,134", "http://127.0.0.1:9/general"],
            ["legal", "–", "–", "100.0%", "–", "–"]]
        assert "evaluation at step 10 (version 2)" in page.js("document.body.innerText")
        # one without diagnostics: the table stays on the latest evaluation that had them
        c.post_evaluation("diag", 20, TEACHER)
        page.wait_for("document.getElementById('run-diag').dataset.version === '3'")
        assert page.js(f"document.querySelector('{DIAG} .diag-wrap').dataset.version") == "2"
        assert page.js(ROWS)[0][1] == "0.0567"
        assert page.js("window.__same_page") == 1
        assert "<p class=\"error\">" not in page.js("document.documentElement.outerHTML")
    finally:
        if page is not None:
            page.close()
        ctl.stop()
