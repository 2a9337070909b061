"""Task accuracy (`ddk eval --tasks`, ddk.experiments.tasks) and greedy generation (ddk.teacher.generation):
batched answers against a hand-written greedy loop, accuracy counted by hand, the teacher's /v1/generate body checks,
exit 2 naming file and line. (The prompts themselves, ddk.data.tasks: tests/unit/test_tasks.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from ddk.cli import main as cli_main
from ddk.experiments.tasks import format_accuracy_table, result_rows, TaskResult
from ddk.teacher.generation import cut_at_stop, greedy_generate, parse_generate_request
from ddk.teacher.validate import RequestError

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def hand_greedy(model, ids: list[int], max_new: int, stops: set[int]) -> list[int]:
    """Greedy decoding from its definition: one prompt, the whole sequence through the model at each step (no
    cache, no padding), the argmax appended, stop at a stop id (not kept)."""
    out: list[int] = []
    seq = list(ids)
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            if nxt in stops:
                break
            out.append(nxt)
            seq.append(nxt)
    return out


def test_cut_at_stop():
    assert cut_at_stop([5, 6, 2, 7], [2, 9]) == ([5, 6], "stop")
    assert cut_at_stop([5, 6], [2]) == ([5, 6], "length")
    assert cut_at_stop([2], [2]) == ([], "stop")


def test_batched_greedy_equals_the_hand_loop_one_prompt_at_a_time(kit):
    """Left padding must not move a prompt's positions: batched answers (prompts of different lengths in one batch)
    equal the textbook greedy loop on each prompt alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(kit / "teacher", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(kit / "teacher")
    texts = ["def main(", "The court held that the", "x = 1", "In the beginning of the long summer the river",
             "Let n be", "import"]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert len({len(p) for p in prompts}) > 3
    stops = [tok.eos_token_id]
    got = greedy_generate(model, prompts, 12, stops, pad_id=0, batch_size=4)
    want = [hand_greedy(model, p, 12, set(stops)) for p in prompts]
    assert [g[0] for g in got] == want
    assert all(why == ("stop" if len(ids) < 12 else "length") for ids, why in got)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A random 2-layer Llama over a char-level ChatML tokenizer (the chat kit's), saved as a model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ddk.kit.chat import chat_tokenizer

    root = tmp_path_factory.mktemp("chat-model")
    tok = chat_tokenizer(256)
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                      eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root, model, tok


def _write_domain(root, name, rows):
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / name / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_eval_tasks_counts_right_answers_as_a_hand_count(chat_model, tmp_path, capsys):
    """Five rows; the references of rows 0, 2, 3 are the model's greedy answers (computed by the hand loop on a
    ChatML prompt written by hand, with case and spacing changed where exact-after-normalisation allows), rows 1
    and 4 are wrong: accuracy 3/5. A text domain is skipped with a note; --limit 2 counts the first two rows."""
    root, model, tok = chat_model
    questions = ["What is 2 + 3?", "Sort: 4 1 3", "Reverse: cat", "Convert 3 km to m.", "What is 10 + 7?"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    answers = []
    for q in questions:
        text = f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"  # ChatML, by hand
        ids = tok(text, add_special_tokens=False)["input_ids"]
        answers.append(tok.decode(hand_greedy(model, ids, 20, {end}), skip_special_tokens=True))
    refs = [answers[0], "certainly not this", answers[2].upper(), "  " + answers[3] + " ", "nor this"]
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "x"}], "answer": a}
            for q, a in zip(questions, refs)]
    _write_domain(tmp_path / "data", "qa", rows)
    (tmp_path / "data" / "prose").mkdir()
    (tmp_path / "data" / "prose" / "train.jsonl").write_text('{"text": "some prose here"}\n' * 4)
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"domains": [
        {"name": "qa", "files": ["data/qa/train.jsonl"], "val_files": ["data/qa/val.jsonl"],
         "task": {"check": "exact", "field": "answer"}},
        {"name": "prose", "files": ["data/prose/train.jsonl"]}]}))
    argv = ["eval", "--tasks", "--model", str(root / "model"), "--data", str(tmp_path / "data.yaml"),
            "--max-new-tokens", "20", "--batch-size", "3", "--json"]
    assert cli_main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["domains"]["qa"] == {"accuracy": 0.6, "correct": 3, "total": 5, "check": "exact"}
    assert "prose" in out["skipped"]
    assert cli_main(argv + ["--limit", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["domains"]["qa"]["total"] == 2
    assert cli_main(argv[:-1]) == 0
    table = capsys.readouterr().out
    assert "qa" in table and "0.600" in table and "skipped prose" in table


def test_eval_tasks_bad_rows_exit_2_naming_file_and_line(chat_model, tmp_path, capsys):
    root, _, _ = chat_model
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "answer": "yo"}
    no_answer = {"messages": good["messages"]}
    _write_domain(tmp_path / "data", "qa", [good, no_answer])
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"domains": [
        {"name": "qa", "files": ["data/qa/train.jsonl"], "val_files": ["data/qa/val.jsonl"], "task": "exact"}]}))
    argv = ["eval", "--tasks", "--model", str(root / "model"), "--data", str(tmp_path / "data.yaml"),
            "--max-new-tokens", "4"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "val.jsonl:2:" in err and "'answer'" in err
    # a row without an assistant turn: file, line and field, before any model loads
    _write_domain(tmp_path / "data", "qa", [good, {"messages": [{"role": "user", "content": "hi"}]}])
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "val.jsonl:2: field 'messages'" in err
    # no task domain at all
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"domains": [
        {"name": "qa", "files": ["data/qa/train.jsonl"]}]}))
    assert cli_main(argv) == 2
    assert "no domain names a task" in capsys.readouterr().err


def test_eval_tasks_model_without_chat_template_exits_2(kit, tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "answer": "yo"}]
    _write_domain(tmp_path / "data", "qa", rows)
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"domains": [
        {"name": "qa", "files": ["data/qa/train.jsonl"], "val_files": ["data/qa/val.jsonl"], "task": "exact"}]}))
    assert cli_main(["eval", "--tasks", "--model", str(kit / "teacher"), "--data", str(tmp_path / "data.yaml")]) == 2
    assert "chat template" in capsys.readouterr().err


def test_result_rows_and_table_with_the_teacher_beside():
    rows = result_rows({"add": TaskResult(3, 4), "sort": TaskResult(0, 2)},
                       {"add": TaskResult(4, 4), "sort": TaskResult(1, 2)}, {"add": "exact", "sort": "regex"})
    assert rows["add"] == {"accuracy": 0.75, "correct": 3, "total": 4, "check": "exact", "teacher_accuracy": 1.0,
                           "teacher_correct": 4, "teacher_total": 4}
    table = format_accuracy_table(rows)
    assert "teacher accuracy" in table
    line = [ln for ln in table.splitlines() if ln.startswith("sort")][0]
    assert line.split() == ["sort", "regex", "2", "0", "0.000", "1", "0.500"]


@pytest.mark.parametrize("body, status, field", [
    (b"nope", 422, "body"),
    (b"[]", 422, "body"),
    (b'{"input_ids": [[1, 2]], "max_new_tokens": 4, "temperature": 1}', 422, "body"),
    (b'{"input_ids": [[1, 2]]}', 422, "max_new_tokens"),
    (b'{"input_ids": [[1, 2]], "max_new_tokens": 0}', 422, "max_new_tokens"),
    (b'{"input_ids": [[1, 2]], "max_new_tokens": true}', 422, "max_new_tokens"),
    (b'{"max_new_tokens": 4}', 422, "input_ids"),
    (b'{"input_ids": [], "max_new_tokens": 4}', 422, "input_ids"),
    (b'{"input_ids": [[]], "max_new_tokens": 4}', 422, "input_ids[0]"),
    (b'{"input_ids": [[1, 100]], "max_new_tokens": 4}', 422, "input_ids[0][1]"),
    (b'{"input_ids": [[1, 2]], "max_new_tokens": 4, "stop_ids": [100]}', 422, "stop_ids"),
    (b'{"input_ids": [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]], "max_new_tokens": 2}', 413,
     "input_ids[0]"),
    (b'{"input_ids": [[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 2, 3]], "max_new_tokens": 4}', 413, "input_ids"),
])
def test_generate_request_errors_name_the_field(body, status, field):
    with pytest.raises(RequestError) as e:
        parse_generate_request(body, vocab_size=100, max_seq_len=16, max_batch_tokens=24)
    assert e.value.status == status and e.value.detail.startswith(field + ":")


def test_generate_request_ok():
    req = parse_generate_request(b'{"input_ids": [[1, 2], [3]], "max_new_tokens": 5, "stop_ids": [0]}',
                                 vocab_size=100, max_seq_len=16, max_batch_tokens=24)
    assert req.input_ids == [[1, 2], [3]] and req.max_new_tokens == 5 and req.stop_ids == [0]


# -- lm-evaluation-harness (ddk eval --lm-eval, ddk.experiments.harness) ------------------------------------------

def test_harness_scores_model_index_and_card():
    from ddk.experiments.harness import harness_scores, model_index, with_model_index

    raw = {"toy": {"alias": "toy", "name": "toy", "sample_len": 4, "exact_match,none": 0.75,
                   "exact_match_stderr,none": 0.25, "acc,strict": 1.0, "acc_stderr,strict": "N/A"}}
    scores = harness_scores(raw)
    assert scores == {"toy": {"exact_match": 0.75, "exact_match_stderr": 0.25, "acc,strict": 1.0}}
    index = model_index("run-1", scores)
    assert index[0]["name"] == "run-1"
    res = index[0]["results"][0]
    assert res["task"]["name"] == "toy" and [m["type"] for m in res["metrics"]] == ["exact_match", "acc,strict"]
    card = "---\nlicense: apache-2.0\ntags:\n- ddk\n---\n\n# run-1\n\nbody\n"
    out = with_model_index(card, index)
    meta = yaml.safe_load(out.split("---\n")[1])
    assert meta["license"] == "apache-2.0" and meta["tags"] == ["ddk"]
    assert meta["model-index"][0]["results"][0]["metrics"][0] == {"type": "exact_match", "name": "exact_match",
                                                                  "value": 0.75}
    assert out.endswith("# run-1\n\nbody\n")
    # a second run of the same task replaces its result; another task's stays
    again = with_model_index(out, model_index("run-1", {"toy": {"exact_match": 0.5}, "other": {"acc": 0.1}}))
    results = yaml.safe_load(again.split("---\n")[1])["model-index"][0]["results"]
    assert [(r["task"]["name"], r["metrics"][0]["value"]) for r in results] == [("toy", 0.5), ("other", 0.1)]
    assert with_model_index("no front matter\n", index).startswith("---\nmodel-index:")


EVAL_VENV = Path(__file__).resolve().parents[2] / ".venv-eval"  # ddk[eval] beside .venv (scripts/setup.sh --test)

# `ddk eval --lm-eval` twice in one process of the eval venv: the task (stdout's JSON) and an unknown task (exit 2)
LM_EVAL_SCRIPT = r"""
import contextlib, io, json, sys
from ddk.cli import main
argv = json.loads(sys.argv[1])
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out):
    code = main(argv)
with contextlib.redirect_stderr(err):
    bad = main(argv[:2] + ["nope_task"] + argv[3:])
print(json.dumps({"code": code, "out": out.getvalue(), "bad": bad, "bad_err": err.getvalue()}))
"""


def eval_python() -> str:
    """The interpreter that has lm-eval: this one when it can import lm_eval and accelerate, else .venv-eval's
    (where `scripts/setup.sh --test` installs ddk[eval], so that .venv stays without scikit-learn). Neither: the
    test skips, unless DDK_REQUIRE_EVAL=1 (`make test` sets it), where it fails."""
    import importlib.util
    import os
    import sys

    if importlib.util.find_spec("lm_eval") and importlib.util.find_spec("accelerate"):
        return sys.executable
    if (EVAL_VENV / "bin" / "python").is_file():
        return str(EVAL_VENV / "bin" / "python")
    why = "lm-evaluation-harness is not installed (scripts/setup.sh --test, or pip install 'ddk[eval]')"
    if os.environ.get("DDK_REQUIRE_EVAL") == "1":
        pytest.fail(why)
    pytest.skip(why)


def test_lm_eval_on_a_local_jsonl_task_into_summary_and_card(kit, tmp_path):
    """A generate_until task defined over a local JSONL file (nothing downloaded: the hub is off): the references of
    rows 0, 2 and 3 are the kit teacher's greedy continuations (the hand loop, cut at the task's stop string), row 1
    is wrong, so exact_match is 3/4; the score lands in the run's summary.json and its card's model-index. An
    unknown task is exit 2 naming it. (`ddk eval --lm-eval` runs in a process of the interpreter that has ddk[eval].)"""
    import os
    import subprocess

    from transformers import AutoModelForCausalLM, AutoTokenizer

    python = eval_python()
    model = AutoModelForCausalLM.from_pretrained(kit / "teacher", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(kit / "teacher")
    questions = ["def main(", "The court held that the", "import numpy as", "The theorem states that"]
    refs = []
    for q in questions:
        ids = tok(q, add_special_tokens=False)["input_ids"]
        refs.append(tok.decode(hand_greedy(model, ids, 8, set())).split("\n")[0])
    refs[1] = "not this"
    (tmp_path / "toy.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                                                for q, a in zip(questions, refs)))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "toy.yaml").write_text(yaml.safe_dump({
        "task": "ddk_toy", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(tmp_path / "toy.jsonl")}}, "test_split": "test",
        "output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
        "target_delimiter": "", "generation_kwargs": {"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}))
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"steps": 2}))
    (run / "final" / "README.md").write_text("---\ntags:\n- ddk\n---\n\n# run\n")
    argv = ["eval", "--lm-eval", "ddk_toy", "--lm-eval-include", str(tmp_path / "tasks"), "--model",
            str(kit / "teacher"), "--run", str(run), "--batch-size", "2", "--json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    r = subprocess.run([python, "-c", LM_EVAL_SCRIPT, json.dumps(argv)], capture_output=True, text=True, env=env,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["code"] == 0, r.stderr[-3000:]
    out = json.loads(got["out"])
    assert out["lm_eval"]["ddk_toy"]["exact_match"] == pytest.approx(0.75)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["lm_eval"]["ddk_toy"]["exact_match"] == pytest.approx(0.75)
    meta = yaml.safe_load((run / "final" / "README.md").read_text().split("---\n")[1])
    assert meta["tags"] == ["ddk"]
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == pytest.approx(0.75)
    assert got["bad"] == 2 and "unknown task 'nope_task'" in got["bad_err"]


def test_lm_eval_flags_exit_2(kit, tmp_path, capsys):
    assert cli_main(["eval", "--lm-eval", " , ", "--model", str(kit / "teacher")]) == 2
    assert "--lm-eval" in capsys.readouterr().err
    assert cli_main(["eval", "--lm-eval", "x", "--model", str(kit / "teacher"), "--run", str(tmp_path / "no")]) == 2
    assert "--run" in capsys.readouterr().err
    assert cli_main(["eval", "--model", str(kit / "teacher")]) == 2
    assert "--data: required" in capsys.readouterr().err
    assert cli_main(["eval", "--tasks", "--lm-eval", "x", "--model", str(kit / "teacher")]) == 2
    assert "one at a time" in capsys.readouterr().err
