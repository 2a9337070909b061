"""Bearer-token files, read one way by every service and client (``--token-file``, ``*.token_file`` keys)."""

from __future__ import annotations

from pathlib import Path

from ddk.errors import UsageError


def read_token(path: str | Path, key: str = "--token-file") -> str:
    """The token: the file's content without surrounding whitespace. Unreadable, empty or with whitespace inside
    is a :class:`UsageError` (exit 2) naming ``key``, the flag or config key that gave the path."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{key}: cannot read {path}: {e}") from None
    if not token:
        raise UsageError(f"{key}: {path} is empty")
    if any(c.isspace() for c in token):
        raise UsageError(f"{key}: {path} holds whitespace inside the token")
    return token
