"""ddk.data: the corpus, from files to packed token blocks, shared by the trainer and ``ddk teacher precompute``.

- :mod:`ddk.data.domains`: domain specs (data.yaml, a data folder, a train config's data section) and the
  streamed readers of every source format; :class:`~ddk.data.domains.TokenBlocks` /
  :class:`~ddk.data.domains.PackedDomain` (the cache read back, memory-mapped) and the cache key.
- :mod:`ddk.data.tokenizer`: the tokenizer loader (``tokenizer.json`` without transformers where it can), the
  student's tokenizer, and how a worker rebuilds a fast tokenizer.
- :mod:`ddk.data.executors`: where chunks are tokenised (this process, worker processes, Ray Data) and the
  pickle-free messages between them.
- :mod:`ddk.data.cache`: the resumable build of the token cache (``prepare_domains``, ``prepare_data``).
- :mod:`ddk.data.topk_manifest`: the manifest of a top-k store folder.

It imports no other ddk package (only the shared top-level modules ``ddk.errors`` and ``ddk.fingerprint``);
the commands that read a train config (``ddk data prepare|inspect``, ``ddk teacher precompute``) live in
:mod:`ddk.trainer`, beside the config's parser. See docs/data.md.
"""
