"""`ddk controller serve`: run the controller app on uvicorn.

Binds 127.0.0.1 unless told otherwise: the controller has no TLS, so exposing it is a deliberate choice
(use --token-file then, so only holders of the token can change a run's weights).
"""

from __future__ import annotations

import argparse
import logging
import sqlite3
from pathlib import Path

import uvicorn

from ddk.errors import UsageError
from ddk.tokenfile import read_token

log = logging.getLogger(__name__)


def check_db_path(path: str) -> None:
    """--db names a file (absent: created) in a folder that exists; else exit 2 before anything opens."""
    p = Path(path).expanduser()
    if not path or p.is_dir():
        raise UsageError(f"--db: must be a file in an existing folder, got {path!r}")
    if not p.parent.is_dir():
        raise UsageError(f"--db: must be a file in an existing folder; no such folder {p.parent}")


def main(args: argparse.Namespace) -> int:
    token = read_token(args.token_file) if args.token_file else None  # a bad token file fails before the imports
    check_db_path(args.db)

    from ddk.controller.app import create_app

    server: uvicorn.Server | None = None
    try:
        app = create_app(args.db, token, should_stop=lambda: server is not None and server.should_exit)
    except sqlite3.Error as e:
        raise UsageError(f"--db: cannot open {args.db}: {e}") from None
    config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None,
                            timeout_graceful_shutdown=5, timeout_keep_alive=30)
    server = uvicorn.Server(config)
    log.info("controller on http://%s:%d (db %s, writes %s)", args.host, args.port, args.db,
             "need a bearer token" if token else "open")
    server.run()
    return 0 if server.started else 1
