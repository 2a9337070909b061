"""Task checkers (ddk.data.tasks) on known answers, written by hand."""

from __future__ import annotations

import sys

import pytest

from ddk.data.tasks import TaskError, TaskSpec, accuracy, make_checker, normalise, parse_task
from ddk.errors import UsageError


@pytest.mark.parametrize("raw,want", [
    ("  Paris. ", "paris"),
    ("New\t\tYork\n City", "new york city"),
    ("STRASSE", "strasse"),
    ("Straße", "strasse"),           # casefold, not lower
    ("3.14", "3.14"),                # only a trailing period goes
    ("done..", "done."),             # one of them
    ("1 2 3 .", "1 2 3"),
    (42, "42"),
])
def test_normalise(raw, want):
    assert normalise(raw) == want


def test_exact_on_known_answers():
    check = make_checker(parse_task("exact"))
    row = {"answer": "1 3 7 9"}
    assert check("1 3 7 9", row)
    assert check("  1   3 7\n9.  ", row)
    assert not check("1 3 9 7", row)
    assert not check("1 3 7 9 11", row)
    assert make_checker(parse_task({"field": "label"}))("Tac", {"label": "tac"})
    with pytest.raises(TaskError, match="'answer'"):
        check("x", {"label": "y"})


def test_regex_on_known_answers():
    check = make_checker(parse_task({"check": "regex", "pattern": r"answer:\s*(-?\d+)"}))
    row = {"answer": "579"}
    assert check("Adding 123 and 456, the answer: 579", row)
    assert not check("answer: 578", row)
    assert not check("579", row)                        # no match is wrong
    assert not check("answer: 12 then answer: 579", row)  # the first match counts
    last = make_checker(parse_task({"check": "regex", "pattern": r"(?s).*answer:\s*(\d+)"}))
    assert last("answer: 12 then answer: 579", row)


def test_python_checker(tmp_path, monkeypatch):
    (tmp_path / "my_checks_27.py").write_text(
        "def sorted_ok(generated, row):\n"
        "    return [int(x) for x in generated.split()] == sorted(int(x) for x in row['numbers'].split())\n"
        "def not_bool(generated, row):\n"
        "    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    check = make_checker(parse_task({"check": "python", "function": "my_checks_27:sorted_ok"}))
    assert check("2 5 11", {"numbers": "11 2 5"})
    assert not check("2 11 5", {"numbers": "11 2 5"})
    assert accuracy(check, [("2 5 11", {"numbers": "11 2 5"}), ("1", {"numbers": "2"}),
                            ("0 0", {"numbers": "0 0"})]) == (2, 3)
    with pytest.raises(TaskError, match="returned int"):
        make_checker(parse_task({"check": "python", "function": "my_checks_27:not_bool"}))("1", {})
    with pytest.raises(TaskError, match="no function 'missing'"):
        make_checker(parse_task({"check": "python", "function": "my_checks_27:missing"}))
    with pytest.raises(TaskError, match="cannot import"):
        make_checker(parse_task({"check": "python", "function": "no_such_module_27:f"}))
    sys.modules.pop("my_checks_27", None)


def test_python_module_is_imported_only_when_named(tmp_path, monkeypatch):
    (tmp_path / "side_effect_27.py").write_text("import os\nos.environ['DDK_TEST_27_IMPORTED'] = '1'\n"
                                                 "def f(g, r):\n    return True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("DDK_TEST_27_IMPORTED", raising=False)
    spec = parse_task({"check": "python", "function": "side_effect_27:f"})
    assert spec == TaskSpec("python", "answer", None, "side_effect_27:f")
    import os

    assert "DDK_TEST_27_IMPORTED" not in os.environ  # parsing imports nothing
    make_checker(spec)
    assert os.environ.get("DDK_TEST_27_IMPORTED") == "1"
    sys.modules.pop("side_effect_27", None)


@pytest.mark.parametrize("raw,match", [
    ("fuzzy", "not one of"),
    (3, "must be one of"),
    ({"check": "regex"}, "needs a pattern"),
    ({"check": "regex", "pattern": r"\d+"}, "capture group"),
    ({"check": "regex", "pattern": "(unclosed"}, "not a regular expression"),
    ({"check": "python", "function": "nocolon"}, "module:function"),
    ({"check": "exact", "pattern": "(x)"}, "only a regex"),
    ({"check": "exact", "function": "a:b"}, "only a python"),
    ({"check": "exact", "colour": "red"}, "unknown key 'colour'"),
    ({"field": ""}, "non-empty"),
])
def test_bad_specs(raw, match):
    with pytest.raises(TaskError, match=match) as e:
        parse_task(raw, "domain add.task")
    assert str(e.value).startswith("domain add.task") and isinstance(e.value, UsageError)
