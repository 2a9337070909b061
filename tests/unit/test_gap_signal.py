"""mixture.signal (issues 27 item 4, 28 item 5): the accuracy and on-policy gaps mapped onto the controller's
losses, checked against hand computations from the definitions; their standard errors of log q (issue 24 for these
signals) against numpy references of the textbook delta method; the config and launch refusals (exit 2 naming the
key and the domains, before Ray)."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest

from ddk.errors import UsageError
from ddk.trainer.gap_signal import (accuracy_eps, accuracy_log_ratio_se, accuracy_losses, check_signal,
                                    onpolicy_losses)
from ddk.trainer.onpolicy_loss import onpolicy_gap
from ddk.vocab import SIGNAL_LABELS, SIGNALS, ratio


def test_one_list_of_signals_with_a_label_each():
    assert SIGNALS[0] == "ratio" and set(SIGNALS) == {"ratio", "accuracy", "onpolicy"}
    assert set(SIGNAL_LABELS) == set(SIGNALS)


def test_accuracy_eps_is_half_a_prompt():
    assert accuracy_eps(4) == 0.125 and accuracy_eps(1) == 0.5
    with pytest.raises(ValueError):
        accuracy_eps(0)


@pytest.mark.parametrize("student, teacher, q", [
    ((1, 4), (4, 4), (1 + 1 / 8) / (1 / 4 + 1 / 8)),  # = 3: the teacher all right, the student one in four
    ((0, 4), (4, 4), (1 + 1 / 8) / (1 / 8)),          # = 9: nothing right is finite
    ((0, 4), (0, 4), 1.0),                              # both wrong: no gap
    ((3, 4), (2, 4), (2 / 4 + 1 / 8) / (3 / 4 + 1 / 8)),  # the student ahead: q < 1
    ((5, 10), (9, 10), (0.9 + 0.05) / (0.5 + 0.05)),
])
def test_accuracies_map_onto_losses_whose_ratio_is_the_accuracy_gap(student, teacher, q):
    def outcomes(right_total):  # the per-prompt outcomes of a count: the first `right` prompts right
        return [1] * right_total[0] + [0] * (right_total[1] - right_total[0])

    s, t, _ = accuracy_losses({"d": outcomes(student)}, {"d": outcomes(teacher)})
    assert ratio(s, t)["d"] == pytest.approx(q, rel=1e-12)
    assert s["d"] >= 0 and t["d"] >= 0  # the controller takes losses >= 0
    n = student[1]
    eps = 1 / (2 * n)  # by hand: -log((acc + eps) / (1 + eps))
    assert s["d"] == pytest.approx(-math.log((student[0] / n + eps) / (1 + eps)), abs=1e-12)
    assert t["d"] == pytest.approx(-math.log((teacher[0] / n + eps) / (1 + eps)), abs=1e-12)


def test_accuracy_needs_the_same_prompts_for_both():
    with pytest.raises(ValueError, match="same prompts"):
        accuracy_losses({"d": [1, 0, 0, 0]}, {"d": [1, 0, 0, 0, 0]})


def test_onpolicy_losses_give_the_exponentiated_reverse_kl_by_hand():
    rows = [("a", [-1.0, -2.0], [-0.5, -1.0]), ("a", [-3.0], [-1.0]), ("b", [-0.25], [-0.75])]
    s, t, tokens, _ = onpolicy_losses(rows)
    # a: three completion tokens; the student side is the teacher's mean -log p_T = (0.5 + 1 + 1) / 3, the
    # teacher side the student's mean -log p_S = (1 + 2 + 3) / 3 (KL(S || T) = CE(S, T) - H(S))
    assert tokens == {"a": 3, "b": 1}
    assert s["a"] == pytest.approx(2.5 / 3) and t["a"] == pytest.approx(2.0)
    q = ratio(s, t)
    # q = exp(mean(log p_S - log p_T)) = exp(((-1 + 0.5) + (-2 + 1) + (-3 + 1)) / 3) = exp(-3.5 / 3)
    assert q["a"] == pytest.approx(math.exp(-3.5 / 3)) and q["b"] == pytest.approx(math.exp(0.5))
    assert q == pytest.approx(onpolicy_gap(rows))  # the same number as the on-policy module's gap


def test_onpolicy_domain_without_completion_tokens_has_no_gap():
    s, t, tokens, se = onpolicy_losses([("a", [], [])])
    assert tokens == {"a": 0} and ratio(s, t) == {"a": 1.0} and se == {"a": None}
    with pytest.raises(ValueError):
        onpolicy_losses([("a", [-1.0], [])])


# ---------------------------------------------------------------------------------------------------------
# the standard errors of log q (references: the textbook delta method, written out with numpy)


def _accuracy_se_reference(x_s, x_t) -> float:
    """The multivariate delta method for g(a_S, a_T) = log(a_T + eps) - log(a_S + eps) at the sample means of the
    paired outcomes: Var(g) = grad' Sigma grad, Sigma the covariance matrix of the two means (the sample covariance
    matrix of the pairs over n, n - 1 in its denominator), eps = 1 / (2n)."""
    x = np.vstack([np.asarray(x_s, float), np.asarray(x_t, float)])
    n = x.shape[1]
    eps = 1 / (2 * n)
    a_s, a_t = x.mean(axis=1)
    grad = np.array([-1 / (a_s + eps), 1 / (a_t + eps)])
    sigma = np.cov(x, ddof=1) / n
    return math.sqrt(grad @ sigma @ grad)


@pytest.mark.parametrize("x_s, x_t", [
    ([0, 0, 1], [1, 1, 0]),                      # disagreeing on every prompt: negative covariance
    ([1, 0, 1, 0, 1, 1], [1, 0, 1, 1, 1, 1]),    # agreeing mostly: the pairing shrinks the SE
    ([0, 0, 0, 1, 0, 0, 1, 0], [1, 1, 1, 1, 0, 1, 1, 1]),
    ([0, 1], [1, 1]),
])
def test_accuracy_se_is_the_paired_delta_method(x_s, x_t):
    got = accuracy_log_ratio_se(x_s, x_t)
    assert got == pytest.approx(_accuracy_se_reference(x_s, x_t), rel=1e-12) and got > 0
    s, t, se = accuracy_losses({"d": x_s}, {"d": x_t})
    assert se == {"d": got}


def test_accuracy_se_uses_the_pairing():
    # the same accuracies (1/2 and 3/4 of 4), paired differently: the student's right answers among the teacher's
    # (positive covariance) give a smaller SE than the two disjoint (negative covariance)
    together = accuracy_log_ratio_se([1, 1, 0, 0], [1, 1, 1, 0])
    apart = accuracy_log_ratio_se([1, 1, 0, 0], [0, 1, 1, 1])
    assert together < apart
    # by hand, n = 4, eps = 1/8: z_i = x_T / (7/8) - x_S / (5/8)
    z = np.array([1 / 0.875 - 1 / 0.625, 1 / 0.875 - 1 / 0.625, 1 / 0.875, 0.0])
    assert together == pytest.approx(math.sqrt(np.sum((z - z.mean()) ** 2) / (4 * 3)), rel=1e-12)


def test_accuracy_se_edge_cases():
    assert accuracy_log_ratio_se([1, 1, 1], [1, 1, 1]) == 0.0   # all right on both sides: no spread
    assert accuracy_log_ratio_se([0, 0], [1, 1]) == 0.0         # every pair alike: the binomial delta method's 0
    assert accuracy_log_ratio_se([1], [0]) is None               # one prompt: no SE, said so
    assert accuracy_losses({"d": [0]}, {"d": [1]})[2] == {"d": None}
    with pytest.raises(ValueError, match="same prompts"):
        accuracy_log_ratio_se([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="0 .* or 1"):
        accuracy_log_ratio_se([1, 2], [1, 0])


def test_accuracy_se_matches_the_spread_of_simulated_evaluations():
    # 4000 simulated evaluations of n = 200 paired prompts (student right 0.4, teacher 0.7, correlated): the SE
    # the formula gives matches the standard deviation of log q over the evaluations
    rng = np.random.default_rng(0)
    n, reps = 200, 4000
    u = rng.random((reps, n))
    x_t = (u < 0.7).astype(float)
    x_s = (u < 0.4).astype(float)  # right only where the teacher is (positive covariance)
    flip = rng.random((reps, n)) < 0.1
    x_s = np.where(flip, 1 - x_s, x_s)
    eps = 1 / (2 * n)
    log_q = np.log(x_t.mean(1) + eps) - np.log(x_s.mean(1) + eps)
    ses = [accuracy_log_ratio_se(x_s[i], x_t[i]) for i in range(200)]
    assert float(np.mean(ses)) == pytest.approx(float(np.std(log_q, ddof=1)), rel=0.1)


def _onpolicy_se_reference(rows) -> float:
    """The ratio estimator R = sum d_i / sum n_i over m completions (d_i: the completion's sum of log p_S -
    log p_T, n_i its tokens): Var(R) = (1 / (m nbar^2)) sum (d_i - R n_i)^2 / (m - 1)."""
    d = np.array([np.sum(np.subtract(s, t)) for _, s, t in rows])
    n = np.array([len(s) for _, s, _ in rows], float)
    m, r = len(d), d.sum() / n.sum()
    return math.sqrt(np.sum((d - r * n) ** 2) / (m - 1) / (m * n.mean() ** 2))


def test_onpolicy_se_is_the_ratio_estimators_with_each_completion_a_group():
    rows = [("a", [-1.0, -2.0], [-0.5, -1.0]), ("a", [-3.0], [-1.0]), ("a", [-0.2, -0.4, -0.1], [-0.3, -0.2, -2.0]),
            ("b", [-0.25], [-0.75]), ("c", [-1.0, -1.0], [-0.5, -0.5]), ("c", [-1.0, -1.0], [-0.5, -0.5])]
    s, t, tokens, se = onpolicy_losses(rows)
    assert se["a"] == pytest.approx(_onpolicy_se_reference(rows[:3]), rel=1e-12) and se["a"] > 0
    assert se["b"] is None                  # one completion: no SE
    assert se["c"] == pytest.approx(0.0, abs=1e-15)  # identical completions: no spread
    # the tokens of a completion are one group: the same tokens split into other completions give another SE
    split = [("a", [x], [y]) for _, s_, t_ in rows[:3] for x, y in zip(s_, t_)]
    assert onpolicy_losses(split)[3]["a"] == pytest.approx(_onpolicy_se_reference(split), rel=1e-12)
    assert onpolicy_losses(split)[3]["a"] != pytest.approx(se["a"], rel=1e-3)


# ---------------------------------------------------------------------------------------------------------
# refusals


def _domains(tmp_path):
    from ddk.data.domains import DomainSpec

    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                              "answer": "a"}) + "\n")
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "plain"}) + "\n")
    from ddk.data.tasks import parse_task

    return {"qa": DomainSpec(name="qa", files=[str(qa)], val_files=[str(qa)], task=parse_task("exact")),
            "chat": DomainSpec(name="chat", files=[str(qa)], val_files=[str(qa)]),
            "prose": DomainSpec(name="prose", files=[str(text)], val_files=[str(text)]),
            "noval": DomainSpec(name="noval", files=[str(qa)], task=parse_task("exact"))}


def _cfg(signal):
    from types import SimpleNamespace

    return SimpleNamespace(mixture=SimpleNamespace(signal=signal))


def test_check_signal_names_the_domains_it_cannot_measure(tmp_path):
    d = _domains(tmp_path)
    check_signal(_cfg("ratio"), list(d.values()))  # ratio: every domain will do
    check_signal(_cfg("accuracy"), [d["qa"]])
    check_signal(_cfg("onpolicy"), [d["qa"], d["chat"]])
    with pytest.raises(UsageError) as e:
        check_signal(_cfg("accuracy"), [d["qa"], d["chat"], d["noval"]])
    msg = str(e.value)
    assert msg.startswith("mixture.signal: accuracy") and "chat, noval" in msg and "qa" not in msg.split(";")[1]
    with pytest.raises(UsageError) as e:
        check_signal(_cfg("onpolicy"), [d["qa"], d["prose"]])
    assert str(e.value).startswith("mixture.signal: onpolicy") and "prose" in str(e.value)


def _train(kit, tmp_path, *sets: str) -> tuple[int, str]:
    from ddk.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["train", str(kit / "train.yaml"), "--set", f"output_dir={tmp_path / 'run'}",
                   *[x for s in sets for x in ("--set", s)]])
    return rc, err.getvalue().strip()


@pytest.mark.parametrize("sets, key", [
    (["mixture.signal=perplexity"], "mixture.signal: must be 'ratio', 'accuracy' or 'onpolicy'"),
    (["mixture.signal=onpolicy"], "mixture.signal: onpolicy needs kd.on_policy > 0"),
    (["mixture.signal=accuracy", "train.strategy=fsdp"], "mixture.signal: accuracy not with train.strategy fsdp"),
    (["mixture.signal=accuracy", "teacher.urls=[]", "mixture.policy=fixed", "kd.gamma=0"],
     "mixture.signal: accuracy needs teacher.urls"),
    # the kit's domains are plain text: no checker, no prompts (launch's check, before Ray)
    (["mixture.signal=accuracy", "teacher.urls=http://127.0.0.1:9"], "mixture.signal: accuracy needs a task checker"),
])
def test_bad_signal_config_exits_2_naming_the_key(kit, tmp_path, capsys, sets, key):
    import ray

    rc, err = _train(kit, tmp_path, *sets)
    err = err or capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and key in err, err
    assert not ray.is_initialized()


# ---------------------------------------------------------------------------------------------------------
# one in-process run (the Trainer, LocalContext) against the session's real teacher and controller servers

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
            "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}")


def _qa(i: int, answer: str | None = None) -> dict:
    return {"messages": [{"role": "user", "content": f"what is {i} mod 7"},
                         {"role": "assistant", "content": str(i % 7)}], "answer": str(i % 7) if answer is None else answer}


def _normal(text: str) -> str:
    """The exact check's rule, from its definition: strip, one space per whitespace run, casefold, no final '.'."""
    s = " ".join(text.split()).casefold()
    return s[:-1].rstrip() if s.endswith(".") else s


def _reference_answers(student_dir, teacher_url, tokenizer, questions, max_new):
    """The initial student's and the teacher's greedy answers to the questions, by hand: the template's text
    written out, the student's ``generate`` one prompt at a time, the teacher's ``/v1/generate``; both cut at eos."""
    import httpx
    import torch
    from transformers import AutoModelForCausalLM

    prompts = [tokenizer(f"user: what is {i} mod 7\nassistant: ", add_special_tokens=False)["input_ids"]
               for i in questions]
    stops = sorted({tokenizer.eos_token_id} | {tokenizer.get_vocab()[t] for t in ("</s>", "<|endoftext|>",
                                                                                  "<|im_end|>")
                                               if t in tokenizer.get_vocab()})
    model = AutoModelForCausalLM.from_pretrained(str(student_dir)).float().eval()
    student = []
    for p in prompts:
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=max_new, do_sample=False, eos_token_id=stops, pad_token_id=0)
        new = out[0, len(p):].tolist()
        new = new[:min([new.index(t) for t in stops if t in new], default=len(new))]
        student.append(tokenizer.decode(new, skip_special_tokens=True))
    r = httpx.post(f"{teacher_url}/v1/generate", json={"input_ids": prompts, "max_new_tokens": max_new,
                                                        "stop_ids": stops}, timeout=60)
    assert r.status_code == 200, r.text
    teacher = [tokenizer.decode(x["ids"], skip_special_tokens=True) for x in r.json()["sequences"]]
    return student, teacher


@pytest.mark.slow
def test_an_accuracy_run_posts_the_accuracy_gap_it_logged(kit, teacher_url, controller_url, tmp_path):
    """mixture.signal accuracy on a one-domain conversation run: the first evaluation's accuracies equal a hand
    computation (the reference answers below, judged by the exact rule), and every evaluation posts losses whose
    controller q equals (acc_T + eps) / (acc_S + eps), eps = 1 / (2n), from the accuracies the run logged, with
    log q's standard error (the first one the paired delta method's on the reference outcomes), which the
    controller stores."""
    import shutil

    import httpx
    import yaml
    from transformers import AutoTokenizer

    from ddk.trainer.config import load_config
    from ddk.trainer.launch import prepare
    from ddk.trainer.loop import LocalContext, Trainer

    student = tmp_path / "student"
    shutil.copytree(kit / "student", student)
    (student / "chat_template.jinja").write_text(TEMPLATE)
    tok = AutoTokenizer.from_pretrained(str(student))
    questions, max_new = [100, 101, 102], 3
    s_ans, t_ans = _reference_answers(student, teacher_url, tok, questions, max_new)
    # the rows' answers: the teacher's to the first two, the student's to the third: the accuracies by hand
    answers = [t_ans[0], t_ans[1], s_ans[2]]
    x_s = [int(_normal(a) == _normal(b)) for a, b in zip(s_ans, answers)]  # per prompt: 1 right, 0 wrong
    x_t = [int(_normal(a) == _normal(b)) for a, b in zip(t_ans, answers)]
    acc_s, acc_t = sum(x_s) / 3, sum(x_t) / 3
    if all(_normal(a) != _normal(b) for a, b in zip(s_ans, t_ans)):  # (so far always: q = 5/3 at step 0)
        assert (acc_s, acc_t) == (1 / 3, 2 / 3)
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(_qa(i)) + "\n" for i in range(24)))
    (tmp_path / "qa-val.jsonl").write_text("".join(json.dumps(_qa(i, a)) + "\n" for i, a in zip(questions, answers)))
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"domains": [
        {"name": "qa", "files": [str(tmp_path / "qa.jsonl")], "val_files": [str(tmp_path / "qa-val.jsonl")],
         "task": {"check": "exact", "field": "answer"}}]}))
    out, run_id = tmp_path / "run", "gap-signal-accuracy"
    cfg = load_config(kit / "train.yaml", [
        f"run_id={run_id}", f"output_dir={out}", f"teacher.urls=[{teacher_url}]", f"controller.url={controller_url}",
        f"student.model={student}", f"data.file={tmp_path / 'data.yaml'}", "data.seq_len=32",
        f"data.cache_dir={tmp_path / 'cache'}", "eval.sequences_per_domain=3", f"rollout.max_new_tokens={max_new}",
        "train.steps=2", "train.batch_size=2", "mixture.interval_steps=1", "checkpoint.every_steps=2",
        "mixture.signal=accuracy"])
    Trainer(prepare(cfg), LocalContext(cfg.output_dir)).fit()

    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [0, 1, 2]
    first = evals[0]["signal"]["accuracy"]["qa"]
    assert (first["student"], first["teacher"]) == (pytest.approx(acc_s), pytest.approx(acc_t)), (s_ans, t_ans)
    assert evals[0]["signal"]["log_ratio_se"]["qa"] == pytest.approx(_accuracy_se_reference(x_s, x_t), rel=1e-9,
                                                                      abs=1e-12)
    hist = {v["step"]: v for v in httpx.get(f"{controller_url}/v1/runs/{run_id}/history", timeout=10
                                            ).json()["versions"] if v["step"] is not None}
    for r in evals:
        acc = r["signal"]["accuracy"]["qa"]
        n = acc["total"]
        assert n == 3 and r["signal"]["signal"] == "accuracy" and acc["teacher"] == pytest.approx(acc_t)
        eps = 1 / (2 * n)
        want = (acc["teacher"] + eps) / (acc["student"] + eps)
        assert hist[r["step"]]["signal"] == "accuracy"
        assert hist[r["step"]]["ratio"]["qa"] == pytest.approx(want, rel=1e-12)
        assert r["signal"]["q"]["qa"] == pytest.approx(want, rel=1e-12)
        se = r["signal"]["log_ratio_se"]["qa"]  # n = 3 prompts: an SE (>= 0) every evaluation, posted and stored
        assert se is not None and se >= 0
        assert hist[r["step"]]["log_ratio_se"] == {"qa": pytest.approx(se, rel=1e-12)}
        assert "ratio" in r and "student_loss" in r  # the evaluator's perplexity numbers stay in the record
    assert httpx.get(f"{controller_url}/v1/runs/{run_id}", timeout=10).json()["signal"] == "accuracy"


@pytest.mark.slow
def test_the_onpolicy_signal_is_the_exponentiated_reverse_kl_on_the_students_text(kit, teacher_url, tmp_path):
    """GapSignal.measure for onpolicy (greedy rollouts, rollout.temperature 0) against a hand computation: the
    student's greedy completions one prompt at a time (eos included), log p_S from its forward pass, log p_T from the
    teacher service's target_logprob, q = exp(mean over completion tokens of (log p_S - log p_T))."""
    import shutil

    import torch
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ddk.teacher.client import TeacherClient
    from ddk.trainer.config import load_config
    from ddk.trainer.gap_signal import GapSignal

    student = tmp_path / "student"
    shutil.copytree(kit / "student", student)
    (student / "chat_template.jinja").write_text(TEMPLATE)
    questions, max_new = [100, 101, 102], 4
    (tmp_path / "qa-val.jsonl").write_text("".join(json.dumps(_qa(i)) + "\n" for i in questions))
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"domains": [
        {"name": "qa", "files": [str(tmp_path / "qa-val.jsonl")], "val_files": [str(tmp_path / "qa-val.jsonl")]}]}))
    cfg = load_config(kit / "train.yaml", [
        f"output_dir={tmp_path / 'run'}", f"teacher.urls=[{teacher_url}]", "controller.url=null",
        "mixture.policy=fixed", f"student.model={student}", f"data.file={tmp_path / 'data.yaml'}", "data.seq_len=32",
        "kd.on_policy=1", "mixture.signal=onpolicy", "rollout.temperature=0", f"rollout.max_new_tokens={max_new}",
        "eval.sequences_per_domain=3"])
    tok = AutoTokenizer.from_pretrained(str(student))
    model = AutoModelForCausalLM.from_pretrained(str(student)).float()
    gap = GapSignal(cfg, tok)
    try:
        rec = gap.measure(model)
    finally:
        gap.close()

    eos = model.config.eos_token_id
    diffs, seqs, prompt_lens, s_lp = [], [], [], []
    model.eval()
    for i in questions:
        p = tok(f"user: what is {i} mod 7\nassistant: ", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            new = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=0)[0, len(p):]
        new = new.tolist()
        new = new[:new.index(eos) + 1] if eos in new else new  # the eos the student wrote is one of its tokens
        seq = p + new
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([seq[:-1]])).logits[0].double(), -1)
        s_lp.append([float(logp[t - 1, seq[t]]) for t in range(len(p), len(seq))])
        seqs.append(seq)
        prompt_lens.append(len(p))
    with TeacherClient([teacher_url]) as teacher:
        outs = teacher.topk_ragged(seqs, 1)
    completions = []
    for s, out, P, seq in zip(s_lp, outs, prompt_lens, seqs):
        t = out.target_logprob.double().tolist()[P - 1:len(seq) - 1]
        diffs += [a - b for a, b in zip(s, t)]
        completions.append(("qa", s, t))
    want = math.exp(sum(diffs) / len(diffs))
    assert rec["signal"] == "onpolicy" and rec["tokens"] == {"qa": len(diffs)}
    assert rec["q"]["qa"] == pytest.approx(want, rel=1e-4)
    assert ratio(rec["student_loss"], rec["teacher_loss"])["qa"] == pytest.approx(want, rel=1e-4)
    assert rec["student_loss"]["qa"] > 0 and rec["teacher_loss"]["qa"] > 0
    # log q's SE: the ratio estimator over the 3 completions (each a group), from the hand computation
    assert rec["log_ratio_se"]["qa"] == pytest.approx(_onpolicy_se_reference(completions), rel=1e-3, abs=1e-6)
