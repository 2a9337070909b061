"""Every `ddk ... --help` prints its help and exits 0 (issue 25: `ddk teacher serve --help` ended in a traceback,
argparse expanding the `%` of "about 40% of the bytes").

The subcommands are found by walking argparse's subparsers actions of ``build_parser()``, so a subcommand added
later is covered without touching this file. Each help runs in-process through ``ddk.cli.main`` (what the
``ddk`` command runs), with stdout and stderr captured at the file descriptors.
"""

from __future__ import annotations

import argparse

import pytest

from ddk.cli import build_parser, main


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path of the parser: () for `ddk` itself, ("teacher",), ("teacher", "serve"), ..."""
    found = [path]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found += _commands(child, path + (name,))
    return found


COMMANDS = _commands(build_parser())


def test_the_walk_finds_the_nested_subcommands():
    # a few known paths, written by hand from docs/cli.md: the walk descends into nested subparsers
    for path in [(), ("train",), ("teacher", "serve"), ("teacher", "precompute"), ("controller", "serve"),
                 ("data", "prepare"), ("data", "inspect"), ("runs",), ("weights",)]:
        assert path in COMMANDS
    assert len(COMMANDS) >= 16  # ddk, 10 commands, 5 nested ones (docs/cli.md)


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "ddk")
def test_help_exits_0_without_a_traceback(path, capfd):
    with pytest.raises(SystemExit) as done:
        main([*path, "--help"])
    out, err = capfd.readouterr()
    assert done.value.code == 0, err
    assert "Traceback" not in out + err and "Error" not in err, err
    assert out.startswith("usage: ddk" + "".join(f" {p}" for p in path)), out[:200]
    assert "-h, --help" in out
