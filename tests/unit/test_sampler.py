"""DomainSampler: reproducible draws, resumable state, frequencies that follow the weights, cycling."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from ddk.trainer.sampler import DomainSampler

SIZES = {"code": 40, "prose": 25, "math": 7}


def run(sampler, steps, weights, batch_size=8, start=0):
    return [sampler.draw(step, weights, batch_size) for step in range(start, start + steps)]


def test_same_seed_rank_step_same_draw():
    w = {"code": 0.5, "prose": 0.3, "math": 0.2}
    a = run(DomainSampler(SIZES, seed=3, rank=0, world_size=2), 20, w)
    b = run(DomainSampler(dict(reversed(list(SIZES.items()))), seed=3, rank=0, world_size=2), 20, w)
    assert a == b  # dict order of the domains does not matter
    c = run(DomainSampler(SIZES, seed=4, rank=0, world_size=2), 20, w)
    d = run(DomainSampler(SIZES, seed=3, rank=1, world_size=2), 20, w)
    assert a != c and a != d


def test_domains_of_a_step_do_not_depend_on_history():
    w = {"code": 0.4, "prose": 0.4, "math": 0.2}
    fresh = DomainSampler(SIZES, seed=1, rank=0)
    used = DomainSampler(SIZES, seed=1, rank=0)
    run(used, 13, w)
    assert [d for d, _ in fresh.draw(99, w, 16)] == [d for d, _ in used.draw(99, w, 16)]


def test_resume_from_state_reproduces_the_uninterrupted_run():
    weights = [{"code": 0.6, "prose": 0.3, "math": 0.1}, {"code": 0.1, "prose": 0.2, "math": 0.7}]
    full = DomainSampler(SIZES, seed=7, rank=1, world_size=2)
    expected = [full.draw(s, weights[s // 20], 8) for s in range(40)]

    first = DomainSampler(SIZES, seed=7, rank=1, world_size=2)
    got = [first.draw(s, weights[s // 20], 8) for s in range(23)]
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON types
    assert set(state) == {"seed", "rank", "world_size", "sizes", "cursors", "epochs"}  # no weights: not its state
    resumed = DomainSampler(SIZES, seed=7, rank=1, world_size=2)
    resumed.load_state_dict(state)
    got += [resumed.draw(s, weights[s // 20], 8) for s in range(23, 40)]
    assert got == expected
    assert resumed.state_dict() == full.state_dict()
    # every draw advanced one cursor: cursor + epoch * shard size sums to the rows drawn
    assert sum(full.cursors[d] + full.epochs[d] * len(full.shard(d)) for d in SIZES) == 40 * 8


def test_state_must_match_the_sampler():
    s = DomainSampler(SIZES, seed=0, rank=0)
    state = s.state_dict()
    with pytest.raises(ValueError):
        DomainSampler(SIZES, seed=1, rank=0).load_state_dict(state)
    with pytest.raises(ValueError):
        DomainSampler({**SIZES, "math": 8}, seed=0, rank=0).load_state_dict(state)


def test_frequencies_follow_weights():
    w = {"code": 0.5, "prose": 0.35, "math": 0.15}
    sampler = DomainSampler(SIZES, seed=0, rank=0)
    counts = Counter(d for batch in run(sampler, 500, w, batch_size=8) for d, _ in batch)
    n = 500 * 8
    chi2 = sum((counts[d] - n * p) ** 2 / (n * p) for d, p in w.items())
    assert chi2 < 13.8  # chi-square, 2 degrees of freedom, p = 0.001
    # and the cursors agree: each domain's walk advanced once per row drawn from it
    assert {d: sampler.cursors[d] + sampler.epochs[d] * len(sampler.shard(d)) for d in SIZES} == \
        {d: counts[d] for d in SIZES}


def test_unnormalised_weights_are_normalised():
    a = run(DomainSampler(SIZES, seed=2, rank=0), 5, {"code": 2, "prose": 1, "math": 1})
    b = run(DomainSampler(SIZES, seed=2, rank=0), 5, {"code": 0.5, "prose": 0.25, "math": 0.25})
    assert a == b


def test_weight_zero_never_drawn():
    sampler = DomainSampler(SIZES, seed=0, rank=0)
    draws = run(sampler, 300, {"code": 0.0, "prose": 0.999, "math": 0.001}, batch_size=4)
    assert all(d != "code" for batch in draws for d, _ in batch)
    draws = run(sampler, 50, {"prose": 1.0}, batch_size=4, start=300)  # absent = 0
    assert {d for batch in draws for d, _ in batch} == {"prose"}


@pytest.mark.parametrize("bad", [{"code": -1.0, "prose": 1.0}, {"code": 0.0}, {"nope": 1.0},
                                 {"code": float("nan")}])
def test_bad_weights_rejected(bad):
    with pytest.raises(ValueError):
        DomainSampler(SIZES, seed=0, rank=0).draw(0, bad, 4)


def test_cycling_walks_each_shard_block_once_per_epoch():
    world = 3
    seen_by_rank = {}
    for rank in range(world):
        sampler = DomainSampler({"math": 7, "code": 40}, seed=5, rank=rank, world_size=world)
        shard = [i for i in range(7) if i % world == rank]
        blocks = [b for batch in run(sampler, 4 * len(shard), {"math": 1.0}, batch_size=1) for _, b in batch]
        epochs = [blocks[i:i + len(shard)] for i in range(0, len(blocks), len(shard))]
        for epoch in epochs:  # every epoch is a permutation of the rank's shard
            assert sorted(epoch) == shard
        if len(shard) > 1:
            assert len({tuple(e) for e in epochs}) > 1  # reshuffled between epochs
        assert sampler.epochs["math"] == 4 and sampler.cursors["math"] == 0
        seen_by_rank[rank] = set(blocks)
    # shards are disjoint and cover the domain
    assert set().union(*seen_by_rank.values()) == set(range(7))
    assert sum(len(s) for s in seen_by_rank.values()) == 7


def test_tiny_domain_smaller_than_world_uses_all_blocks():
    sampler = DomainSampler({"tiny": 2}, seed=0, rank=3, world_size=4)
    blocks = {b for batch in run(sampler, 6, {"tiny": 1.0}, batch_size=1) for _, b in batch}
    assert blocks == {0, 1}


def test_block_indices_in_range():
    sampler = DomainSampler(SIZES, seed=9, rank=0)
    for batch in run(sampler, 100, {"code": 1, "prose": 1, "math": 1}):
        for d, b in batch:
            assert 0 <= b < SIZES[d] and isinstance(b, int)
    assert np.isscalar(b)
