"""Pure parts of `ddk compare` and `ddk demo`: policy configs, aggregation over seeds, report tables."""

import json
import math

import pytest

from ddk.errors import UsageError
from ddk.experiments.compare import _se_table, policy_overrides
from ddk.experiments.tables import aggregate, format_markdown, format_report, format_weights_history, report_table


def test_policy_overrides_match_the_paper_baselines():
    natural = {"a": 0.75, "b": 0.25}
    assert policy_overrides("cpt", natural, None) == {
        "mixture.policy": "fixed", "mixture.initial_weights": natural, "kd.gamma": 0}
    assert policy_overrides("kd", natural, None) == {"mixture.policy": "fixed", "mixture.initial_weights": natural}
    # the config's own fixed mixture wins over the natural proportions
    assert policy_overrides("kd", natural, {"a": 0.5, "b": 0.5})["mixture.initial_weights"] == {"a": 0.5, "b": 0.5}
    # uniform: 1/N whatever the data's proportions or the config's mixture
    assert policy_overrides("kd_uniform", natural, {"a": 0.9, "b": 0.1}) == {
        "mixture.policy": "fixed", "mixture.initial_weights": {"a": 0.5, "b": 0.5}}
    assert policy_overrides("ddk", natural, None) == {"mixture.policy": "ddk"}
    assert policy_overrides("ddk_raw", natural, None) == {"mixture.policy": "ddk_raw"}
    with pytest.raises(UsageError, match="--policies"):
        policy_overrides("dkd", natural, None)


def test_arms_with_a_divergence():
    """``POLICY+LOSS`` arms: the policy's run with kd.loss set; cpt has no divergence; unknown ones are exit 2."""
    from ddk.errors import UsageError
    from ddk.experiments.tables import comparison_pairs

    natural = {"a": 0.25, "b": 0.75}
    assert policy_overrides("ddk+jsd", natural, None) == {"mixture.policy": "ddk", "kd.loss": "jsd"}
    assert policy_overrides("kd+reverse_kl", natural, None) == {"mixture.policy": "fixed",
                                                                "mixture.initial_weights": natural,
                                                                "kd.loss": "reverse_kl"}
    for bad in ("ddk+nope", "cpt+jsd", "nope+jsd"):
        with pytest.raises(UsageError, match="--policies"):
            policy_overrides(bad, natural, None)
    # steered arms with a divergence pair with the fixed arms and with the steered arms before them
    assert comparison_pairs(["kd", "ddk", "ddk+jsd"]) == [("ddk", "kd"), ("ddk+jsd", "kd"), ("ddk+jsd", "ddk")]


def test_aggregate_means_spreads_and_worst_domain():
    results = {
        "kd": [{"ratio": {"a": 1.2, "b": 2.0}, "tokens": {"a": 30, "b": 10}},
               {"ratio": {"a": 1.4, "b": 1.8}, "tokens": {"a": 34, "b": 6}}],
        "ddk": [{"ratio": {"a": 1.3, "b": 1.5}, "tokens": {"a": 10, "b": 30}}],
    }
    agg = aggregate(results, ["a", "b"])
    assert agg["kd"]["ratio"]["a"]["mean"] == pytest.approx(1.3)
    assert agg["kd"]["ratio"]["a"]["spread"] == pytest.approx(0.1)
    assert agg["kd"]["mean_ratio"] == pytest.approx((1.6 + 1.6) / 2)
    assert agg["kd"]["worst_domain"] == "b" and agg["kd"]["worst_ratio"] == pytest.approx(1.9)
    assert agg["kd"]["tokens"] == {"a": 32, "b": 8}
    assert agg["ddk"]["ratio"]["b"]["spread"] == 0.0 and agg["ddk"]["seeds"] == 1
    report = format_report(agg, ["a", "b"], {"a": 1.5, "b": 2.5}, "ddk compare x", "note")
    assert "| kd |" in report and "| ddk |" in report and "lowest mean ratio: **ddk** (1.400)" in report
    # the most-lagging domain is b (2.5); ddk lowered it by 1.0, kd by 0.6
    assert "(b, initial ratio 2.500): **ddk**" in report


def test_report_verdicts_count_differences_within_the_seed_spread_as_none():
    def runs(*means):  # one policy, one seed per mean, both domains at that ratio
        return [{"ratio": {"a": m, "b": m}, "tokens": {"a": 1, "b": 1}} for m in means]

    agg = aggregate({"ddk": runs(1.10, 1.12), "ddk_raw": runs(1.115), "kd_uniform": runs(1.20, 1.22)}, ["a", "b"])
    report = format_report(agg, ["a", "b"], {"a": 1.5, "b": 1.5}, "ddk compare x", "note")
    # ddk 1.11 +- 0.01 vs ddk_raw 1.115: inside the spread
    assert "smoothing: ddk 1.1100 vs ddk_raw 1.1150 mean ratio (no measurable difference" in report
    # ddk 1.11 vs kd_uniform 1.21 +- 0.01: outside it
    assert "uniform mixture: ddk 1.1100 vs kd_uniform 1.2100 mean ratio (ddk better" in report
    agg = aggregate({"ddk": runs(1.30), "kd_uniform": runs(1.20)}, ["a", "b"])
    assert "(ddk not better" in format_report(agg, ["a", "b"], {"a": 1.5, "b": 1.5}, "c", "n")


def test_scoring_and_steering_sets_share_no_document():
    import numpy as np

    from ddk.data.domains import PackedDomain
    from ddk.data.evalset import evaluation_set

    rng = np.random.default_rng(0)
    val = rng.integers(0, 1000, (200, 9))
    d = PackedDomain("a", val, val)
    steer, score = evaluation_set(d, 40, part="steer"), evaluation_set(d, 40, part="score")
    assert len(steer) == len(score) == 40
    assert not set(steer.docs.tolist()) & set(score.docs.tolist())


def test_se_table_gives_each_run_its_ratio_and_se():
    results = {"ddk": [{"seed": 0, "ratio": {"a": 1.5, "b": 2.0}, "ratio_log_se": {"a": 0.0123}}]}
    table = _se_table(["a", "b"], results)
    assert "| ddk s0 | 1.500 +- 0.012 | 2.000 (n/a) |" in table


def test_demo_report_rows():
    rows = report_table({"a": 1.0}, {"a": 2.0}, {"a": 1.5})
    r = rows[0]
    assert r["teacher_ppl"] == pytest.approx(math.e)
    assert r["ratio_before"] == pytest.approx(math.e) and r["ratio_after"] == pytest.approx(math.exp(0.5))
    assert "| a | 2.72 | 7.39 | 4.48 | 2.718 | 1.649 |" in format_markdown(rows)
    # with the log-ratios' standard errors where the run had them: "ratio +- SE of its log", as compare writes it
    with_se = report_table({"a": 1.0, "b": 1.0}, {"a": 2.0, "b": 1.0}, {"a": 1.5, "b": 1.0}, {"a": 0.1}, {"b": 0.05})
    table = format_markdown(with_se)
    assert "| a | 2.72 | 7.39 | 4.48 | 2.718 +- 0.100 | 1.649 |" in table
    assert "| b | 2.72 | 2.72 | 2.72 | 1.000 | 1.000 +- 0.050 |" in table
    hist = {"versions": [{"version": 0, "step": 0, "weights": {"a": 0.5, "b": 0.5}},
                         {"version": 1, "step": 0, "weights": {"a": 0.25, "b": 0.75}}]}
    assert "| 1 | 0 | 0.250 | 0.750 |" in format_weights_history(hist)


def test_demo_reads_before_and_after_from_the_runs_own_evaluations(tmp_path):
    """The demo's table comes from metrics.jsonl: the first evaluation's teacher and student losses, the last
    evaluation's student loss; a step evaluated again by a rerun after a kill counts once (its last record)."""
    from ddk.experiments.demo import evaluated_losses

    records = [
        {"event": "eval", "step": 0, "student_loss": {"a": 9.0}, "teacher_loss": {"a": 9.5}},  # killed attempt
        {"event": "eval", "step": 0, "student_loss": {"a": 3.0}, "teacher_loss": {"a": 1.0},  # the rerun's
         "log_ratio_se": {"a": 0.25}},
        {"event": "step", "step": 1, "loss": 2.5},
        {"event": "eval", "step": 4, "student_loss": {"a": 2.5}, "teacher_loss": {"a": 1.0}},
        {"event": "eval", "step": 8, "student_loss": {"a": 2.0}, "teacher_loss": {"a": 1.0},
         "log_ratio_se": {"a": None}},  # one document: no SE
        {"event": "end", "step": 8},
    ]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert evaluated_losses(metrics) == ({"a": 1.0}, {"a": 3.0}, {"a": 2.0}, {"a": 0.25}, {})
    metrics.write_text(json.dumps({"event": "step", "step": 1, "loss": 2.5}) + "\n")
    with pytest.raises(RuntimeError, match="no evaluation"):
        evaluated_losses(metrics)


def _acc_results():
    """Two policies, three seeds, task accuracy on add and sort (hand-made summaries)."""
    kd = [{"add": 0.50, "sort": 0.20}, {"add": 0.60, "sort": 0.30}, {"add": 0.55, "sort": 0.10}]
    ddk = [{"add": 0.70, "sort": 0.40}, {"add": 0.80, "sort": 0.40}, {"add": 0.75, "sort": 0.30}]

    def runs(accs):
        return [{"seed": s, "ratio": {"add": 1.2, "sort": 1.5}, "tokens": {"add": 1, "sort": 1}, "accuracy": a}
                for s, a in enumerate(accs)]
    return {"kd": runs(kd), "ddk": runs(ddk)}


def test_compare_task_accuracy_per_domain_mean_worst_and_paired_intervals():
    """Reference by hand: kd's add 0.55 ± 0.05, sort 0.20 ± 0.10; per-seed means 0.35, 0.45, 0.325 -> 0.375 ±
    0.0625; worst domain sort. ddk - kd per seed on the mean: 0.20, 0.15, 0.20 -> mean 0.18333, sd 0.028868,
    t(0.975, 2) = 4.302653, half-width 0.071711 -> [0.11162, 0.25504]: ddk beats kd (higher accuracy is better).
    Worst domain's accuracy per seed: kd 0.2, 0.3, 0.1; ddk 0.4, 0.4, 0.3 -> 0.2, 0.1, 0.2: mean 0.16667, sd
    0.057735, half-width 0.143422 -> [0.02324, 0.31009]."""
    from ddk.experiments.tables import paired_comparisons

    results = _acc_results()
    agg = aggregate(results, ["add", "sort"])
    kd = agg["kd"]
    assert kd["accuracy"]["add"] == {"mean": pytest.approx(0.55), "spread": pytest.approx(0.05)}
    assert kd["accuracy"]["sort"] == {"mean": pytest.approx(0.20), "spread": pytest.approx(0.10)}
    assert kd["mean_accuracy"] == pytest.approx(0.375) and kd["mean_accuracy_spread"] == pytest.approx(0.0625)
    assert kd["worst_accuracy_domain"] == "sort" and kd["worst_accuracy"] == pytest.approx(0.20)
    assert agg["ddk"]["mean_accuracy"] == pytest.approx((0.55 + 0.60 + 0.525) / 3)
    comps = {c["metric"]: c for c in paired_comparisons(results, ["add", "sort"])}
    mean = comps["mean_accuracy"]
    assert (mean["policy"], mean["baseline"], mean["n"]) == ("ddk", "kd", 3)
    assert mean["mean"] == pytest.approx(0.183333, abs=1e-6) and mean["sd"] == pytest.approx(0.028868, abs=1e-6)
    assert mean["low"] == pytest.approx(0.11162, abs=1e-5) and mean["high"] == pytest.approx(0.25504, abs=1e-5)
    assert mean["claim"] == "ddk beats kd on the mean task accuracy" and mean["higher_is_better"]
    worst = comps["worst_accuracy"]
    assert worst["low"] == pytest.approx(0.02324, abs=1e-5) and worst["high"] == pytest.approx(0.31009, abs=1e-5)
    assert worst["claim"] == "ddk beats kd on the worst domain's task accuracy"
    # the ratios are the same in every run: no claim there
    assert comps["mean_ratio"]["claim"] == "no difference measurable at 3 seeds"
    report = format_report(agg, ["add", "sort"], {"add": 1.5, "sort": 2.0}, "ddk compare x", "note",
                           paired_comparisons(results, ["add", "sort"]))
    assert "## Task accuracy per domain" in report
    assert "| kd | 0.550 ± 0.050 | 0.200 ± 0.100 | 0.375 ± 0.062 | sort (0.200) |" in report
    assert "| ddk | kd | mean_accuracy | +0.1833 | [+0.1116, +0.2550] | 3 | ddk beats kd on the mean task accuracy |" \
        in report


def test_compare_without_accuracy_in_every_run_reports_none():
    from ddk.experiments.tables import paired_comparisons

    results = _acc_results()
    del results["kd"][1]["accuracy"]
    agg = aggregate(results, ["add", "sort"])
    assert not any("accuracy" in a for a in agg.values())
    assert not any(c["metric"].endswith("accuracy") for c in paired_comparisons(results, ["add", "sort"]))
    assert "Task accuracy" not in format_report(agg, ["add", "sort"], {"add": 1.5, "sort": 2.0}, "c", "n")


def test_lower_accuracy_loses_the_claim():
    from ddk.experiments.stats import claim, paired_difference

    diff = paired_difference([0.5, 0.4, 0.45], [0.7, 0.65, 0.72])
    assert diff["excludes_zero"] and diff["high"] < 0
    assert claim(diff, "ddk", "kd", "the mean task accuracy", higher_is_better=True) == \
        "kd beats ddk on the mean task accuracy"
    assert claim(diff, "ddk", "kd", "the mean") == "ddk beats kd on the mean"


def test_summary_accuracy_reads_the_runs_task_accuracy(tmp_path):
    from ddk.experiments.compare import summary_accuracy

    p = tmp_path / "summary.json"
    p.write_text(json.dumps({"steps": 3, "task_accuracy": {"add": {"accuracy": 0.75, "correct": 3, "total": 4},
                                                           "sort": 0.5}}))
    assert summary_accuracy(p) == {"accuracy": {"add": 0.75, "sort": 0.5}}
    p.write_text(json.dumps({"steps": 3}))
    assert summary_accuracy(p) == {}
    p.write_text(json.dumps({"task_accuracy": {"add": 1.5}}))
    assert summary_accuracy(p) == {}  # not an accuracy: a warning, and no accuracy for this run
    assert summary_accuracy(tmp_path / "absent.json") == {}


def test_seqkd_and_onpolicy_arms_and_their_pairs():
    """``seqkd`` is cpt's run (CE only, natural mixture; compare adds data.file); ``ARM@onpolicy`` the arm with
    kd.on_policy 1 and the hf engine; unknown modifiers and modifiers on CE-only arms are exit 2 listing the allowed
    ones; the variants pair with kd and ddk."""
    from ddk.experiments.compare import arm_slug
    from ddk.experiments.tables import comparison_pairs

    natural = {"a": 0.75, "b": 0.25}
    assert policy_overrides("seqkd", natural, None) == {
        "mixture.policy": "fixed", "mixture.initial_weights": natural, "kd.gamma": 0}
    assert policy_overrides("ddk@onpolicy", natural, None) == {
        "mixture.policy": "ddk", "kd.on_policy": 1, "rollout.engine": "hf"}
    assert policy_overrides("kd_uniform@onpolicy", natural, None) == {
        "mixture.policy": "fixed", "mixture.initial_weights": {"a": 0.5, "b": 0.5}, "kd.on_policy": 1,
        "rollout.engine": "hf"}
    assert policy_overrides("ddk+jsd@onpolicy", natural, None)["kd.loss"] == "jsd"
    with pytest.raises(UsageError, match="unknown arm modifier @offpolicy .*choose from @onpolicy"):
        policy_overrides("ddk@offpolicy", natural, None)
    for bad in ("cpt@onpolicy", "seqkd@onpolicy", "seqkd+jsd"):
        with pytest.raises(UsageError, match="--policies"):
            policy_overrides(bad, natural, None)
    with pytest.raises(UsageError, match="unknown policy 'nope'"):
        policy_overrides("nope@onpolicy", natural, None)
    assert arm_slug("kd_uniform@onpolicy") == "kd_uniform-onpolicy" and arm_slug("ddk+jsd") == "ddk.jsd"
    arms = ["cpt", "kd", "kd_uniform", "ddk", "seqkd", "ddk@onpolicy", "kd_uniform@onpolicy"]
    pairs = comparison_pairs(arms)
    # steered ddk against every fixed arm; ddk@onpolicy (steered) against them and ddk; the fixed variants vs kd
    for want in [("ddk", "kd"), ("ddk", "seqkd"), ("ddk", "kd_uniform@onpolicy"), ("ddk@onpolicy", "kd"),
                 ("ddk@onpolicy", "ddk"), ("seqkd", "kd"), ("kd_uniform@onpolicy", "kd")]:
        assert want in pairs, want
    assert ("seqkd", "ddk") not in pairs and ("kd_uniform", "kd") not in pairs and len(pairs) == len(set(pairs))
    assert comparison_pairs(["cpt", "kd"]) == []


def test_wall_table_per_arm():
    from ddk.experiments.tables import format_wall

    results = {"kd": [{"wall_s": 60.0, "load_avg": 3.0}, {"wall_s": 80.0, "load_avg": 5.5}], "cpt": [{}]}
    lines = format_wall(results)
    assert "| kd | 2 | 70 | 60-80 | 3.0-5.5 |" in lines and not any(line.startswith("| cpt") for line in lines)
    assert format_wall({"cpt": [{}]}) == []


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A random 2-layer Llama over the chat kit's char-level ChatML tokenizer, saved as a model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ddk.kit.chat import chat_tokenizer

    root = tmp_path_factory.mktemp("chat-model")
    tok = chat_tokenizer(256)
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                      eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(root / "final")
    tok.save_pretrained(root / "final")
    return root, model, tok


def _hand_answer(model, tok, question: str, max_new: int) -> str:
    """Greedy from its definition on a ChatML prompt written by hand: the whole sequence each step, stop at
    <|im_end|> or eos."""
    import torch

    ids = tok(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    stops = {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id}
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt in stops:
                break
            out.append(nxt)
    return tok.decode(out, skip_special_tokens=True)


def _chat_data(tmp_path, rows):
    import yaml

    for name in ("qa", "prose"):
        (tmp_path / name).mkdir()
    (tmp_path / "qa" / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "qa" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "prose" / "train.jsonl").write_text('{"text": "some prose here"}\n' * 4)
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"domains": [
        {"name": "qa", "files": ["qa/train.jsonl"], "val_files": ["qa/val.jsonl"], "task": "exact"},
        {"name": "prose", "files": ["prose/train.jsonl"]}]}))
    from ddk.data.domains import load_domain_specs

    return load_domain_specs(tmp_path / "data.yaml")


def test_compare_writes_task_accuracy_into_the_runs_summary(chat_model, tmp_path):
    """A run folder (summary.json + final/): compare's step writes ``task_accuracy`` counted by hand: rows 0 and 2
    carry the model's own greedy answers (hand loop), row 1 a wrong one -> 2/3; the text domain is not judged;
    a summary that has the field is left alone."""
    from ddk.experiments.compare import fill_task_accuracy, summary_accuracy

    root, model, tok = chat_model
    qs = ["What is 2 + 3?", "Sort: 4 1 3", "Reverse: cat"]
    refs = [_hand_answer(model, tok, q, 12) for q in qs]
    refs[1] = "certainly not this"
    specs = _chat_data(tmp_path, [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "x"}],
                                   "answer": a} for q, a in zip(qs, refs)])
    (root / "summary.json").write_text(json.dumps({"steps": 3}))
    got = fill_task_accuracy(root, specs, max_new=12)
    assert got == {"qa": {"accuracy": pytest.approx(2 / 3), "correct": 2, "total": 3, "check": "exact"}}
    assert summary_accuracy(root / "summary.json") == {"accuracy": {"qa": pytest.approx(2 / 3)}}
    assert json.loads((root / "summary.json").read_text())["steps"] == 3
    (root / "summary.json").write_text(json.dumps({"task_accuracy": {"qa": 0.25}}))
    assert fill_task_accuracy(root, specs) == {"qa": 0.25}  # there already: not evaluated again


def test_seqkd_data_holds_the_teachers_answers(chat_model, tmp_path):
    """The teacher (here a function answering by the question written in the prompt ids) answers every training
    prompt once; the rows carry its answers, an empty answer is left out and counted, the validation files and the
    checker stay, the text domain keeps its files, and a second call reuses the data without asking again."""
    from ddk.data.domains import load_domain_specs
    from ddk.experiments.seqkd import seqkd_data

    _, _, tok = chat_model
    qs = ["What is 2 + 3?", "Sort: 4 1 3", "Reverse: cat"]
    teacher = {"What is 2 + 3?": "5", "Sort: 4 1 3": "1 3 4", "Reverse: cat": ""}
    specs = _chat_data(tmp_path, [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "x"}],
                                   "answer": "ref"} for q in qs])
    asked = []

    def generate(ids):
        asked.extend(ids)
        texts = [tok.decode(x) for x in ids]
        answers = [next(a for q, a in teacher.items() if q in t) for t in texts]
        return [(tok(a, add_special_tokens=False)["input_ids"], "stop") for a in answers]

    out = tmp_path / "cmp"
    path = seqkd_data(specs, out, tok, generate, "teacher-1", progress=lambda line: None)
    assert len(asked) == 3 and tok.decode(asked[0]).endswith("<|im_start|>assistant\n")
    rows = [json.loads(line) for line in (out / "seqkd" / "data" / "qa" / "train.jsonl").read_text().splitlines()]
    assert [r["messages"][-1] for r in rows] == [{"role": "assistant", "content": "5"},
                                                 {"role": "assistant", "content": "1 3 4"}]
    assert rows[0]["messages"][0] == {"role": "user", "content": qs[0]} and rows[0]["answer"] == "ref"
    assert json.loads((out / "seqkd" / "manifest.json").read_text())["domains"]["qa"] == {"rows": 2,
                                                                                        "empty_answers": 1}
    new = {s.name: s for s in load_domain_specs(path)}
    assert new["qa"].val_files == specs[0].val_files and new["qa"].task == specs[0].task
    assert new["prose"].files == specs[1].files
    asked.clear()
    assert seqkd_data(specs, out, tok, generate, "teacher-1", progress=lambda line: None) == path and not asked
    seqkd_data(specs, out, tok, generate, "teacher-2", progress=lambda line: None)  # another teacher: again
    assert len(asked) == 3
