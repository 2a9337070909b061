"""``GET /v1/tokenizer`` against a real ``ddk teacher serve`` and ``TeacherClient.tokenizer()`` (issue 29): the
tokenizer the trainer rebuilds from the teacher's files encodes like the teacher's own, and its fingerprint is the
one ``/v1/info`` publishes. The real kit's SmolLM2-135M teacher (49k byte-level BPE) is the cross-family teacher
of the quick kit's student."""

from __future__ import annotations

import httpx
import pytest


TEXTS = ["The cat sat on the mat.", "def f(x):\n    return x ** 2  # naïve café ☕", "  two  spaces\n\n\nand tabs\t!",
         "Zahlen 3.14159 und Ümlaute, 日本語のテキスト."]


@pytest.mark.slow
def test_the_rebuilt_tokenizer_encodes_like_the_teachers_own(real_kit, real_teacher):
    from transformers import AutoTokenizer

    from ddk.fingerprint import tokenizer_fingerprint
    from ddk.teacher.client import TeacherClient

    own = AutoTokenizer.from_pretrained(str(real_kit / "teacher"), trust_remote_code=False)
    with TeacherClient(real_teacher) as client:
        rebuilt = client.tokenizer()
        info = client.info()
    assert tokenizer_fingerprint(rebuilt) == info["tokenizer_fingerprint"] == tokenizer_fingerprint(own)
    assert len(rebuilt) == len(own) > 40000
    for text in TEXTS:
        a = own(text, add_special_tokens=False, return_offsets_mapping=True)
        b = rebuilt(text, add_special_tokens=False, return_offsets_mapping=True)
        assert a["input_ids"] == b["input_ids"] and a["offset_mapping"] == b["offset_mapping"], text
        assert rebuilt.decode(b["input_ids"]) == text
    assert rebuilt.eos_token == own.eos_token


@pytest.mark.slow
def test_the_route_answers_the_files_as_json_and_is_open(real_kit, real_teacher):
    import json

    r = httpx.get(real_teacher + "/v1/tokenizer", timeout=30)
    assert r.status_code == 200
    body = r.json()
    on_disk = json.loads((real_kit / "teacher" / "tokenizer.json").read_text())
    assert body["files"]["tokenizer.json"] == on_disk
    assert set(body["files"]) <= {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert body["tokenizer_fingerprint"] == httpx.get(real_teacher + "/v1/info", timeout=30).json()[
        "tokenizer_fingerprint"]


def test_a_teacher_folder_without_tokenizer_json_answers_404_naming_it(tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from ddk.teacher.tokenizer_route import tokenizer_router

    app = FastAPI()
    app.include_router(tokenizer_router(tmp_path, {}))
    r = TestClient(app).get("/v1/tokenizer")
    assert r.status_code == 404 and "tokenizer.json" in r.json()["detail"]
