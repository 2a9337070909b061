"""Unit tests of the trainer loop's pure parts: checkpoint files (through ddk.trainer.parallel.Distributed, one
process), train state, teacher feed, metrics resume, the mixture sync (controller retry), the worker job."""

from __future__ import annotations

import json
import shutil
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ddk.errors import UsageError
from ddk.trainer import checkpoint as ckpt
from ddk.trainer.feed import TeacherFeed
from ddk.trainer.metrics import kept_after_resume, summarize, truncate_metrics, read_metrics
from ddk.trainer.sampler import DomainSampler
from ddk.trainer.loop import LocalContext, TrainState, is_eval_step, window_end
from ddk.trainer.mixture_sync import MixtureSync, RetryPolicy
from ddk.trainer.parallel import Distributed
from ddk.trainer.optim import lr_lambda
from ddk.vocab import ratio


# ------------------------------------------------------------------------------------------------ checkpoint

def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _train(model, opt, sched, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, 4, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_flatten_roundtrip_keeps_types():
    state = {"a": 1, "b": [1.5, None, "x"], "t": (0.9, 0.95), "n": np.arange(6).reshape(2, 3),
             "m": {3: torch.ones(2), 7: {"k": torch.zeros(1, dtype=torch.int64)}}, "inf": float("inf"),
             "flag": True}
    skel, tensors = ckpt.flatten(state)
    json.dumps(skel)  # the skeleton is plain JSON
    back = ckpt.unflatten(json.loads(json.dumps(skel)), tensors)
    assert back["a"] == 1 and back["b"] == [1.5, None, "x"] and back["t"] == (0.9, 0.95)
    assert isinstance(back["n"], np.ndarray) and back["n"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert set(back["m"]) == {3, 7} and torch.equal(back["m"][3], torch.ones(2))
    assert back["m"][7]["k"].dtype == torch.int64
    assert back["inf"] == float("inf") and back["flag"] is True


def test_flatten_refuses_objects():
    with pytest.raises(TypeError):
        ckpt.flatten({"f": object()})


class Box:
    """A stateful entry holding a plain dict (what the Trainer registers: its state, the mixture, the sampler)."""

    def __init__(self, value=None):
        self.value = value

    def state_dict(self):
        return json.loads(json.dumps(self.value))

    def load_state_dict(self, state):
        self.value = state


def _ctx(rank=0, world=1, out=None):
    return SimpleNamespace(rank=rank, world_size=world, prepare_model=lambda m: m,
                           report=lambda *a: None) if out is None else LocalContext(out, keep=2)


def _distributed(model, opt, sched, rank=0, world=1, ctx=None, **entries):
    """A Distributed (DDP strategy, one process) over ``model`` with ``entries`` registered; ``sampler`` per rank."""
    d = Distributed("ddp", ctx or _ctx(rank, world))
    d.attach(model, opt, sched)
    for name, box in entries.items():
        d.register(name, box, per_rank=name == "sampler")
    return d


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    """AdamW + LR schedule saved at step 3 and restored continue exactly like the uninterrupted run."""
    def make(seed=0):
        m = _tiny_model(seed)
        o = torch.optim.AdamW(m.parameters(), lr=1e-2, betas=(0.9, 0.95), foreach=False)
        s = torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(2, 6))
        return m, o, s

    m1, o1, s1 = make()
    _train(m1, o1, s1, 3, seed=1)
    _distributed(m1, o1, s1, rank=0, world=2, trainer=Box({"step": 3, "teacher_loss": {"a": 1.0}}),
                 mixture=Box({"weights": {"a": 0.25, "b": 0.75}, "version": 2}),
                 sampler=Box({"cursors": {"a": 4}})).save(tmp_path, 3)
    _distributed(m1, o1, s1, rank=1, world=2, sampler=Box({"cursors": {"a": 9}})).save(tmp_path, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model.safetensors", "rank-0.json", "rank-0.safetensors", "rank-1.json", "rank-1.safetensors",
        "state.json", "state.safetensors"]
    _train(m1, o1, s1, 3, seed=2)

    m2, o2, s2 = make(seed=5)  # different init: everything must come from the checkpoint
    entries = {"trainer": Box(), "mixture": Box(), "sampler": Box()}
    shared = _distributed(m2, o2, s2, rank=1, world=2, **entries).load(tmp_path)
    assert shared["step"] == 3 and entries["mixture"].value == {"weights": {"a": 0.25, "b": 0.75}, "version": 2}
    assert entries["sampler"].value == {"cursors": {"a": 9}} and entries["trainer"].value["teacher_loss"] == {"a": 1.0}
    _train(m2, o2, s2, 3, seed=2)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=0, atol=0)
    assert s1.get_last_lr() == s2.get_last_lr()
    # the optimiser's state is stored by parameter name (any world size and strategy can map it back)
    shared, _ = ckpt.load_checkpoint(tmp_path, rank=0)
    assert sorted(shared["optimizer"]["state"]) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert shared["layout"] == ckpt.LAYOUT == 2 and shared["world_size"] == 2 and shared["strategy"] == "ddp"


def test_checkpoint_without_rank_file(tmp_path):
    m = _tiny_model()
    ckpt.save_checkpoint(tmp_path, rank=0, step=1, model=m.state_dict(), entries={"mixture": {"version": 0}})
    shared, own = ckpt.load_checkpoint(tmp_path, rank=3)
    assert own is None and shared["step"] == 1


def _save_two_ranks(d, step, m, o):
    for r in (0, 1):
        ckpt.save_checkpoint(d, rank=r, step=step, world_size=2, model=m.state_dict() if r == 0 else None,
                             rank_entries={"sampler": {"r": r}})


def test_latest_complete_skips_partial_checkpoints(tmp_path):
    """Discovery of a checkpoint Ray Train never registered: only folders with every part readable count."""
    m = _tiny_model()
    o = torch.optim.AdamW(m.parameters())
    assert ckpt.latest_complete(tmp_path / "missing") is None
    for step in (4, 8, 12, 16):
        _save_two_ranks(tmp_path / ckpt.checkpoint_name(step), step, m, o)
    (tmp_path / ckpt.checkpoint_name(16) / "rank-1.json").unlink()  # a rank's files never arrived
    half = tmp_path / ckpt.checkpoint_name(12) / "model.safetensors"
    half.write_bytes(half.read_bytes()[: half.stat().st_size // 2])  # copy cut short
    (tmp_path / "step-00000020").mkdir()  # empty
    assert ckpt.complete_step(tmp_path / ckpt.checkpoint_name(8)) == 8
    assert ckpt.complete_step(tmp_path / ckpt.checkpoint_name(12)) is None
    assert ckpt.latest_complete(tmp_path) == (8, tmp_path / ckpt.checkpoint_name(8))


def test_resume_point_prefers_the_newest_complete_checkpoint(tmp_path):
    m = _tiny_model()
    o = torch.optim.AdamW(m.parameters())
    assert ckpt.resume_point(None, tmp_path) is None  # fresh start
    for step in (4, 8):
        _save_two_ranks(tmp_path / ckpt.checkpoint_name(step), step, m, o)
    four, eight = tmp_path / ckpt.checkpoint_name(4), tmp_path / ckpt.checkpoint_name(8)
    assert ckpt.resume_point(eight, tmp_path) == (8, eight, True)  # Ray knows the latest
    assert ckpt.resume_point(four, tmp_path) == (8, eight, False)  # Ray lost step 8's registration
    assert ckpt.resume_point(four, None) == (4, four, True)  # storage not visible: Ray's choice
    assert ckpt.resume_point(None, tmp_path) == (8, eight, False)  # Ray lost every registration
    (four / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        ckpt.resume_point(four, None)


# ------------------------------------------------------------------------------------------------ train state

PENDING = {"step": 6, "student_loss": {"a": 2.5, "b": 3.0}, "teacher_loss": {"a": 1.5, "b": 2.0}}
SAMPLER = {"seed": 0, "rank": 0, "world_size": 1, "sizes": {"a": 10, "b": 4}, "cursors": {"a": 3, "b": 1},
           "epochs": {"a": 0, "b": 2}}


def _state() -> TrainState:
    return TrainState(step=7, teacher_loss={"a": 1.5, "b": 2.0})


def _mixture() -> MixtureSync:
    m = MixtureSync({"a": 0.25, "b": 0.75}, 3)
    m.submit(**PENDING)
    return m


def test_train_state_round_trip():
    state = _state()
    d = state.state_dict()
    json.loads(json.dumps(d))  # plain JSON values
    assert d == {"step": 7, "teacher_loss": {"a": 1.5, "b": 2.0}}
    back = TrainState()
    back.load_state_dict(json.loads(json.dumps(d)))
    assert back == state
    d["teacher_loss"]["a"] = 99  # a copy: the state does not change with the dict
    assert state.teacher_loss["a"] == 1.5
    fresh = TrainState()
    fresh.load_state_dict({"step": 2})  # the optional fields absent
    assert fresh == TrainState(step=2)


def test_mixture_sync_state_round_trip():
    """The mixture's one home: weights, version and the unposted evaluations, as plain JSON values."""
    m = _mixture()
    d = m.state_dict()
    assert json.loads(json.dumps(d)) == {"weights": {"a": 0.25, "b": 0.75}, "version": 3, "unposted": [PENDING]}
    back = MixtureSync({})
    back.load_state_dict(json.loads(json.dumps(d)))
    assert (back.weights, back.version, back.unposted) == ({"a": 0.25, "b": 0.75}, 3, [PENDING])
    d["unposted"][0]["step"] = 99  # a copy
    assert m.unposted[0]["step"] == 6
    assert back.adopt({"a": 0.5, "b": 0.5}, 3) is False and back.adopt({"a": 0.5, "b": 0.5}, 4) is True
    assert back.weights == {"a": 0.5, "b": 0.5} and back.version == 4


def test_train_state_through_checkpoint_files(tmp_path):
    """Distributed.save_and_report -> the context's newest checkpoint -> Distributed.load: the same entries
    (trainer state, mixture with its unposted evaluation, sampler), model and optimiser."""
    m = _tiny_model()
    o = torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=False)
    s = torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(2, 6))
    _train(m, o, s, 2, seed=1)
    ctx = LocalContext(tmp_path / "out", keep=2)
    state, mixture = _state(), _mixture()
    d = _distributed(m, o, s, ctx=ctx, trainer=state, mixture=mixture, sampler=Box(SAMPLER))
    d.save_and_report(7, {"step": 7, "loss": 1.25, "version": 3})
    m2 = _tiny_model(seed=9)
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2, foreach=False)
    s2 = torch.optim.lr_scheduler.LambdaLR(o2, lr_lambda(2, 6))
    back, back_mixture, back_sampler = TrainState(), MixtureSync({}), Box()
    with ctx.restored() as folder:
        assert folder == tmp_path / "out" / "checkpoints" / "step-00000007"
        _distributed(m2, o2, s2, ctx=ctx, trainer=back, mixture=back_mixture, sampler=back_sampler).load(folder)
    assert back == state and back_sampler.value == SAMPLER
    assert back_mixture.state_dict() == mixture.state_dict()
    for p1, p2 in zip(m.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=0, atol=0)
    assert s2.get_last_lr() == s.get_last_lr()
    for k, v in o.state_dict()["state"][0].items():
        torch.testing.assert_close(o2.state_dict()["state"][0][k], v, rtol=0, atol=0)
    # the files: the shared entries in the shared state, the sampler in the rank file
    shared, own = ckpt.load_checkpoint(folder, rank=0)
    assert shared["entries"] == {"trainer": {"step": 7, "teacher_loss": {"a": 1.5, "b": 2.0}},
                                 "mixture": {"weights": {"a": 0.25, "b": 0.75}, "version": 3, "unposted": [PENDING]}}
    assert own == {"step": 7, "entries": {"sampler": SAMPLER}}
    assert ckpt.complete_step(folder) == 7


def test_train_state_from_a_checkpoint_without_rank_file(tmp_path, caplog):
    """A rank the checkpoint has no file for (the world size grew): the shared entries load, its sampler keeps
    its fresh state, and the log says so."""
    m = _tiny_model()
    o = torch.optim.AdamW(m.parameters())
    _distributed(m, o, None, trainer=TrainState(step=4), mixture=MixtureSync({"a": 1.0}, 2),
                 sampler=Box({"cursors": 1})).save(tmp_path, 4)
    state, mixture, sampler = TrainState(), MixtureSync({}), Box("fresh")
    with caplog.at_level("WARNING", logger="ddk.trainer"):
        m1 = _tiny_model(1)
        _distributed(m1, torch.optim.AdamW(m1.parameters()), None, rank=1, world=2,
                     trainer=state, mixture=mixture, sampler=sampler).load(tmp_path)
    assert state == TrainState(step=4) and (mixture.weights, mixture.version, mixture.unposted) == ({"a": 1.0}, 2, [])
    assert sampler.value == "fresh" and "has no sampler state" in caplog.text


def _layout1(d, m, o, s, *, strategy=None, pending=PENDING):
    """A checkpoint as the trainer wrote it before 2026-12-06 (layout 1: mixture and pending in the shared
    state, the optimiser by index, the sampler in rank-0)."""
    ckpt.save_model(d, m)
    ckpt.save_state(d, {"step": 7, "world_size": 1, "weights": {"a": 0.25, "b": 0.75}, "version": 3,
                        "optimizer": o.state_dict(), "scheduler": s.state_dict(), "torch_rng": torch.get_rng_state(),
                        **({"strategy": strategy} if strategy else {}),
                        "extra": {"teacher_loss": {"a": 1.5, "b": 2.0}, "pending": pending, "tokens": {"a": 64.0}}})
    ckpt.save_state(d, {"step": 7, "sampler": {**SAMPLER, "tokens_drawn": {"a": 3, "b": 1}, "weights": None,
                                               "weights_version": None}}, name="rank-0")


def test_a_checkpoint_of_the_old_layout_resumes(tmp_path):
    m = _tiny_model()
    o = torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=False)
    s = torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(2, 6))
    _train(m, o, s, 2, seed=1)
    _layout1(tmp_path, m, o, s, pending=[PENDING, {**PENDING, "step": 7}])
    assert ckpt.complete_step(tmp_path) == 7
    m2 = _tiny_model(seed=9)
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2, foreach=False)
    s2 = torch.optim.lr_scheduler.LambdaLR(o2, lr_lambda(2, 6))
    state, mixture, sampler = TrainState(), MixtureSync({}), DomainSampler({"a": 10, "b": 4}, seed=0)
    _distributed(m2, o2, s2, trainer=state, mixture=mixture, sampler=sampler).load(tmp_path)
    assert state == TrainState(step=7, teacher_loss={"a": 1.5, "b": 2.0}, tokens={"a": 64.0})
    assert mixture.state_dict() == {"weights": {"a": 0.25, "b": 0.75}, "version": 3,
                                    "unposted": [PENDING, {**PENDING, "step": 7}]}
    assert sampler.state_dict() == SAMPLER  # the dead keys of the old sampler state are dropped
    for p1, p2 in zip(m.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=0, atol=0)
    for k, v in o.state_dict()["state"][3].items():
        torch.testing.assert_close(o2.state_dict()["state"][3][k], v, rtol=0, atol=0)
    assert s2.get_last_lr() == s.get_last_lr()
    # one pending evaluation (not a list) is read as one unposted evaluation
    _layout1(tmp_path, m, o, s)
    _distributed(m2, o2, s2, mixture=mixture).load(tmp_path)
    assert mixture.unposted == [PENDING]


def test_an_old_sharded_checkpoint_is_refused_with_a_usage_error(tmp_path):
    m = _tiny_model()
    o = torch.optim.AdamW(m.parameters())
    _layout1(tmp_path, m, o, torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(2, 6)), strategy="fsdp")
    assert ckpt.complete_step(tmp_path) == 7  # found, so that resuming it says why it cannot
    with pytest.raises(UsageError, match=r"fsdp checkpoint of the per-rank shard format .* cannot be resumed") as e:
        _distributed(m, o, None).load(tmp_path)
    assert str(e.value).startswith(str(tmp_path))  # names the folder
    # the driver says so before Ray starts (ddk train: exit 2), reading the state.json files only
    storage = tmp_path / "storage"
    (storage / "step-00000004").mkdir(parents=True)  # no readable state.json: skipped
    ckpt.check_resumable(storage)
    ckpt.check_resumable(tmp_path / "missing")
    shutil.copytree(tmp_path, storage / "step-00000007", ignore=shutil.ignore_patterns("storage"))
    with pytest.raises(UsageError, match=r"step-00000007: a train.strategy=fsdp checkpoint"):
        ckpt.check_resumable(storage)
    (storage / "step-00000008").mkdir()
    _layout1(storage / "step-00000008", m, o, torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(2, 6)))
    ckpt.check_resumable(storage)  # the newest is a DDP one of the old layout: it resumes


# ------------------------------------------------------------------------------------------------ feed

class FakeTeacher:
    """Answers topk with recognisable tensors; optional latency; counts calls."""

    def __init__(self, delay=0.0, fail_at=None):
        self.delay, self.fail_at, self.calls = delay, fail_at, 0
        self.lock = threading.Lock()

    def topk(self, ids, top_k):
        with self.lock:
            self.calls += 1
            n = self.calls
        if self.fail_at is not None and n >= self.fail_at:
            raise RuntimeError("teacher down")
        time.sleep(self.delay)
        B, L = ids.shape
        return SimpleNamespace(ids=ids[:, 1:, None].repeat(1, 1, top_k), logprobs=torch.zeros(B, L - 1, top_k),
                               target_logprob=torch.zeros(B, L - 1))


SIZES = {"a": 50, "b": 30, "c": 20}


def _blocks(rows):
    return np.array([[hash(d) % 97, i, i + 1] for d, i in rows], dtype=np.int32)


def test_feed_matches_sampler_and_teacher_pairs():
    sampler = DomainSampler(SIZES, seed=3)
    ref = DomainSampler(SIZES, seed=3)
    w = {"a": 0.2, "b": 0.5, "c": 0.3}
    teacher = FakeTeacher()
    feed = TeacherFeed(sampler, _blocks, batch_size=4, teacher=teacher, top_k=2, depth=2, mixture=MixtureSync(w, 1))
    feed.schedule(0, 5)
    for step in range(5):
        batch, waited = feed.next(step)
        assert batch.step == step and waited >= 0
        assert batch.rows == ref.draw(step, w, 4)
        # the teacher output belongs to this batch's ids
        assert torch.equal(batch.teacher.ids[:, :, 0], batch.input_ids[:, 1:])
    assert feed.window is None and teacher.calls == 5
    assert feed.state_dict()["cursors"] == ref.state_dict()["cursors"]
    with pytest.raises(RuntimeError):
        feed.next(5)  # outside any window: nothing is prefetched past the boundary


def test_feed_never_prefetches_past_window_or_depth():
    teacher = FakeTeacher()
    feed = TeacherFeed(DomainSampler(SIZES, seed=0), _blocks, batch_size=2, teacher=teacher, top_k=1, depth=2,
                       mixture=MixtureSync({"a": 1.0, "b": 1.0, "c": 1.0}))
    feed.schedule(0, 4)
    time.sleep(0.5)
    assert teacher.calls == 3  # 2 queued + 1 waiting to be queued, never more
    for s in range(4):
        feed.next(s)
    time.sleep(0.2)
    assert teacher.calls == 4  # the window ended at 4


def test_feed_cancel_rewinds_sampler_so_new_weights_apply_cleanly():
    """Batches prefetched under old weights are dropped; the rest equals drawing with the new weights (read from
    the mixture sync when the window is scheduled)."""
    w_old, w_new = {"a": 1.0, "b": 0.0, "c": 0.0}, {"a": 0.0, "b": 0.0, "c": 1.0}
    mixture = MixtureSync(w_old, 1)
    feed = TeacherFeed(DomainSampler(SIZES, seed=1), _blocks, batch_size=3, teacher=FakeTeacher(), top_k=1,
                       mixture=mixture)
    feed.schedule(0, 8)
    got = [feed.next(s)[0] for s in range(2)]
    time.sleep(0.2)  # let it prefetch steps 2.. under the old weights
    assert mixture.adopt(w_new, 2)  # what the loop does when the version changes: cancel, then schedule anew
    feed.cancel()
    assert not feed.covers(2)
    feed.schedule(2, 8)
    got += [feed.next(s)[0] for s in range(2, 8)]
    ref = DomainSampler(SIZES, seed=1)
    expect = [ref.draw(s, w_old if s < 2 else w_new, 3) for s in range(8)]
    assert [b.rows for b in got] == expect
    assert {d for b in got[:2] for d, _ in b.rows} == {"a"}  # each batch drawn under its step's weights
    assert {d for b in got[2:] for d, _ in b.rows} == {"c"}
    assert feed.state_dict()["cursors"] == ref.state_dict()["cursors"]


def test_feed_overlaps_teacher_latency():
    """With a teacher as fast as the step, the loop waits for about one request, not one per step."""
    delay, steps = 0.1, 8
    feed = TeacherFeed(DomainSampler(SIZES, seed=0), _blocks, batch_size=2, teacher=FakeTeacher(delay), top_k=1,
                       mixture=MixtureSync({"a": 1.0, "b": 1.0, "c": 1.0}))
    feed.schedule(0, steps)
    waited = 0.0
    for s in range(steps):
        _, w = feed.next(s)
        waited += w
        time.sleep(delay * 1.2)  # the student's step
    assert waited < 0.5 * steps * delay, waited


def test_feed_without_teacher_makes_no_calls_and_raises_producer_errors():
    feed = TeacherFeed(DomainSampler(SIZES, seed=0), _blocks, batch_size=2, teacher=None,
                       mixture=MixtureSync({"a": 1.0}))
    feed.schedule(0, 3)
    assert all(feed.next(s)[0].teacher is None for s in range(3))
    bad = TeacherFeed(DomainSampler(SIZES, seed=0), _blocks, batch_size=2, teacher=FakeTeacher(fail_at=2), top_k=1,
                      mixture=MixtureSync({"a": 1.0}))
    bad.schedule(0, 5)
    bad.next(0)
    with pytest.raises(RuntimeError, match="teacher down"):
        bad.next(1)
    bad.close()


# ------------------------------------------------------------------------------------------------ loop pieces

def test_schedule_helpers():
    assert [s for s in range(11) if is_eval_step(s, 4, 10)] == [0, 4, 8, 10]
    assert window_end(0, 4, 10) == 4 and window_end(5, 4, 10) == 8 and window_end(9, 4, 10) == 10
    f = lr_lambda(2, 10, floor=0.1)
    assert f(0) == pytest.approx(0.5) and f(1) == pytest.approx(1.0) and f(2) == pytest.approx(1.0)
    assert f(10) == pytest.approx(0.1) and f(6) == pytest.approx(0.55)


def _records():
    rows = [{"event": "eval", "step": 0}]
    for s in range(1, 9):
        rows.append({"event": "step", "step": s})
        if s % 4 == 0:
            rows.append({"event": "eval", "step": s})
    rows.append({"event": "end", "step": 8})
    return rows


def test_metrics_kept_after_resume(tmp_path):
    recs = _records()
    assert kept_after_resume(recs, None) == []
    kept = kept_after_resume(recs, 4)  # the eval at 4 comes after checkpoint 4: redone
    assert [(r["event"], r["step"]) for r in kept] == [("eval", 0)] + [("step", s) for s in range(1, 5)]
    kept = kept_after_resume(recs, 6)
    assert kept[-1] == {"event": "step", "step": 6} and {"event": "eval", "step": 4} in kept
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"torn')
    assert truncate_metrics(p, 6) == len(kept) and read_metrics(p) == kept


def test_ratios_and_summary():
    q = ratio({"a": 2.0, "b": 1.0}, {"a": 1.0, "b": 1.0})
    assert q["a"] == pytest.approx(np.e) and q["b"] == pytest.approx(1.0)
    recs = [{"event": "eval", "step": 0, "student_loss": {"a": 3.0}, "teacher_loss": {"a": 1.0},
             "ratio": {"a": 7.0}, "version": 1, "weights": {"a": 1.0}},
            {"event": "step", "step": 1, "loss": 2.5, "tokens": 100, "teacher_wait_s": 0.5, "step_s": 2.0,
             "version": 1, "weights": {"a": 1.0}},
            {"event": "eval", "step": 1, "student_loss": {"a": 2.0}, "teacher_loss": {"a": 1.0},
             "ratio": {"a": 2.7}, "version": 2, "weights": {"a": 1.0}}]
    s = summarize(recs)
    assert s["domains"]["a"]["student_loss_start"] == 3.0 and s["domains"]["a"]["student_loss_end"] == 2.0
    assert s["version"] == 2 and s["tokens_per_s"] == 50.0 and s["teacher_wait_s"] == 0.5


class FakeControllerClient:
    def __init__(self, fail=0):
        self.fail, self.posts = fail, []

    def post_evaluation(self, run_id, step, student_loss, teacher_loss=None, tokens=None, diagnostics=None):
        from ddk.controller.client import ControllerUnavailable

        self.posts.append(step)
        if self.fail:
            self.fail -= 1
            raise ControllerUnavailable("down")
        return {"version": len(self.posts), "step": step, "weights": {"a": 0.9, "b": 0.1}}


def test_controller_keeps_weights_and_retries_with_growing_gaps():
    c = MixtureSync({"a": 0.5, "b": 0.5}, 0, client=FakeControllerClient(fail=3))
    c.submit(4, {"a": 1.0, "b": 1.0}, None)
    attempts = []
    for step in range(4, 20):
        n = len(c.client.posts)
        answer = c.try_post(step)
        if len(c.client.posts) > n:
            attempts.append(step)
        if answer is not None:
            break
    assert attempts == [4, 5, 7, 11]  # gaps 1, 2, 4; the fourth try gets through
    assert step == 11 and c.version == 4 and c.weights == {"a": 0.9, "b": 0.1} and c.unposted == []


def test_retry_gaps_grow_to_the_policys_cap():
    policy = RetryPolicy()
    gaps = [1]
    for _ in range(7):
        gaps.append(policy.next_gap(gaps[-1]))
    assert gaps == [1, 2, 4, 8, 16, 32, 32, 32] and policy.end_deadline_s == 60.0


def test_an_outage_across_boundaries_posts_every_interval_in_order():
    """Found by bench/chaos.py: evaluations of steps 8 and 12 both made while the controller is down are both
    posted, oldest first, once it is back (the newer one used to replace the older: a gap in the history)."""
    c = MixtureSync({"a": 0.5, "b": 0.5}, 0, client=FakeControllerClient(fail=2))
    c.submit(8, {"a": 1.0, "b": 1.0}, None)
    assert c.try_post(8) is None                 # down
    c.submit(12, {"a": 0.9, "b": 1.0}, None)
    assert c.try_post(12) is None                # still down: 8 waits first, 12 behind it
    assert [p["step"] for p in c.unposted] == [8, 12]
    answer = c.try_post(40)
    assert c.client.posts == [8, 8, 8, 12]       # two failed tries of 8, then 8 and 12 in order
    assert answer["step"] == 12 and c.version == 4 and c.unposted == []


def test_the_end_of_a_run_keeps_posting_its_last_evaluation(monkeypatch):
    """Found by bench/chaos.py: the controller away at the last boundary used to leave the run's last interval out
    of its history; the end of fit() now retries for a bounded time (here the third try gets through)."""
    from ddk.trainer import loop, mixture_sync

    monkeypatch.setattr(mixture_sync.time, "sleep", lambda s: None)
    c = MixtureSync({"a": 0.5, "b": 0.5}, 0, client=FakeControllerClient(fail=2))
    c.submit(60, {"a": 1.0, "b": 1.0}, None)
    written = []
    t = SimpleNamespace(mixture=c, state=TrainState(step=60), writer=SimpleNamespace(write=written.append))
    loop.Trainer._post_last_evaluation(t)
    assert c.client.posts == [60, 60, 60] and c.unposted == []
    assert c.version == 3 and written[-1]["event"] == "weights" and written[-1]["eval_step"] == 60
    # a controller that never comes back: given up after the policy's end_deadline_s, the run goes on to its export
    c2 = MixtureSync({"a": 0.5, "b": 0.5}, 0, client=FakeControllerClient(fail=10**9))
    c2.submit(60, {"a": 1.0, "b": 1.0}, None)
    clock = iter(range(0, 10**6, 7))
    monkeypatch.setattr(mixture_sync.time, "monotonic", lambda: float(next(clock)))
    t2 = SimpleNamespace(mixture=c2, state=TrainState(step=60), writer=SimpleNamespace(write=written.append))
    loop.Trainer._post_last_evaluation(t2)
    assert c2.unposted != [] and 3 <= len(c2.client.posts) <= 12


def _client_with_conflicts(resolve: bool):
    """A real ControllerClient whose transport answers every evaluation with 409 (the step is recorded)."""
    import httpx

    from ddk.controller.client import ControllerClient

    def answer(request):
        if request.method == "POST":
            return httpx.Response(409, json={"detail": "step: 0 is not after the last recorded step 4"})
        if request.url.path.endswith("/history"):
            return httpx.Response(200, json={"versions": [
                {"version": 0, "step": None, "weights": {"a": 0.5, "b": 0.5}, "created_at": "t0"},
                {"version": 1, "step": 0, "weights": {"a": 0.3, "b": 0.7}, "created_at": "t1"},
                {"version": 2, "step": 4, "weights": {"a": 0.6, "b": 0.4}, "created_at": "t2"}]})
        return httpx.Response(200, json={"version": 2, "step": 4, "weights": {"a": 0.6, "b": 0.4}})

    client = ControllerClient("http://controller.invalid", max_retries=0, resolve_conflicts=resolve)
    client._http = httpx.Client(base_url=client.url, transport=httpx.MockTransport(answer))
    return client


def test_controller_409_takes_the_recorded_version():
    """The one place a 409 is handled: the trainer's client answers with the version recorded for the step."""
    from ddk.controller.client import ControllerError

    c = MixtureSync({"a": 0.5, "b": 0.5}, 0, client=_client_with_conflicts(resolve=True))
    c.submit(0, {"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 1.0})
    ans = c.try_post(0)
    assert ans["version"] == 1 and c.weights == {"a": 0.3, "b": 0.7} and c.version == 1 and c.unposted == []
    c.submit(2, {"a": 1.0, "b": 1.0}, None)  # no version has step 2: the controller's current weights
    assert c.try_post(2)["version"] == 2 and c.weights == {"a": 0.6, "b": 0.4}
    with pytest.raises(ControllerError) as e:  # any other client: a first-attempt 409 is the caller's
        _client_with_conflicts(resolve=False).post_evaluation("r", 0, {"a": 1.0, "b": 1.0})
    assert e.value.status == 409


def test_controller_absent_keeps_fixed_weights():
    c = MixtureSync({"a": 0.25, "b": 0.75}, 0)
    c.submit(0, {"a": 1.0, "b": 1.0}, None)
    assert c.try_post(0) == {"version": 0, "step": 0, "weights": {"a": 0.25, "b": 0.75}}


def test_check_teacher_refuses_mismatch():
    from ddk.trainer.launch import check_teacher

    cfg = SimpleNamespace(kd=SimpleNamespace(gamma=0.2, top_k=8), data=SimpleNamespace(seq_len=64))
    info = {"tokenizer_fingerprint": "abc", "max_top_k": 16, "max_seq_len": 128, "vocab_size": 100}
    check_teacher(info, "abc", cfg, 100)
    with pytest.raises(UsageError, match="teacher.urls"):
        check_teacher(info, "abd", cfg, 100)
    with pytest.raises(UsageError, match="kd.top_k"):
        check_teacher({**info, "max_top_k": 4}, "abc", cfg, 100)
    with pytest.raises(UsageError, match="data.seq_len"):
        check_teacher({**info, "max_seq_len": 64}, "abc", cfg, 100)
    with pytest.raises(UsageError, match="student.model"):
        check_teacher(info, "abc", cfg, 90)


# ------------------------------------------------------------------------------------------------ the worker job

def _job_config(**changes):
    raw = {"run_id": "job-1", "student": {"model": "/tmp/student"}, "data": {"file": "/tmp/data.yaml"},
           "train": {"steps": 4}, "kd": {"gamma": 0}, "mixture": {"policy": "fixed"}, "output_dir": "/tmp/out"}
    raw.update(changes)
    return raw


def test_train_job_crosses_as_plain_data_and_validates_again():
    from pydantic import ValidationError

    from ddk.trainer.config import TrainJob, validate_config

    job = TrainJob(config=validate_config(_job_config()), initial_weights={"a": 0.5, "b": 0.5},
                   teacher_loss={"a": 1.0, "b": 2.0}, controller_token="t", fault_at_steps=[6, 10])
    plain = job.model_dump(mode="json")
    assert json.loads(json.dumps(plain)) == plain
    assert plain["config"]["run_id"] == "job-1" and plain["fault_at_steps"] == [6, 10]
    assert plain["initial_version"] == 0 and plain["log_level"] == "INFO"
    back = TrainJob.model_validate(plain)
    assert back == job and back.config.cpt is True
    with pytest.raises(ValidationError):
        TrainJob.model_validate({**plain, "extra_key": 1})
    with pytest.raises(ValidationError):
        TrainJob.model_validate({**plain, "config": {**plain["config"], "train": {"steps": 0}}})
    with pytest.raises(ValidationError, match="output_dir"):
        TrainJob.model_validate({**plain, "config": {**plain["config"], "output_dir": None}})


def test_fault_steps_from_the_environment_value():
    from ddk.trainer.config import parse_fault_steps

    assert parse_fault_steps("6,10") == [6, 10] and parse_fault_steps(" 10, 6 ,") == [6, 10]
    assert parse_fault_steps("") == [] and parse_fault_steps(None) == []
    with pytest.raises(UsageError, match="DDK_FAULT_AT_STEPS"):
        parse_fault_steps("6,x")
