"""`ddk fixtures`: the corpus builder, the shared tokenizer, the finished kit, and the CLI.

Kit checks use the session `kit` fixture (the quick kit, built once and reused). Perplexities are
recomputed here from the kit's val.jsonl files with transformers' own loss, not with the builder's code.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import yaml

from ddk.errors import UsageError
from ddk.kit import corpus as corpus_mod
from ddk.kit import fixtures as fx
from ddk.kit.corpus import build_corpus, chunk, dedup, normalise, read_jsonl, select_and_split

REPO = Path(__file__).resolve().parents[2]
DDK = [sys.executable, "-m", "ddk.cli"]
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


def kit_docs(kit: Path, domain: str, split: str) -> list[str]:
    return read_jsonl(kit / "data" / domain / f"{split}.jsonl")


def paragraphs(doc: str) -> set[str]:
    return {normalise(p).lower() for p in doc.split("\n\n") if normalise(p)}


# ----------------------------------------------------------------------------- corpus builder

def test_chunk_keeps_all_text_within_the_size():
    rng = random.Random(1)
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    paras = ["\n".join(" ".join(rng.choices(words, k=rng.randint(3, 12))) for _ in range(rng.randint(1, 30)))
             for _ in range(40)]
    text = "\n\n\n".join(paras)
    chunks = chunk(text, 300)
    assert len(chunks) > 1
    assert all(len(c) <= 300 for c in chunks)
    assert normalise(" ".join(chunks)) == normalise(text)


def test_dedup_by_normalised_content_and_split_is_order_free():
    docs = [f"document number {i} " + "x" * 80 for i in range(50)]
    noisy = docs + ["  " + docs[3].replace(" ", "\n  ") + "\n", docs[7], "tiny"]
    kept = dedup(noisy)
    assert kept == docs  # whitespace variants, exact copies and tiny documents dropped

    train, val = select_and_split(kept, seed=0, max_chars=10**9, val_fraction=0.2)
    assert len(val) == 10 and len(train) == 40 and not set(train) & set(val)
    shuffled = kept[:]
    random.Random(5).shuffle(shuffled)
    assert select_and_split(shuffled, seed=0, max_chars=10**9, val_fraction=0.2) == (train, val)
    assert select_and_split(kept, seed=1, max_chars=10**9, val_fraction=0.2)[1] != val


def test_corpus_has_four_domains_disjoint_and_is_deterministic():
    small = dict(max_chars=20_000, val_fraction=0.2, doc_chars=1500)
    a = build_corpus(seed=0, **small)
    b = build_corpus(seed=0, **small)
    assert len(a.domains) >= 4 and set(corpus_mod.DOMAINS) <= set(a.domains)
    assert (a.train, a.val) == (b.train, b.val)  # the same seed gives the same corpus
    c = build_corpus(seed=1, **small)
    assert c.train["math"] != a.train["math"]

    for d in a.domains:
        train, val = a.train[d], a.val[d]
        assert train and val, d
        keys = [normalise(x) for x in train + val]
        assert len(set(keys)) == len(keys), f"{d}: duplicate documents"
        assert not {normalise(x) for x in train} & {normalise(x) for x in val}, d
        total = sum(map(len, train + val))  # the cap: reached, and overshot by less than one document
        assert total >= 20_000 and total - max(map(len, train + val)) < 20_000, d


def test_empty_domain_is_an_error_not_a_silent_gap():
    sources = {"good": lambda: [f"doc {i} " + "y" * 100 for i in range(10)], "empty": lambda: []}
    with pytest.raises(RuntimeError, match="empty"):
        build_corpus(seed=0, sources=sources)


def test_kit_corpus_train_val_disjoint_and_deduplicated(kit):
    info = json.loads((kit / "kit.json").read_text())
    assert len(info["domains"]) >= 4
    for d in info["domains"]:
        train, val = kit_docs(kit, d, "train"), kit_docs(kit, d, "val")
        assert train and val
        keys = [normalise(x) for x in train + val]
        assert len(set(keys)) == len(keys), f"{d}: duplicate documents in the kit"
        if d in ("prose", "legal"):  # boilerplate clauses and badges: each paragraph kept once
            train_paras = set().union(*map(paragraphs, train))
            shared = set().union(*map(paragraphs, val)) & train_paras
            assert not shared, f"{d}: validation paragraphs also in train: {sorted(shared)[:2]}"


def test_kit_math_is_reproducible_from_the_seed(kit):
    """Math is generated, so (unlike the files of installed packages) it must come out identical."""
    info = json.loads((kit / "kit.json").read_text())
    spec = fx.QUICK if info["quick"] else fx.DEFAULT
    docs = corpus_mod.math_documents(info["seed"], total_chars=int(spec.max_chars * 1.2) + spec.doc_chars,
                                     doc_chars=spec.doc_chars)
    train, val = select_and_split(docs, info["seed"], spec.max_chars, spec.val_fraction)
    assert (train, val) == (kit_docs(kit, "math", "train"), kit_docs(kit, "math", "val"))


# ----------------------------------------------------------------------------- tokenizer

SAMPLES = {
    "code": 'def f(x, *args, **kw):\n\t"""Doc — naïve ünïcode."""\n    return {k: v for k, v in kw.items()}  # ok\n',
    "prose": "Distillation  moves knowledge\nfrom a teacher to a student.  Ça marche? 是的 🙂\r\n\n",
    "math": "123 + 456 = 579\n(12 + 7) * 3 = 57\nWhat is 5 plus 6 minus 2? Answer: 9.",
}


def test_tokenizer_round_trip_and_shared_by_both_models(kit):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(kit / "tokenizer")
    info = json.loads((kit / "kit.json").read_text())
    texts = list(SAMPLES.values()) + [kit_docs(kit, d, "val")[0] for d in info["domains"]]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids and max(ids) < len(tok)
        assert tok.decode(ids) == text
    assert len(tok.encode(SAMPLES["math"], add_special_tokens=False)) < len(SAMPLES["math"])  # it merges

    files = sorted(p.name for p in (kit / "tokenizer").iterdir())
    assert "tokenizer.json" in files
    for model in ("teacher", "student"):
        for name in files:
            assert (kit / model / name).read_bytes() == (kit / "tokenizer" / name).read_bytes(), (model, name)
        assert json.loads((kit / model / "config.json").read_text())["vocab_size"] == len(tok)
    from ddk.fingerprint import tokenizer_fingerprint
    assert tokenizer_fingerprint(tok) == info["tokenizer_fingerprint"]


def test_tokenizer_training_is_deterministic(kit):
    """Retraining on the kit's own training text gives back the kit's vocabulary and merges."""
    info = json.loads((kit / "kit.json").read_text())
    texts = [doc for d in info["domains"] for doc in kit_docs(kit, d, "train")]
    spec = fx.QUICK if info["quick"] else fx.DEFAULT
    again = json.loads(fx.train_tokenizer(texts, spec.vocab_size).to_str())
    saved = json.loads((kit / "tokenizer" / "tokenizer.json").read_text())
    assert again["model"]["vocab"] == saved["model"]["vocab"]
    assert again["model"]["merges"] == saved["model"]["merges"]


# ----------------------------------------------------------------------------- the kit

def test_kit_files_are_safetensors_and_configs_point_inside(kit):
    for name in ("data.yaml", "train.yaml", "kit.json", "teacher/config.json", "teacher/model.safetensors",
                 "student/config.json", "student/model.safetensors", "tokenizer/tokenizer.json"):
        assert (kit / name).is_file(), name
    pickles = [p for p in kit.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    assert not pickles, f"pickle-format files in the kit: {pickles}"

    data = yaml.safe_load((kit / "data.yaml").read_text())
    assert [d["name"] for d in data["domains"]] == json.loads((kit / "kit.json").read_text())["domains"]
    for d in data["domains"]:
        for f in d["files"] + d.get("val_files", []):
            assert (kit / f).is_file(), f
    train = yaml.safe_load((kit / "train.yaml").read_text())
    assert (kit / train["student"]["model"] / "config.json").is_file()
    assert (kit / train["data"]["file"]).is_file()


def test_kit_json_is_written_last(kit):
    marker = (kit / "kit.json").stat().st_mtime
    newer = [p for p in kit.rglob("*") if p.is_file() and p.stat().st_mtime > marker
             and not p.relative_to(kit).parts[0].startswith(("teacher-", ".teacher-"))]  # specialists come later
    assert not newer, f"written after kit.json: {newer[:3]}"


@torch.no_grad()
def val_nats(model, tok, docs: list[str], seq_len: int, blocks: int) -> float:
    """Mean next-token loss over the first ``blocks`` windows of the EOS-joined validation stream."""
    ids: list[int] = []
    for doc in docs:
        ids += tok.encode(doc, add_special_tokens=False) + [tok.eos_token_id]
    n = min(blocks, len(ids) // seq_len)
    assert n >= 4, "validation set too small to measure"
    x = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    return model(input_ids=x, labels=x).loss.item()  # transformers shifts the labels itself


def test_teacher_beats_student_on_every_domain(kit):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = json.loads((kit / "kit.json").read_text())
    tok = AutoTokenizer.from_pretrained(kit / "tokenizer")
    models = {name: AutoModelForCausalLM.from_pretrained(kit / name, use_safetensors=True).eval()
              for name in ("teacher", "student")}
    assert all(type(m).__name__ == "LlamaForCausalLM" for m in models.values())
    n_params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    assert n_params["student"] < n_params["teacher"]

    seq_len, blocks = info["eval"]["seq_len"], info["eval"]["blocks_per_domain"]
    log_ratio = {}
    for d in info["domains"]:
        val = kit_docs(kit, d, "val")
        loss = {name: val_nats(m, tok, val, seq_len, blocks) for name, m in models.items()}
        assert math.exp(loss["teacher"]) < math.exp(loss["student"]), f"{d}: teacher not better: {loss}"
        log_ratio[d] = loss["student"] - loss["teacher"]
        # kit.json reports the same numbers (the table `ddk fixtures` prints is honest)
        assert loss["teacher"] == pytest.approx(info["teacher_loss"][d], rel=1e-3), d
        assert loss["student"] == pytest.approx(info["student_loss"][d], rel=1e-3), d
    gaps = sorted(log_ratio.values())
    assert gaps[-1] - gaps[0] > 0.1, f"teacher-student gaps are not unequal across domains: {log_ratio}"


def test_pretraining_is_deterministic():
    from transformers import LlamaForCausalLM

    size = fx.ModelSize(layers=1, hidden=32, heads=1, ffn=64, steps=3, lr=1e-2, batch_size=4)
    g = torch.Generator().manual_seed(0)
    tokens = {d: torch.randint(3, 64, (400,), generator=g) for d in ("a", "b")}
    states = []
    for _ in range(2):
        torch.manual_seed(7)
        model = LlamaForCausalLM(fx.llama_config(size, 64, 64))
        fx.pretrain(model, tokens, size, seq_len=16, seed=7, desc="test")
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


# ----------------------------------------------------------------------------- finished vs half-written

@pytest.fixture
def fake_build(monkeypatch):
    """Replace the expensive build by one that writes a tiny kit and counts its calls."""
    calls = []

    def build(root, spec, quick, seed):
        calls.append(root)
        root.mkdir(parents=True)
        (root / "teacher").mkdir()
        (root / "teacher" / "config.json").write_text("{}")
        fx.write_text(root / "kit.json", json.dumps({"format": fx.KIT_FORMAT, "quick": quick, "seed": seed,
                                                     "spec": asdict(spec)}))

    monkeypatch.setattr(fx, "_build", build)
    return calls


def test_half_written_kit_is_not_taken_as_finished(tmp_path, fake_build):
    out = tmp_path / "kit"
    (out / "teacher").mkdir(parents=True)  # a build killed before kit.json
    (out / "teacher" / "config.json").write_text("{}")
    assert fx.read_finished_kit(out) is None
    (out / "kit.json").write_text('{"format": ')  # torn marker
    assert fx.read_finished_kit(out) is None
    stale = tmp_path / "kit.tmp-99999"  # a killed build's scratch dir, complete but never renamed
    (stale / "teacher").mkdir(parents=True)
    (stale / "kit.json").write_text(json.dumps({"format": fx.KIT_FORMAT, "quick": True, "seed": 0}))

    assert fx.build_kit(out, quick=True) == out
    assert len(fake_build) == 1 and fake_build[0].name.startswith("kit.tmp-")
    assert fx.read_finished_kit(out)["quick"] is True
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["kit"]

    fx.build_kit(out, quick=True)  # finished: reused
    assert len(fake_build) == 1
    with pytest.raises(UsageError, match="quick"):
        fx.build_kit(out, quick=False)  # a different kit is not silently reused or replaced
    fx.build_kit(out, quick=True, force=True)
    assert len(fake_build) == 2


def test_kit_built_with_other_sizes_is_not_reused(tmp_path, fake_build, monkeypatch):
    out = tmp_path / "kit"
    fx.build_kit(out, quick=True)
    monkeypatch.setattr(fx, "QUICK", replace(fx.QUICK, student=replace(fx.QUICK.student, steps=1)))
    with pytest.raises(UsageError, match="other sizes"):
        fx.build_kit(out, quick=True)
    assert len(fake_build) == 1
    fx.build_kit(out, quick=True, force=True)
    assert len(fake_build) == 2 and fx.read_finished_kit(out)["spec"]["student"]["steps"] == 1


def test_failed_build_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    def broken(root, spec, quick, seed):
        root.mkdir(parents=True)
        (root / "kit.json").write_text("{}")
        raise RuntimeError("out of disk")

    monkeypatch.setattr(fx, "_build", broken)
    with pytest.raises(RuntimeError):
        fx.build_kit(tmp_path / "kit", quick=True)
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == []


def test_foreign_directory_is_refused(tmp_path, fake_build):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(UsageError, match="not a ddk kit"):
        fx.build_kit(tmp_path, quick=True)
    assert (tmp_path / "mine.txt").read_text() == "keep me" and not fake_build


# ----------------------------------------------------------------------------- CLI

def ddk(*args, timeout=120):
    return subprocess.run([*DDK, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_cli_help_and_bad_out(tmp_path):
    r = ddk("fixtures", "--help")
    assert r.returncode == 0 and "--out" in r.stdout and "--quick" in r.stdout and "--seed" in r.stdout

    afile = tmp_path / "a-file"
    afile.write_text("x")
    r = ddk("fixtures", "--out", str(afile), "--quick")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "--out" in r.stderr and "not a directory" in r.stderr
    assert afile.read_text() == "x"

    r = ddk("fixtures", "--quick")
    assert r.returncode == 2 and "--out" in r.stderr
    r = ddk("fixtures", "--out", str(tmp_path / "k"), "--seed", "many")
    assert r.returncode == 2 and "--seed" in r.stderr


def test_cli_reuses_a_finished_kit_without_rebuilding(kit):
    info = json.loads((kit / "kit.json").read_text())
    watched = [kit / "kit.json", kit / "teacher" / "model.safetensors", kit / "data" / "math" / "val.jsonl"]
    before = [(p.stat().st_mtime_ns, p.stat().st_ino) for p in watched]
    started = time.monotonic()
    r = ddk("fixtures", "--out", str(kit), *(["--quick"] if info["quick"] else []), "--seed", str(info["seed"]))
    took = time.monotonic() - started
    assert r.returncode == 0, r.stderr
    assert [(p.stat().st_mtime_ns, p.stat().st_ino) for p in watched] == before  # nothing rewritten
    assert "reusing" in r.stderr
    for d in info["domains"]:  # the ratio table is printed again from kit.json
        assert any(line.split()[:1] == [d] and f"{info['ratio'][d]:.3f}" in line for line in r.stdout.splitlines())
    assert took < 0.5 * max(info["build_seconds"], 60) + 30, f"reuse took {took:.0f}s"
