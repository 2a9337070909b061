"""The cross-tokenizer teacher behind the feed (issue 29, ``ddk.trainer.xtok_teacher``): rows cut into whole
characters, the identity through the whole path against a real served teacher (today's loss and gradients to
1e-5), the real pair (the quick kit's 2k-vocabulary student, the real kit's SmolLM2-135M teacher) in-process, a
route to a teacher of another family beside a same-family one, and the handshake's refusals (exit 2).

The kits come from the session fixtures (``kit``, ``real_kit``); the teachers are real ``ddk teacher serve``
processes (hf backend)."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "loop"))

from procs import service  # noqa: E402


def _tok(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


# ---------------------------------------------------------------------------------------------------------
# a row cut into whole characters (byte-level BPE splits a character the student has no token for)

def test_a_row_that_starts_and_ends_inside_a_character_is_cut_to_whole_characters(kit):
    from ddk.trainer.xtok_teacher import Side, student_segments

    st = _tok(kit / "student")
    side = Side(st)
    text = "☕ a cup ☕"
    ids = st(text, add_special_tokens=False)["input_ids"]
    pieces = [side.id_bytes[i] for i in ids]
    assert b"".join(pieces) == text.encode()
    first_whole = next(i for i, p in enumerate(pieces) if p == b" a" or p.startswith(b" a"))
    assert first_whole >= 2, pieces  # the 3 bytes of the cup take at least 2 tokens of this 2k vocabulary
    row = ids[1:-1]  # starts after the first byte of the first cup, ends before the last byte of the second
    segs = student_segments(row, side)
    assert len(segs) == 1
    seg = segs[0]
    assert seg.text == " a cup "  # by hand: the partial characters at both ends are left out
    assert seg.start == first_whole - 1 and row[seg.start] == ids[first_whole]
    assert seg.spans[-1, 1] == len(" a cup ".encode())


def test_a_student_eos_becomes_the_teachers_eos_between_segments(kit, real_kit):
    from ddk.trainer.xtok_teacher import Side, align_row

    st, tt = _tok(kit / "student"), _tok(real_kit / "teacher")
    s_side, t_side = Side(st), Side(tt)
    a, b = st(" one two", add_special_tokens=False)["input_ids"], st(" three", add_special_tokens=False)["input_ids"]
    row = a + [st.eos_token_id] + b
    al = align_row(row, s_side, t_side, 1000)
    ta, tb = tt(" one two", add_special_tokens=False)["input_ids"], tt(" three", add_special_tokens=False)["input_ids"]
    assert al.teacher_ids == ta + [tt.eos_token_id] + tb
    # compared pairs: the end of " one" and of " one two" (student position of its last token, teacher's), then
    # " three" has no next token in the row (its last position is the row's last: no label)
    pairs = {tuple(p) for p in al.pairs.tolist()}
    assert (len(a) - 1, len(ta) - 1) in pairs  # after " one two": both predict the eos
    assert all(s < len(row) - 1 and t < len(al.teacher_ids) - 1 for s, t in pairs)
    # the teacher's eos log-probability counts with the student's prediction of its eos
    assert al.nll_to[len(ta)] == len(a) - 1


# ---------------------------------------------------------------------------------------------------------
# identity: one tokenizer on both sides through the whole cross-tokenizer path

def _word_rows(tok, texts, length):
    """Rows of ``length`` ids from the starts of documents, cut where the next token starts a word (so that
    tokenising the row's text again gives the same ids)."""
    rows = []
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        if len(ids) > length and tok.convert_ids_to_tokens(ids[length]).startswith("Ġ"):
            rows.append(ids[:length])
    return rows


def test_identity_through_the_cross_tokenizer_path_is_todays_loss_and_gradient(kit, teacher_url):
    from transformers import AutoModelForCausalLM

    from ddk.teacher.client import TeacherClient
    from ddk.trainer.loss import distill_loss
    from ddk.trainer.xtok_loss import xtok_batch_loss
    from ddk.trainer.xtok_teacher import CrossTokenizerTeacher, Route, Side, identity_family, pair_family

    st = _tok(kit / "student")
    texts = [json.loads(line)["text"] for line in (kit / "data" / "prose" / "val.jsonl").read_text().splitlines()]
    rows = _word_rows(st, texts, 33)[:3]
    assert len(rows) == 3
    ids = torch.tensor(rows)
    side = Side(st)
    fam = pair_family(side, side, len(st), "self")
    assert fam.weights == (1.0, 0.0) and bool((fam.teacher_to_student == torch.arange(len(st))).all())
    client = TeacherClient(teacher_url)
    wrapper = CrossTokenizerTeacher(client, side, {}, [teacher_url], {"": Route(side, 1, 10_000)},
                                    [identity_family(len(st)), fam])
    try:
        out = wrapper.topk(ids, 8)
        today = client.topk(ids, 8)
    finally:
        wrapper.close()
    assert bool(out.xtok.compared.all()) and out.xtok.family.tolist() == [1, 1, 1]
    assert torch.equal(out.ids, today.ids) and torch.equal(out.logprobs, today.logprobs)
    # the per-student-token teacher loss is today's target_logprob (one group per token), the first excepted
    assert torch.allclose(out.target_logprob, today.target_logprob)
    model = AutoModelForCausalLM.from_pretrained(str(kit / "student"), use_safetensors=True)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    for loss_name in ("forward_kl", "jsd", "tvd"):
        model.zero_grad()
        a, pa = distill_loss(model(input_ids=inputs).logits, labels, today.ids, today.logprobs, 0.5, 2.0,
                             loss=loss_name)
        a.backward()
        g_a = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        b, pb = xtok_batch_loss(model(input_ids=inputs).logits, labels, out.ids, out.logprobs, out.xtok.compared,
                                out.xtok.family, out.xtok.families, 0.5, 2.0, loss=loss_name)
        b.backward()
        assert abs(float(a.detach()) - float(b.detach())) < 1e-5 and abs(float(pa["kl"]) - float(pb["kl"])) < 1e-5, loss_name
        for x, p in zip(g_a, model.parameters()):
            assert torch.allclose(x, p.grad, atol=1e-5, rtol=1e-4), loss_name


# ---------------------------------------------------------------------------------------------------------
# the real pair and routes, in-process against real servers

@pytest.fixture(scope="module")
def real_teacher(real_kit, tmp_path_factory):
    log = tmp_path_factory.mktemp("xtok-real-teacher") / "teacher.log"
    with service(["teacher", "serve", "--model", str(real_kit / "teacher"), "--backend", "hf"],
                 log_path=log) as (url, _):
        yield url


def _run(kit, out, run_id, teacher, *sets):
    import inproc

    return inproc.train(kit, out, run_id, teacher, None, "train.steps=2", "train.batch_size=2",
                        "data.seq_len=64", "mixture.interval_steps=2", "eval.sequences_per_domain=2",
                        "kd.top_k=8", "mixture.policy=fixed", *sets), inproc.lines(out)


def test_the_real_pair_trains_with_a_finite_loss(kit, real_kit, real_teacher, tmp_path):
    summary, records = _run(kit, tmp_path / "run", "xtok-real-pair", real_teacher)
    steps = [r for r in records if r["event"] == "step"]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) and r["kl"] > 0 for r in steps)
    evals = [r for r in records if r["event"] == "eval"]
    assert evals and all(math.isfinite(v) and v > 0 for v in evals[0]["teacher_loss"].values())
    # the teacher's per-student-token loss is the 135M teacher's: below the 2k student's on every domain
    assert all(evals[0]["teacher_loss"][d] < evals[0]["student_loss"][d] for d in evals[0]["student_loss"])
    # the run records its unit, and bits per byte beside it (the teacher's below the student's too)
    assert evals[0]["ratio_unit"] == "per_student_token"
    bpb = evals[0]["bits_per_byte"]
    assert set(bpb) == set(evals[0]["ratio"]) and all(0 < v["teacher"] < v["student"] for v in bpb.values())


def test_scored_bytes_are_the_bytes_of_the_scored_tokens_text(kit):
    from types import SimpleNamespace

    from ddk.trainer.xtok_teacher import Side, scored_bytes

    st = _tok(kit / "student")
    side = Side(st)
    texts = ["Hello, world! ☕", "café au lait"]
    rows = [st(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(r) for r in rows) + 2
    blocks = np.zeros((2, width), dtype=np.int64)  # padded with id 0 beyond each length
    for i, r in enumerate(rows):
        blocks[i, :len(r)] = r
    es = SimpleNamespace(blocks=blocks, lengths=np.array([len(r) for r in rows]), mask=None)
    lengths = np.array([len(b) if b else 0 for b in side.id_bytes])
    # by hand: the first token of each block is context, the rest is scored text
    expected = sum(len(t.encode()) - len(st.convert_tokens_to_string([st.convert_ids_to_tokens(r[0])]).encode())
                   for t, r in zip(texts, rows))
    assert scored_bytes(es, lengths) == expected


def test_a_route_to_a_teacher_of_another_family_beside_a_same_family_teacher(kit, real_teacher, teacher_url,
                                                                          tmp_path):
    import inproc

    before = inproc.topk_requests(real_teacher), inproc.topk_requests(teacher_url)
    summary, records = _run(kit, tmp_path / "run", "xtok-routes", teacher_url,
                            f"teacher.routes={{code: [{real_teacher}]}}")
    after = inproc.topk_requests(real_teacher), inproc.topk_requests(teacher_url)
    assert after[0] > before[0] and after[1] > before[1]  # both teachers were asked
    steps = [r for r in records if r["event"] == "step"]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)
    ev = [r for r in records if r["event"] == "eval"][0]
    assert set(ev["teacher_loss"]) == {"code", "legal", "math", "prose"}


# ---------------------------------------------------------------------------------------------------------
# the handshake

def test_cross_tokenizer_off_refuses_a_teacher_of_another_tokenizer(kit, real_teacher, tmp_path):
    import inproc

    from ddk.errors import UsageError
    from ddk.trainer.launch import prepare

    cfg = inproc.config(kit, tmp_path / "run", "xtok-off", real_teacher, None, "kd.cross_tokenizer=off",
                        "mixture.policy=fixed")
    with pytest.raises(UsageError, match=r"^teacher.urls: .*fingerprint.*kd.cross_tokenizer is off"):
        prepare(cfg)


def test_the_trainers_top_k_store_is_refused_with_a_teacher_of_another_tokenizer(kit, real_teacher, tmp_path):
    import inproc

    from ddk.errors import UsageError
    from ddk.trainer.launch import prepare

    cfg = inproc.config(kit, tmp_path / "run", "xtok-store", real_teacher, None, "mixture.policy=fixed",
                        f"cache.dir={tmp_path / 'store'}")
    with pytest.raises(UsageError, match=r"^cache.dir: not available with a teacher of another tokenizer"):
        prepare(cfg)


def test_a_teacher_tokenizer_that_cannot_round_trip_the_text_is_refused_naming_it(kit, tmp_path):
    import inproc

    from ddk.errors import UsageError
    from ddk.trainer.launch import prepare

    folder = tmp_path / "lower-teacher"
    shutil.copytree(kit / "teacher", folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Lowercase"}  # loses the capitals: "The" comes back as "the"
    spec["added_tokens"].append({"id": len(spec["model"]["vocab"]), "content": "<extra>", "single_word": False,
                                 "lstrip": False, "rstrip": False, "normalized": False, "special": True})
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with service(["teacher", "serve", "--model", str(folder), "--backend", "hf"],
                 log_path=tmp_path / "teacher.log") as (url, _):
        cfg = inproc.config(kit, tmp_path / "run", "xtok-lower", url, None, "mixture.policy=fixed")
        with pytest.raises(UsageError, match=r"^teacher.urls: the teacher's tokenizer cannot round-trip the text"):
            prepare(cfg)


def test_a_teacher_that_serves_no_tokenizer_is_refused_naming_it(kit, tmp_path):
    """A teacher whose folder has no tokenizer.json (so no offsets to align by): exit 2 naming teacher.urls."""
    import inproc

    from ddk.errors import UsageError
    from ddk.trainer.launch import prepare

    folder = tmp_path / "bare-teacher"
    shutil.copytree(kit / "teacher", folder)
    (folder / "tokenizer.json").unlink()
    with service(["teacher", "serve", "--model", str(folder), "--backend", "hf"],
                 log_path=tmp_path / "teacher.log") as (url, _):
        cfg = inproc.config(kit, tmp_path / "run", "xtok-bare", url, None, "mixture.policy=fixed")
        with pytest.raises(UsageError, match=r"^teacher.urls: the teacher's tokenizer differs .* serves none.*"
                                             r"tokenizer.json"):
            prepare(cfg)
