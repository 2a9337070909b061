"""Task checkers: is a model's answer to a conversation's prompt right? And the prompts they judge: the one owner
of a task domain's validation prompts, the ids they are rendered to and where an answer stops, for ``ddk eval
--tasks`` / ``ddk compare`` / seqkd (:mod:`ddk.experiments.tasks`) and the trainer's accuracy gap
(:mod:`ddk.trainer.gap_signal`), which may not import ``ddk.experiments``. (Pure, except that ``python`` imports the
module the user names, :func:`task_prompts` reads the ``val_files`` and :func:`render_prompt` / :func:`stop_ids`
take the tokenizer passed in.)

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

A domain's validation prompts (:func:`task_prompts`) are the rows of its ``val_files`` (:mod:`ddk.data.chat_files`,
every row checked by :mod:`ddk.data.chat`) with the last assistant turn removed (:func:`prompt_messages`: that turn
is the answer), rendered with the tokenizer's chat template and its generation prompt and tokenised without added
special tokens (:func:`render_prompt`), cut from the left to the room the model has (:func:`fit_prompt`). An answer
ends at the tokenizer's eos, the model's eos ids or an end-of-turn token the tokenizer has as a single token
(:func:`stop_ids`, :data:`END_OF_TURN`); :func:`judge` counts the answers the domain's checker accepts.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from ddk.data.chat import ChatRowError, _encode, _render, row_conversation, row_form
from ddk.errors import UsageError

CHECKS = ("exact", "regex", "python")
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")
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


# ---------------------------------------------------------------------------------------------------------
# the prompts a checker judges, and where an answer stops

@dataclass
class TaskPrompt:
    """One validation row of a task domain: the prompt turns (the row's conversation up to its last assistant
    turn), the row itself (what the checker compares with) and where it came from."""

    messages: list[dict]
    row: dict
    file: str
    line: int


def prompt_messages(messages: Sequence[dict]) -> list[dict]:
    """The turns before the last assistant turn (pure); [] when that turn is the first; ValueError without one."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError("a conversation without an assistant turn")
    return [dict(m) for m in messages[:last]]


def task_prompts(files: Sequence[str], limit: int | None = None) -> list[TaskPrompt]:
    """The validation prompts of a domain's ``val_files`` (the first ``limit`` rows when given), each row checked as
    a conversation (a bad row, or one with no turn before its last assistant turn: exit 2 naming file, line, field)."""
    from ddk.data.chat_files import read_rows  # (it imports ddk.data.domains, which imports this module)

    out: list[TaskPrompt] = []
    for f in files:
        form = None
        for line, row in read_rows(f):
            if limit is not None and len(out) >= limit:
                return out
            form = form or row_form(row)
            msgs = prompt_messages(row_conversation(row, form or "messages", f, line).messages)
            if not msgs:
                raise ChatRowError(f, line, "messages", "no turn before the last assistant turn to prompt with")
            out.append(TaskPrompt(msgs, row, str(f), line))
    return out


def render_prompt(tokenizer, messages: Sequence[dict], where: str = "") -> list[int]:
    """``messages`` rendered with the chat template and the generation prompt, tokenised without added special
    tokens (the template writes them); a template that fails is exit 2 naming ``where`` (:mod:`ddk.data.chat`)."""
    return _encode(tokenizer, _render(tokenizer, messages, True, where))


def fit_prompt(ids: Sequence[int], room: int | None) -> tuple[list[int], bool]:
    """``(ids, truncated)``: the last ``room`` ids of a prompt (its start cut, as the training's conversations are)
    when it is longer; all of them when ``room`` is None."""
    if room is None or len(ids) <= room:
        return [int(t) for t in ids], False
    return [int(t) for t in ids[-room:]], True


def stop_ids(tokenizer, model_eos: Iterable[int] = ()) -> list[int]:
    """Where an answer ends, sorted: ``model_eos`` (the model's eos ids,
    :func:`ddk.teacher.generation.model_stop_ids`), the tokenizer's eos and the end-of-turn tokens
    (:data:`END_OF_TURN`) the tokenizer has as single tokens."""
    ids = {int(t) for t in model_eos}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.update(int(vocab[t]) for t in END_OF_TURN if t in vocab)
    return sorted(ids)


def judge(spec: TaskSpec, prompts: Sequence[TaskPrompt], answers: Sequence[str]) -> int:
    """How many ``answers`` (one per prompt, in order) the domain's checker accepts; a row the checker cannot judge
    (no reference field, a user function that returns no bool) is a :class:`TaskError` naming its file and line."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    check = make_checker(spec)
    right = 0
    for p, a in zip(prompts, answers):
        try:
            right += bool(check(a, p.row))
        except TaskError as e:
            raise TaskError(f"{p.file}:{p.line}: {e}") from None
    return right
