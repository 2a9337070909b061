"""Which blocks go into each batch: domains drawn by the current weights, blocks walked without replacement.

Two independent sources of order, both reproducible:

* the domain of each batch row comes from ``np.random.default_rng([seed, rank, step])`` -- a pure function of
  the step, so a resumed run (or a debugger) can recompute any step's domains from nothing;
* the block within a domain comes from a per-domain cursor walking a permutation of this rank's shard (block
  ``i`` belongs to rank ``i % world_size``) seeded by ``(seed, rank, domain, epoch)``. When the cursor reaches the
  end the domain is cycled: the next epoch's permutation starts (the paper cycles exhausted domains).

The cursors depend on the history of draws, so they are the state: ``state_dict()`` holds them (plain JSON
types) and ``load_state_dict()`` puts them back, after which ``draw(step, ...)`` returns exactly what the
uninterrupted run would have drawn. A domain with weight 0 is never drawn. Pure logic, no I/O.
"""

from __future__ import annotations

import hashlib

import numpy as np


def _domain_key(name: str) -> int:
    """A stable 32-bit integer for a domain name (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:4], "little")


class DomainSampler:
    """Draws ``(domain, block_index)`` pairs for one rank.

    ``domains`` maps each domain to its number of training blocks. The weights to draw with are the caller's
    (the teacher feed passes the mixture in force, ddk.trainer.mixture_sync); the sampler keeps none.
    """

    def __init__(self, domains: dict[str, int], seed: int, rank: int = 0, world_size: int = 1):
        if not domains:
            raise ValueError("domains: at least one domain is needed")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: must be in 0..{world_size - 1}, got {rank}")
        for name, n in domains.items():
            if int(n) <= 0:
                raise ValueError(f"domains: {name} has no training blocks")
        self.names = sorted(domains)  # a fixed order, whatever the dict order the caller used
        self.sizes = {name: int(domains[name]) for name in self.names}
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.cursors = {name: 0 for name in self.names}
        self.epochs = {name: 0 for name in self.names}
        self._perm_cache: dict[str, tuple[int, np.ndarray]] = {}

    # -- the shard and its permutations ---------------------------------------------------------------------

    def shard(self, name: str) -> np.ndarray:
        """This rank's blocks of ``name``: ``i % world_size == rank``; all blocks if the domain is too small."""
        idx = np.arange(self.rank, self.sizes[name], self.world_size, dtype=np.int64)
        return idx if len(idx) else np.arange(self.sizes[name], dtype=np.int64)

    def permutation(self, name: str, epoch: int) -> np.ndarray:
        cached = self._perm_cache.get(name)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, self.rank, _domain_key(name), epoch])
            shard = self.shard(name)
            cached = (epoch, shard[rng.permutation(len(shard))])
            self._perm_cache[name] = cached
        return cached[1]

    # -- drawing ---------------------------------------------------------------------------------------------

    def probabilities(self, weights: dict[str, float]) -> np.ndarray:
        unknown = set(weights) - set(self.names)
        if unknown:
            raise ValueError(f"weights: unknown domain {sorted(unknown)[0]!r}")
        w = np.array([float(weights.get(n, 0.0)) for n in self.names], dtype=np.float64)
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"weights: must be finite, >= 0 and not all 0, got {weights}")
        return w / w.sum()

    def draw(self, step: int, weights: dict[str, float], batch_size: int) -> list[tuple[str, int]]:
        """The batch of ``step``: ``batch_size`` pairs ``(domain, block_index)``; advances the cursors."""
        p = self.probabilities(weights)
        rng = np.random.default_rng([self.seed, self.rank, int(step)])
        picks = rng.choice(len(self.names), size=int(batch_size), p=p)
        batch = []
        for k in picks:
            name = self.names[int(k)]
            perm = self.permutation(name, self.epochs[name])
            batch.append((name, int(perm[self.cursors[name]])))
            self.cursors[name] += 1
            if self.cursors[name] == len(perm):  # exhausted: cycle with a fresh permutation
                self.cursors[name] = 0
                self.epochs[name] += 1
        return batch

    # -- state -----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "seed": self.seed, "rank": self.rank, "world_size": self.world_size, "sizes": dict(self.sizes),
            "cursors": dict(self.cursors), "epochs": dict(self.epochs),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the cursors. The domains, seed, rank and world size must match this sampler's (keys a sampler
        before 2026-12-06 also saved, ``tokens_drawn``, ``weights`` and ``weights_version``, are ignored)."""
        for key in ("seed", "rank", "world_size"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(f"sampler state: {key} {state[key]} != {getattr(self, key)}")
        if {k: int(v) for k, v in state["sizes"].items()} != self.sizes:
            raise ValueError(f"sampler state: domains/sizes {state['sizes']} != {self.sizes}")
        self.cursors = {n: int(state["cursors"][n]) for n in self.names}
        self.epochs = {n: int(state["epochs"][n]) for n in self.names}
        self._perm_cache.clear()
