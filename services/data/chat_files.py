"""Conversation rows from files: JSONL (also ``.jsonl.gz`` / ``.jsonl.zst``) line by line and Parquet row by row,
streamed, each row with its line number (Parquet: its row number, 1-based) so that :mod:`ddk.data.chat` can name
the line of a bad row. The files are opened with :mod:`ddk.data.domains`' ``file_kind`` and ``open_text`` (the
text cache's readers); ``.txt`` files and saved datasets hold no conversations.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from ddk.data.chat import ChatRowError, Conversation, conversations
from ddk.data.domains import file_kind, open_text
from ddk.errors import UsageError

CHAT_FILE_KINDS = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")


def read_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """``(line, row)`` for every non-blank line of a JSONL file or every row of a Parquet file (all its columns)."""
    p = Path(path)
    kind = file_kind(p)
    if kind not in CHAT_FILE_KINDS:
        raise UsageError(f"{p}: conversations are read from {', '.join(CHAT_FILE_KINDS)} files, not "
                         f"{'a directory' if kind == 'hf' else (kind or p.suffix or 'a file without a suffix')}")
    if kind == ".parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(p)
        except (OSError, ValueError) as e:
            raise UsageError(f"{p}: cannot read Parquet ({e})") from None
        n = 0
        for batch in pf.iter_batches(batch_size=1000):
            for row in batch.to_pylist():
                n += 1
                yield n, row
        return
    try:
        with open_text(p, kind) as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ChatRowError(str(p), lineno, "(row)", f"not JSON ({e.msg})") from None
                yield lineno, row
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise UsageError(f"{p}: cannot read ({e})") from None


def read_conversations(path: str | Path) -> Iterator[Conversation]:
    """The checked conversations of one file, streamed (:func:`ddk.data.chat.conversations`)."""
    return conversations(read_rows(path), str(path))
