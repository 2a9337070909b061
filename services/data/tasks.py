"""Task checkers: is a model's answer to a conversation's prompt right? (pure, except that ``python`` imports the
module the user names.)

A domain names its checker in ``data.yaml`` as ``task:`` (parsed by :func:`parse_task`):

- ``exact`` (the default; ``task: exact`` or ``{check: exact, field: answer}``): the generated text equals the
  row's ``field`` (default ``answer``) after :func:`normalise` on both: strip, collapse whitespace runs to one
  space, casefold, drop one trailing period.
- ``regex`` (``{check: regex, pattern: "...", field: answer}``): the pattern's first match in the generated text
  (``re.search``), its first capture group normalised, equals the normalised ``field``; no match is wrong. The
  pattern must have a capture group. To take the last match, anchor it (``(?s).*answer: (\\d+)``).
- ``python`` (``{check: python, function: "module:function"}``): ``function(generated: str, row: dict) -> bool``
  from the user's own module, imported (from ``sys.path``: the working directory or an installed package) only
  when a domain names it. **This runs code the user chose**, with the user's rights, in the process that judges;
  ddk neither sandboxes nor reviews it.

Bad specs and rows are :class:`TaskError` (a :class:`~ddk.errors.UsageError`: exit 2).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from ddk.errors import UsageError

CHECKS = ("exact", "regex", "python")
_SPACE = re.compile(r"\s+")


class TaskError(UsageError):
    """A bad task spec, a checker that cannot be loaded, or a row without the field a checker compares with."""


def normalise(text: Any) -> str:
    """Strip, collapse whitespace runs to one space, casefold, drop one trailing period (then strip again)."""
    s = _SPACE.sub(" ", str(text).strip()).casefold()
    if s.endswith("."):
        s = s[:-1].rstrip()
    return s


@dataclass(frozen=True)
class TaskSpec:
    check: str = "exact"
    field: str = "answer"
    pattern: str | None = None
    function: str | None = None


def parse_task(raw: Any, where: str = "task") -> TaskSpec:
    """A domain's ``task`` entry (None, a check name, or a mapping) checked; ``where`` names it in errors."""
    if raw is None:
        return TaskSpec()
    if isinstance(raw, str):
        raw = {"check": raw}
    if not isinstance(raw, dict):
        raise TaskError(f"{where}: must be one of {', '.join(CHECKS)} or a mapping with 'check'")
    extra = set(raw) - {"check", "field", "pattern", "function"}
    if extra:
        raise TaskError(f"{where}: unknown key {sorted(extra)[0]!r}")
    check = raw.get("check", "exact")
    if check not in CHECKS:
        raise TaskError(f"{where}.check: {check!r} is not one of {', '.join(CHECKS)}")
    field = raw.get("field", "answer")
    if not isinstance(field, str) or not field:
        raise TaskError(f"{where}.field: must be a non-empty string")
    pattern, function = raw.get("pattern"), raw.get("function")
    if check == "regex":
        if not isinstance(pattern, str) or not pattern:
            raise TaskError(f"{where}.pattern: a regex check needs a pattern")
        try:
            groups = re.compile(pattern).groups
        except re.error as e:
            raise TaskError(f"{where}.pattern: not a regular expression ({e})") from None
        if groups < 1:
            raise TaskError(f"{where}.pattern: needs a capture group (the answer), e.g. 'answer: (\\d+)'")
    elif pattern is not None:
        raise TaskError(f"{where}.pattern: only a regex check has a pattern")
    if check == "python":
        if not isinstance(function, str) or function.count(":") != 1 or not all(function.split(":")):
            raise TaskError(f"{where}.function: a python check needs 'module:function', not {function!r}")
    elif function is not None:
        raise TaskError(f"{where}.function: only a python check has a function")
    return TaskSpec(check, field, pattern, function)


def _reference(row: dict, field: str) -> str:
    if not isinstance(row, dict) or field not in row:
        raise TaskError(f"the row has no {field!r} field to check the answer against")
    return str(row[field])


def load_function(spec: str) -> Callable[[str, dict], Any]:
    """The user's ``module:function`` (imported now: code the user chose to run)."""
    mod_name, _, fn_name = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise TaskError(f"task function {spec}: cannot import {mod_name!r} ({e})") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise TaskError(f"task function {spec}: {mod_name} has no function {fn_name!r}")
    return fn


def make_checker(spec: TaskSpec) -> Callable[[str, dict], bool]:
    """``checker(generated, row) -> bool`` for ``spec``."""
    if spec.check == "exact":
        def exact(generated: str, row: dict) -> bool:
            return normalise(generated) == normalise(_reference(row, spec.field))
        return exact
    if spec.check == "regex":
        rx = re.compile(spec.pattern or "")

        def regex(generated: str, row: dict) -> bool:
            want = normalise(_reference(row, spec.field))
            m = rx.search(generated)
            return m is not None and m.group(1) is not None and normalise(m.group(1)) == want
        return regex
    fn = load_function(spec.function or "")

    def python(generated: str, row: dict) -> bool:
        got = fn(generated, row)
        if not isinstance(got, bool):
            raise TaskError(f"task function {spec.function} returned {type(got).__name__}, not bool")
        return got
    return python


def accuracy(checker: Callable[[str, dict], bool], pairs: Iterable[tuple[str, dict]]) -> tuple[int, int]:
    """(right, total) over ``(generated, row)`` pairs."""
    right = total = 0
    for generated, row in pairs:
        total += 1
        right += bool(checker(generated, row))
    return right, total
