"""``ddk teacher serve``: the teacher app on uvicorn.

uvicorn runs in the main thread (it owns the signal handlers: SIGTERM/SIGINT stop it cleanly and
the lifespan closes the engine); the engine loads in a background thread meanwhile, so /healthz
answers 503 until the model is ready. If loading fails the server stops and the command exits 1.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ddk.tokenfile import read_token

log = logging.getLogger(__name__)


def engine_options(args: argparse.Namespace) -> dict:
    """The engine's options from the command line (``load_engine`` keeps the ones its backend takes)."""
    return dict(dtype=getattr(args, "dtype", "auto"), max_top_k=getattr(args, "max_top_k", 64),
                max_seq_len=getattr(args, "max_seq_len", None),
                gpu_memory_utilization=getattr(args, "gpu_memory_utilization", None),
                enforce_eager=getattr(args, "enforce_eager", False),
                max_batch_tokens=getattr(args, "max_batch_tokens", 16384),
                tensor_parallel_size=getattr(args, "tensor_parallel_size", 1))


def _cache_options(args: argparse.Namespace) -> dict:
    """--cache-dir / --cache-max-bytes / --cache-encoding, checked (exit 2 on a bad one)."""
    from ddk.errors import UsageError

    cache_dir = getattr(args, "cache_dir", None)
    max_bytes = getattr(args, "cache_max_bytes", None)
    encoding = getattr(args, "cache_encoding", "float16") or "float16"
    if cache_dir is None:
        if max_bytes is not None:
            raise UsageError("--cache-max-bytes: needs --cache-dir")
        return {}
    if max_bytes is not None and max_bytes < 1:
        raise UsageError(f"--cache-max-bytes: must be at least 1, got {max_bytes}")
    path = Path(cache_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--cache-dir: cannot create {path}: {e}") from None
    if not path.is_dir():
        raise UsageError(f"--cache-dir: {path} is not a directory")
    return {"cache_dir": path, "cache_max_bytes": max_bytes, "cache_encoding": encoding}


def main(args: argparse.Namespace) -> int:
    token = read_token(args.token_file) if getattr(args, "token_file", None) else None

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
    if getattr(args, "tensor_parallel_size", 1) < 1:
        raise UsageError(f"--tensor-parallel-size: must be at least 1, got {args.tensor_parallel_size}")
    cache = _cache_options(args)
    backend = choose_backend(args.backend)
    log.info("teacher: model %s, backend %s (asked %s)", model, backend, args.backend)

    options = engine_options(args)
    failure: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_load_error(e: BaseException) -> None:
        failure.append(e)
        if server is not None:
            server.should_exit = True

    app = create_app(lambda: load_engine(model, backend, **options), model_dir=model,
                     max_batch_tokens=max_batch_tokens, max_queue=max_queue,
                     max_body_bytes=getattr(args, "max_body_bytes", None), on_load_error=on_load_error,
                     token=token, **cache)
    # Idle keep-alive connections stay open longer than the client keeps them (5 s, client.py), so
    # the client never reuses a connection the server is just closing.
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=5, timeout_keep_alive=30)
    server = uvicorn.Server(config)
    server.run()
    if failure:
        raise RuntimeError(f"teacher engine failed to load: {failure[0]}")
    return 0
