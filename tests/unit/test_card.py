"""The model card of an export (ddk.trainer.card), from hand-written inputs: pure formatting."""

from __future__ import annotations

import yaml

from ddk.trainer.card import front_matter, license_of, mixture_history, model_card

DOMAINS = ["code", "math"]
CONFIG = {
    "run_id": "card-run", "seed": 3,
    "student": {"model": "org/student-start"},
    "teacher": {"urls": ["http://t1:8100", "http://t2:8100"]},
    "data": {"seq_len": 256},
    "train": {"steps": 40, "batch_size": 8, "lr": 0.0005, "warmup_steps": 4, "weight_decay": 0.0},
    "kd": {"gamma": 0.5, "temperature": 2.0, "top_k": 16, "loss": "forward_kl"},
    "mixture": {"policy": "ddk", "interval_steps": 20, "alpha": 0.5},
    "ray": {"num_workers": 2},
}
TEACHER = {"code": 2.0, "math": 1.5}
RECORDS = [
    {"event": "eval", "step": 0, "student_loss": {"code": 2.5, "math": 2.5}, "teacher_loss": TEACHER,
     "ratio": {"code": 1.6487, "math": 2.7183}, "version": 1, "weights": {"code": 0.3, "math": 0.7}},
    {"event": "step", "step": 1, "loss": 3.0},
    {"event": "eval", "step": 20, "student_loss": {"code": 2.4, "math": 2.0}, "teacher_loss": TEACHER,
     "ratio": {"code": 1.4918, "math": 1.6487}, "version": None, "weights": None},  # controller unreachable
    {"event": "weights", "step": 22, "eval_step": 20, "version": 2, "weights": {"code": 0.45, "math": 0.55}},
    {"event": "eval", "step": 40, "student_loss": {"code": 2.2, "math": 1.9}, "teacher_loss": TEACHER,
     "ratio": {"code": 1.2214, "math": 1.4918}, "version": 3, "weights": {"code": 0.48, "math": 0.52}},
    {"event": "end", "step": 40},
]


def _section(card: str, title: str) -> str:
    return card.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def test_the_card_opens_with_yaml_front_matter_naming_the_start_and_the_domains():
    card = model_card(CONFIG, RECORDS, DOMAINS, tokenizer_fingerprint="46fdec05be897be6", license="apache-2.0")
    assert card.startswith("---\n")
    head = card[4:].split("\n---\n", 1)[0]
    meta = yaml.safe_load(head)
    assert meta == {"base_model": "org/student-start", "datasets": ["code", "math"], "library_name": "transformers",
                    "tags": ["distillation", "ddk"], "license": "apache-2.0"}
    assert front_matter(card) == meta
    assert "# card-run" in card


def test_the_card_holds_the_teacher_and_the_config():
    card = model_card(CONFIG, RECORDS, DOMAINS, tokenizer_fingerprint="46fdec05be897be6")
    teacher = _section(card, "Teacher")
    assert "`http://t1:8100`, `http://t2:8100`" in teacher and "`46fdec05be897be6`" in teacher
    assert "code 2.0000, math 1.5000" in teacher
    config = _section(card, "Training config")
    for row in ("| policy | ddk |", "| gamma | 0.5 |", "| temperature | 2 |", "| top_k | 16 |",
                "| interval_steps | 20 |", "| steps | 40 |", "| lr | 0.0005 |",
                "| batch size | 8 sequences per worker x 2 workers |"):
        assert row in config, row


def test_the_mixture_history_has_every_evaluation_and_late_answer_and_the_ratios_before_and_after():
    card = model_card(CONFIG, RECORDS, DOMAINS)
    history = _section(card, "Mixture history")
    assert "| step | version | code | math |" in history
    assert "| 0 | 1 | 0.300 | 0.700 |" in history
    assert "| 20 | - | - | - |" in history  # the controller did not answer: the run kept its weights
    assert "| 22 (late answer to step 20) | 2 | 0.450 | 0.550 |" in history
    assert "| 40 | 3 | 0.480 | 0.520 |" in history
    ratios = _section(card, "Student/teacher perplexity ratio per domain")
    assert "before (step 0) and after (step 40)" in ratios
    assert "| code | 1.649 | 1.221 | 0.480 |" in ratios and "| math | 2.718 | 1.492 | 0.520 |" in ratios
    assert "Mean ratio: 2.183 before, 1.357 after." in ratios
    assert [h["step"] for h in mixture_history(RECORDS)] == [0, 20, 22, 40]


def test_license_is_omitted_when_unknown_and_read_from_the_starting_models_card():
    card = model_card(CONFIG, RECORDS, DOMAINS)
    assert "license" not in front_matter(card)
    assert license_of("---\nlicense: mit\ntags: [x]\n---\n# a model\n") == "mit"
    assert license_of("# a model without front matter\n") is None
    assert license_of("---\n: not: yaml: [\n---\n") is None
    assert license_of(None) is None


def test_a_run_without_evaluations_or_teacher_still_gets_a_valid_card():
    cfg = {**CONFIG, "teacher": {"urls": []}, "kd": {**CONFIG["kd"], "gamma": 0.0}}
    card = model_card(cfg, [], ["code"])
    assert front_matter(card)["datasets"] == ["code"]
    assert "continued pre-training" in card and "(none: no teacher)" in card
    assert "No evaluation was recorded." in card
    # domains default to those the evaluations name
    assert front_matter(model_card(CONFIG, RECORDS))["datasets"] == ["code", "math"]
