"""``ddk teacher serve``: the teacher app on uvicorn.

uvicorn runs in the main thread (it owns the signal handlers: SIGTERM/SIGINT stop it cleanly and
the lifespan closes the engine); the engine loads in a background thread meanwhile, so /healthz
answers 503 until the model is ready. If loading fails the server stops and the command exits 1.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from ddk.errors import UsageError

    from .app import create_app
    from .engines import choose_backend, load_engine

    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise UsageError(f"--model: {model} is not a Hugging Face model directory (no config.json)")
    max_top_k = getattr(args, "max_top_k", 64)
    max_batch_tokens = getattr(args, "max_batch_tokens", 16384)
    max_queue = getattr(args, "max_queue", 64)
    for name, value in (("--max-top-k", max_top_k), ("--max-batch-tokens", max_batch_tokens),
                        ("--max-queue", max_queue)):
        if value < 1:
            raise UsageError(f"{name}: must be at least 1, got {value}")
    gmu = getattr(args, "gpu_memory_utilization", None)
    if gmu is not None and not 0 < gmu <= 1:
        raise UsageError(f"--gpu-memory-utilization: must be in (0, 1], got {gmu}")
    backend = choose_backend(args.backend)
    log.info("teacher: model %s, backend %s (asked %s)", model, backend, args.backend)

    options = dict(dtype=getattr(args, "dtype", "auto"), max_top_k=max_top_k,
                   max_seq_len=getattr(args, "max_seq_len", None), gpu_memory_utilization=gmu,
                   enforce_eager=getattr(args, "enforce_eager", False), max_batch_tokens=max_batch_tokens)
    failure: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_load_error(e: BaseException) -> None:
        failure.append(e)
        if server is not None:
            server.should_exit = True

    app = create_app(lambda: load_engine(model, backend, **options), model_dir=model,
                     max_batch_tokens=max_batch_tokens, max_queue=max_queue,
                     max_body_bytes=getattr(args, "max_body_bytes", None), on_load_error=on_load_error)
    # Idle keep-alive connections stay open longer than the client keeps them (5 s, client.py), so
    # the client never reuses a connection the server is just closing.
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=5, timeout_keep_alive=30)
    server = uvicorn.Server(config)
    server.run()
    if failure:
        raise RuntimeError(f"teacher engine failed to load: {failure[0]}")
    return 0
