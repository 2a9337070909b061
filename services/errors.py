"""The errors every layer may raise and the CLI turns into exit codes (no I/O, no imports).

:class:`UsageError` is bad usage or bad input: ``ddk`` prints ``ddk: error: <message>`` (one line) and exits
2. Anything else that escapes a subcommand is a failure: exit 1.
"""


class UsageError(Exception):
    """Bad usage or bad input: the CLI prints ``ddk: error: <message>`` and exits 2."""
