"""ddk: domain-aware knowledge distillation (DDK, Liu et al., NeurIPS 2024) as three services.

The code lives in the folder ``services/`` of the repository and imports as ``ddk``:

- ``ddk.teacher``: top-k log-probability server (vLLM or transformers) and its client.
- ``ddk.controller``: DDK domain-mixture math, run state in SQLite, HTTP API and client.
- ``ddk.data``: the corpus: domain specs and readers, the tokenizer loader, the token cache (streamed, parallel,
  resumable) and the top-k store's manifest; it imports no other ddk package.
- ``ddk.trainer``: the student: config, sampler, feed, loss, checkpoints, evaluation, the loop, the Ray launch;
  the jobs a train config drives (``ddk data prepare``, ``ddk teacher precompute``).
- ``ddk.kit``: the demo kit builder (``ddk fixtures``).
- ``ddk.experiments``: ``ddk demo`` and ``ddk compare``.
- ``ddk.vocab``, ``ddk.errors``, ``ddk.fingerprint``: small pure modules every service shares;
  ``ddk.launcher``: the one way to start and stop ddk processes; ``ddk.cli``: the command line.

Dependencies point one way: entry points (cli, servers) -> services -> pure core.
"""

__version__ = "0.1.0"
