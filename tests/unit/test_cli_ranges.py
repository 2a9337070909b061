"""Every flag's range is checked as it is parsed, and every numeric config key has one (issue 17, bad input).

The parser is walked, so a flag added later is covered without touching this file: a numeric flag with a plain
``type=int``/``type=float`` (no range) fails :func:`test_no_numeric_flag_without_a_range`, and every flag typed
with a ``ddk.argtypes`` range is tried with values just outside it. The train config's models are walked the
same way. The commands of the issue run as real processes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import types
from pathlib import Path
from typing import Union, get_args, get_origin

import annotated_types
import pytest
import yaml
from ddk import argtypes
from ddk.cli import build_parser
from ddk.errors import UsageError
from ddk.trainer.config import TrainConfig, load_config
from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[2]
_DDK_SCRIPT = Path(sys.executable).with_name("ddk")
DDK = [str(_DDK_SCRIPT)] if _DDK_SCRIPT.exists() else [sys.executable, "-m", "ddk.cli"]


# ---------------------------------------------------------------------------------------------------------
# the parser, walked

def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(the subcommand words, its parser) for the root and every subcommand, recursively."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, path + (name,))


def _options():
    """(subcommand words, action) of every flag of every subcommand (help and subcommand actions aside)."""
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            yield path, action


def _name(path, action) -> str:
    return " ".join(("ddk",) + path + (action.option_strings[-1] if action.option_strings else action.dest,))


RANGED = (argtypes.IntRange, argtypes.FloatRange)
BAD_CASES = [pytest.param(path, action.option_strings[-1], bad, id=f"{' '.join(path)} {action.option_strings[-1]}={bad}")
             for path, action in _options() if isinstance(action.type, RANGED) and action.option_strings
             for bad in action.type.bad_values()]


def test_the_walk_sees_every_subcommand():
    paths = {path for path, _ in _parsers(build_parser())}
    for expected in [("teacher", "serve"), ("controller", "serve"), ("eval",), ("data", "prepare"), ("fixtures",),
                     ("demo",), ("compare",), ("runs",), ("weights",), ("train",)]:
        assert expected in paths
    assert len(BAD_CASES) >= 30


def test_no_numeric_flag_without_a_range():
    """A flag parsed with plain int/float, or with a numeric default and no type at all, has no range."""
    unranged = []
    for path, action in _options():
        numeric_default = (isinstance(action.default, (int, float)) and not isinstance(action.default, bool)
                           and action.nargs != 0)
        if action.type in (int, float) or (action.type is None and numeric_default):
            unranged.append(_name(path, action))
    assert not unranged, f"numeric flags without a range (use a ddk.argtypes type): {unranged}"


def test_host_port_and_url_flags_use_their_types():
    expected = {"host": argtypes.host, "port": argtypes.port}
    wrong = []
    for path, action in _options():
        want = expected.get(action.dest) or (argtypes.http_url if action.metavar == "URL" else None)
        if want is not None and action.type is not want:
            wrong.append(_name(path, action))
    assert not wrong, wrong


def test_ranged_flags_show_the_range_in_help_and_have_a_default_inside_it():
    for path, action in _options():
        rule = getattr(action.type, "rule", None)
        if rule is None:
            continue
        assert rule in (action.help or ""), _name(path, action)
        if isinstance(action.default, (int, float)) and not isinstance(action.default, bool):
            assert action.type(str(action.default)) == action.default, _name(path, action)


@pytest.mark.parametrize("path, flag, bad", BAD_CASES)
def test_out_of_range_is_exit_2_with_one_line_naming_the_flag(path, flag, bad, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*path, flag, bad])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert f"argument {flag}" in err and "must be " in err, err


@pytest.mark.parametrize("text", ["127.0.0.1", "0.0.0.0", "::1", "::", "localhost", "my-host.example.org",
                                  "example.com.", "fe80::1%eth0"])
def test_host_accepts_addresses_and_names(text):
    assert argtypes.host(text) == text


@pytest.mark.parametrize("text", ["999.1.1.1", "1.2.3", "256.0.0.1", "", "-bad.example", "a..b", "under_score",
                                  "x" * 64, "1:2:3", "host name", "[::1]", "example.123"])
def test_host_refuses_what_no_socket_can_bind(text):
    with pytest.raises(argparse.ArgumentTypeError):
        argtypes.host(text)


@pytest.mark.parametrize("text", ["http://127.0.0.1:8200", "https://teacher.example:443/v1", "http://[::1]:8100",
                                  "http://localhost"])
def test_http_url_accepts(text):
    assert argtypes.http_url(text) == text


@pytest.mark.parametrize("text", ["127.0.0.1:8200", "ftp://x", "http://", "http://127.0.0.1:99999",
                                  "http://127.0.0.1:0", "http://999.1.1.1:80", "http://h:port", "http://[::1"])
def test_http_url_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError):
        argtypes.http_url(text)


def test_db_path_needs_an_existing_folder(tmp_path):
    """Checked by the controller as it starts (not by the parser: deploy files name folders of their host)."""
    from ddk.controller.server import check_db_path

    check_db_path(str(tmp_path / "x.db"))
    for bad in (str(tmp_path / "missing" / "x.db"), str(tmp_path), ""):
        with pytest.raises(UsageError, match="^--db: "):
            check_db_path(bad)
    assert not (tmp_path / "missing").exists()


def test_log_level_any_case():
    assert build_parser().parse_args(["--log-level", "debug", "runs"]).log_level == "DEBUG"
    assert build_parser().parse_args(["runs"]).log_level == "INFO"


# ---------------------------------------------------------------------------------------------------------
# the commands of the issue, as a new user types them

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("model")
    (d / "config.json").write_text("{}")
    return d


ISSUE_COMMANDS = [
    (["controller", "serve", "--port", "99999"], "--port"),
    (["controller", "serve", "--port", "-5"], "--port"),
    (["controller", "serve", "--host", "999.1.1.1"], "--host"),
    (["controller", "serve", "--db", "/nonexistent/dir/x.db"], "--db"),
    (["teacher", "serve", "--max-batch-tokens", "1", "--model", "{model}"], "--max-batch-tokens"),
    (["teacher", "serve", "--max-body-bytes", "-1", "--model", "{model}"], "--max-body-bytes"),
    (["teacher", "serve", "--port", "99999", "--model", "{model}"], "--port"),
    (["eval", "--seq-len", "0", "--model", "{model}", "--data", "{model}"], "--seq-len"),
]


@pytest.mark.parametrize("argv, flag", ISSUE_COMMANDS, ids=[" ".join(a) for a, _ in ISSUE_COMMANDS])
def test_issue_commands_exit_2_before_starting(argv, flag, model_dir, tmp_path):
    argv = [a.replace("{model}", str(model_dir)) for a in argv]
    r = subprocess.run(DDK + argv, cwd=tmp_path, capture_output=True, text=True, timeout=20, check=False)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1, r.stderr
    assert f"argument {flag}:" in r.stderr or f"ddk: error: {flag}:" in r.stderr, r.stderr  # parser / service
    assert list(tmp_path.iterdir()) == [] and not Path("/nonexistent").exists()  # nothing started or created


# ---------------------------------------------------------------------------------------------------------
# the train config's numeric keys, walked

def _unwrap(annotation):
    """``X | None`` -> X."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _numeric_keys(model: type[BaseModel] = TrainConfig, prefix: str = ""):
    """(dotted key, int or float, the field's metadata) of every plain int/float key, nested sections too."""
    for name, field in model.model_fields.items():
        kind = _unwrap(field.annotation)
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            yield from _numeric_keys(kind, f"{prefix}{name}.")
        elif kind in (int, float):
            yield f"{prefix}{name}", kind, field.metadata


def _bad_values(kind, metadata) -> list:
    """Values just outside the key's bounds (the bounds' own values when they are exclusive)."""
    out = []
    for m in metadata:
        if isinstance(m, annotated_types.Gt):
            out.append(m.gt)
        elif isinstance(m, annotated_types.Ge):
            out.append(m.ge - 1)
        elif isinstance(m, annotated_types.Lt):
            out.append(m.lt)
        elif isinstance(m, annotated_types.Le):
            out.append(m.le + 1)
    return out + ([".inf", ".nan"] if kind is float else [])


NUMERIC_KEYS = list(_numeric_keys())
CONFIG_CASES = [pytest.param(key, value, id=f"{key}={value}")
                for key, kind, metadata in NUMERIC_KEYS for value in _bad_values(kind, metadata)]
CONFIG_CASES += [pytest.param("seed", 2**32, id="seed=2**32"),
                 pytest.param("mixture.initial_weights", "{math: .nan}", id="initial_weights-nan"),
                 pytest.param("mixture.initial_weights", "{math: .inf}", id="initial_weights-inf")]


def test_every_numeric_config_key_has_a_lower_bound():
    assert len(NUMERIC_KEYS) >= 20 and "seed" in {k for k, _, _ in NUMERIC_KEYS}
    unbounded = [key for key, _, metadata in NUMERIC_KEYS
                 if not any(isinstance(m, (annotated_types.Gt, annotated_types.Ge)) for m in metadata)]
    assert not unbounded, f"numeric config keys without a range: {unbounded}"


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("conf")
    (d / "student").mkdir()
    (d / "data.yaml").write_text("domains: []\n")
    path = d / "train.yaml"
    path.write_text(yaml.safe_dump({
        "run_id": "r1", "teacher": {"urls": ["http://127.0.0.1:8100"]},
        "controller": {"url": "http://127.0.0.1:8200"}, "student": {"model": "student"},
        "data": {"file": "data.yaml"}, "train": {"steps": 10}}))
    return path


def test_the_base_config_loads(config_file):
    load_config(str(config_file))


@pytest.mark.parametrize("key, value", CONFIG_CASES)
def test_out_of_range_config_key_is_a_usage_error_naming_it(key, value, config_file):
    with pytest.raises(UsageError) as e:
        load_config(str(config_file), [f"{key}={value}"])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{key}"), msg
