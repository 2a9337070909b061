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


# ---------------------------------------------------------------------------------------------------------
# the prompts a checker judges (ddk eval --tasks, ddk compare, seqkd and the trainer's accuracy gap share them)


def test_prompt_is_the_conversation_before_its_last_assistant_turn():
    from ddk.data.tasks import prompt_messages

    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"}]
    assert prompt_messages(msgs) == msgs[:4]
    assert prompt_messages(msgs[:3]) == msgs[:2]
    with pytest.raises(ValueError):
        prompt_messages(msgs[:2])
    conv = [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"},
            {"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]
    assert prompt_messages(conv) == conv[:3]
    assert prompt_messages(conv[1:2]) == []
    got = prompt_messages(conv)
    got[0]["content"] = "changed"
    assert conv[0]["content"] == "1+1"  # copies, not the row's own turns


def test_fit_prompt_keeps_the_end():
    from ddk.data.tasks import fit_prompt

    assert fit_prompt([5, 6, 7, 8], 2) == ([7, 8], True)
    assert fit_prompt([5, 6], 2) == ([5, 6], False)
    assert fit_prompt([5, 6], None) == ([5, 6], False)
    ids, cut = fit_prompt((9, 8, 7), 1)
    assert ids == [7] and cut and type(ids) is list


def _qa_rows(tmp_path, rows) -> str:
    import json

    f = tmp_path / "val.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(f)


def _qa(q: str, a: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], **extra}


def test_task_prompts_rows_limit_and_a_row_without_a_prompt(tmp_path):
    from ddk.data.chat import ChatRowError
    from ddk.data.tasks import task_prompts

    f = _qa_rows(tmp_path, [_qa("1+1", "2", answer="2"), _qa("2+2", "4", answer="4"), _qa("3+3", "6")])
    got = task_prompts([f])
    assert [(p.messages, p.row.get("answer"), p.file, p.line) for p in got] == [
        ([{"role": "user", "content": "1+1"}], "2", f, 1), ([{"role": "user", "content": "2+2"}], "4", f, 2),
        ([{"role": "user", "content": "3+3"}], None, f, 3)]
    assert [p.line for p in task_prompts([f, f], limit=4)] == [1, 2, 3, 1]
    bad = _qa_rows(tmp_path, [_qa("1+1", "2"), {"messages": [{"role": "assistant", "content": "hi"}]}])
    with pytest.raises(ChatRowError, match=r"val.jsonl:2: field 'messages'"):
        task_prompts([bad])


def test_judge_counts_and_names_the_row_it_cannot_judge():
    from ddk.data.tasks import TaskPrompt, judge

    prompts = [TaskPrompt([], {"answer": "4"}, "v.jsonl", 1), TaskPrompt([], {"answer": "Paris"}, "v.jsonl", 2),
               TaskPrompt([], {"answer": "7"}, "v.jsonl", 3)]
    assert judge(parse_task("exact"), prompts, ["4", " paris.", "8"]) == 2  # by hand: rows 1 and 2
    with pytest.raises(TaskError, match=r"^v.jsonl:2: .*'label'"):
        judge(parse_task({"check": "exact", "field": "label"}), prompts[1:], ["x", "y"])
    with pytest.raises(ValueError):
        judge(parse_task("exact"), prompts, ["4"])


def test_render_prompt_and_stop_ids_with_the_chat_kit_tokenizer():
    """The chat kit's ChatML tokenizer: <pad> <s> </s> <|im_start|> <|im_end|> are ids 0..4, <|im_end|> its eos."""
    from ddk.data.tasks import render_prompt, stop_ids
    from ddk.kit.chat import chat_tokenizer

    tok = chat_tokenizer(64)
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"  # ChatML with the generation prompt, by hand
    ids = render_prompt(tok, [{"role": "user", "content": "hi"}])
    assert ids == tok(text, add_special_tokens=False)["input_ids"] and ids[0] == 3  # no <s> added
    assert stop_ids(tok) == [2, 4]  # </s> and <|im_end|> (also the eos)
    assert stop_ids(tok, [9, 4]) == [2, 4, 9]  # and the model's eos ids
    tok.chat_template = "{{ raise_exception('no user turns here') }}"
    with pytest.raises(UsageError, match=r"^v.jsonl:7: .*no user turns here"):
        render_prompt(tok, [{"role": "user", "content": "hi"}], "v.jsonl:7")
