"""Train config: defaults, --set overrides, path resolution, and one-line errors naming the dotted key."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from ddk.errors import UsageError
from ddk.trainer.config import TrainConfig, config_to_dict, load_config, validate_config


@pytest.fixture
def setup(tmp_path):
    """A config dir with a student dir and a data.yaml next to the config file."""
    cfg_dir = tmp_path / "conf"
    (cfg_dir / "student").mkdir(parents=True)
    (cfg_dir / "data.yaml").write_text("domains: []\n")
    (cfg_dir / "token").write_text("secret\n")
    base = {
        "run_id": "r1",
        "teacher": {"urls": ["http://127.0.0.1:8100"]},
        "controller": {"url": "http://127.0.0.1:8200"},
        "student": {"model": "student"},
        "data": {"file": "data.yaml"},
        "train": {"steps": 10},
    }

    def write(raw=None, **changes) -> Path:
        raw = json.loads(json.dumps(raw if raw is not None else base))
        for dotted, value in changes.items():
            node = raw
            *parents, leaf = dotted.split("__")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        path = cfg_dir / "train.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    return cfg_dir, write


def usage_message(path, overrides=()):
    with pytest.raises(UsageError) as e:
        load_config(str(path), list(overrides))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_defaults_and_paths(setup, monkeypatch, tmp_path):
    cfg_dir, write = setup
    monkeypatch.chdir(tmp_path)
    cfg = load_config(str(write()))
    assert isinstance(cfg, TrainConfig)
    assert cfg.student.model == str(cfg_dir / "student")          # against the config file's dir
    assert cfg.data.file == str(cfg_dir / "data.yaml")
    assert cfg.output_dir == str(tmp_path / "runs" / "r1")        # default: ./runs/<run_id>
    assert (cfg.data.seq_len, cfg.train.batch_size, cfg.train.lr, cfg.train.warmup_steps) == (128, 8, 3e-4, 0)
    assert (cfg.train.weight_decay, cfg.train.grad_clip) == (0.0, 1.0)
    assert (cfg.kd.gamma, cfg.kd.temperature, cfg.kd.top_k) == (0.2, 1.0, 16)
    assert (cfg.mixture.policy, cfg.mixture.interval_steps, cfg.mixture.alpha) == ("ddk", 1000, 0.5)
    assert cfg.mixture.initial_weights is None
    assert (cfg.eval.sequences_per_domain, cfg.eval.batch_size) == (32, 16)
    assert (cfg.ray.address, cfg.ray.num_workers, cfg.ray.use_gpu) == ("", 2, False)
    assert (cfg.checkpoint.every_steps, cfg.checkpoint.keep, cfg.seed) == (100, 2, 0)
    assert cfg.cpt is False


def test_overrides_parse_yaml_and_resolve_against_cwd(setup, monkeypatch, tmp_path):
    cfg_dir, write = setup
    work = tmp_path / "work"
    (work / "other-student").mkdir(parents=True)
    monkeypatch.chdir(work)
    cfg = load_config(str(write(output_dir="out")), [
        "train.steps=25", "train.lr=1e-3", "teacher.urls=[http://a:1, http://b:2]",
        "student.model=other-student", "mixture.initial_weights={x: 1, y: 3}", "ray.use_gpu=true",
        "seed=5"])
    assert cfg.train.steps == 25 and cfg.train.lr == 1e-3 and cfg.seed == 5 and cfg.ray.use_gpu is True
    assert cfg.teacher.urls == ["http://a:1", "http://b:2"]
    assert cfg.student.model == str(work / "other-student")        # --set: against the cwd
    assert cfg.output_dir == str(cfg_dir / "out")                  # in the file: against its dir
    assert cfg.mixture.initial_weights == {"x": 1.0, "y": 3.0}


def test_inline_domains_resolve_against_config_dir(setup):
    cfg_dir, write = setup
    (cfg_dir / "a.jsonl").write_text('{"text": "x"}\n')
    path = write(data={"domains": [{"name": "a", "files": ["a.jsonl"]}], "seq_len": 16})
    cfg = load_config(str(path))
    assert cfg.data.domains[0].files == [str(cfg_dir / "a.jsonl")]
    assert cfg.data.file is None and cfg.data.seq_len == 16


def test_cpt_needs_no_teacher(setup):
    _, write = setup
    cfg = load_config(str(write(teacher={}, controller={}, kd__gamma=0, mixture__policy="fixed")))
    assert cfg.cpt is True and cfg.teacher.urls == []


def test_config_to_dict_round_trips(setup):
    _, write = setup
    cfg = load_config(str(write()), ["mixture.initial_weights={a: 1}"])
    d = config_to_dict(cfg)
    json.dumps(d)
    assert validate_config(yaml.safe_load(yaml.safe_dump(d))) == cfg


@pytest.mark.parametrize("changes, overrides, key", [
    ({"train__steps": 0}, [], "train.steps: must be greater than 0"),
    ({}, ["train.steps=-3"], "train.steps: must be greater than 0"),
    ({"kd__gama": 0.3}, [], "kd.gama: unknown key"),
    ({}, ["trian.steps=3"], "trian.steps: unknown key"),
    ({}, ["train.batchsize=3"], "train.batchsize: unknown key"),
    ({"run_id": "bad id!"}, [], "run_id:"),
    ({"mixture__policy": "smooth"}, [], "mixture.policy:"),
    ({"mixture__alpha": 1.5}, [], "mixture.alpha:"),
    ({"mixture__initial_weights": {"a": -1}}, [], "mixture.initial_weights:"),
    ({"kd__temperature": 0}, [], "kd.temperature:"),
    ({"train__lr": "fast"}, [], "train.lr:"),
    ({"teacher": {}}, [], "teacher.urls: required when kd.gamma > 0"),
    ({"controller": {}}, [], "controller.url: required for mixture.policy ddk"),
    ({"data": {"file": "data.yaml", "domains": [{"name": "a", "files": ["x"]}]}}, [], "data:"),
    ({"data": {"seq_len": 64}}, [], "data:"),
    ({"student": {}}, [], "student.model: is required"),
    ({"student": {"model": "missing-dir"}}, [], "student.model: no such directory"),
    ({"data": {"file": "nope.yaml"}}, [], "data.file: no such file"),
    ({"controller": {"url": "http://x", "token_file": "nope"}}, [], "controller.token_file:"),
    ({"teacher": {"urls": ["http://x"], "token_file": "nope"}}, [], "teacher.token_file: no such file"),
    ({}, ["train.steps"], "--set train.steps: expected KEY=VALUE"),
    ({}, ["train.steps=[1"], "train.steps: value is not valid YAML"),
    ({}, ["ray.max_failures=-1"], "ray.max_failures: must be greater than or equal to 0"),
])
def test_errors_name_the_key(setup, changes, overrides, key):
    _, write = setup
    msg = usage_message(write(**changes), overrides)
    assert msg.startswith(key), msg


@pytest.mark.parametrize("run_id, ok", [
    ("r", True), ("a" * 128, True), ("7.run_x-1", True),     # ddk.vocab's rule, the controller's too
    ("a" * 129, False), (".hidden", False), ("-x", False), ("_x", False), ("bad id!", False), ("a/b", False),
])
def test_run_id_follows_the_shared_rule(setup, run_id, ok):
    from ddk.vocab import RUN_ID_RULE, is_run_id

    _, write = setup
    assert is_run_id(run_id) is ok
    if ok:
        assert load_config(str(write(run_id=run_id))).run_id == run_id
    else:
        assert usage_message(write(run_id=run_id)) == f"run_id: must be {RUN_ID_RULE}"


def test_train_sections_read_data_and_eval_alone(tmp_path):
    """The data and eval sections of a train config, through the same models and path rules (ddk eval)."""
    from ddk.trainer.config import is_train_config, load_train_sections, train_sections

    (tmp_path / "train.yaml").write_text(yaml.safe_dump({"run_id": "r", "data": {"file": "data.yaml", "seq_len": 32},
                                                         "eval": {"sequences_per_domain": 5}}))
    s = load_train_sections(tmp_path / "train.yaml")
    assert s.data.file == str(tmp_path / "data.yaml") and s.data.seq_len == 32
    assert s.eval.sequences_per_domain == 5 and s.data.source() == str(tmp_path / "data.yaml")
    s = train_sections({"data": {"domains": [{"name": "a", "files": "a.jsonl"}]}}, tmp_path)
    assert (s.data.seq_len, s.eval.sequences_per_domain) == (128, 32)  # TrainConfig's defaults
    assert s.data.source() == {"domains": [{"name": "a", "files": [str(tmp_path / "a.jsonl")]}], "val_fraction": 0.05}
    assert not is_train_config({"domains": []}) and is_train_config({"data": {}})
    (tmp_path / "data.yaml").write_text("domains: []\n")
    assert load_train_sections(tmp_path / "data.yaml") is None
    with pytest.raises(UsageError, match=r"^data.seq_len: must be greater than 1"):
        train_sections({"data": {"file": "x", "seq_len": 1}}, tmp_path)
    with pytest.raises(UsageError, match="neither data.file nor data.domains"):
        train_sections({"data": {"seq_len": 8}}, tmp_path)


def test_missing_train_section(setup):
    cfg_dir, write = setup
    raw = {"run_id": "r", "student": {"model": "student"}, "data": {"file": "data.yaml"}, "kd": {"gamma": 0},
           "mixture": {"policy": "fixed"}}
    assert usage_message(write(raw)).startswith("train: is required")


def test_unreadable_or_bad_files(tmp_path):
    assert "cannot read" in usage_message(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_id: [unclosed\n")
    assert "not valid YAML" in usage_message(bad)
    bad.write_text("- a\n- b\n")
    assert "mapping" in usage_message(bad)
    bad.write_text("runid: x\n")
    assert usage_message(bad).startswith("runid: unknown key")


@pytest.mark.skipif(importlib.util.find_spec("ddk.trainer.launch") is None,
                    reason="services/trainer/launch.py not written yet")
def test_cli_train_bad_config_exits_2(setup, capsys):
    from ddk.cli import main

    _, write = setup
    assert main(["train", str(write(train__steps=0))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.steps" in err


def test_a_data_job_checks_data_student_and_ray_not_the_run(setup, tmp_path, monkeypatch):
    """load_config(for_job="data"), what `ddk data prepare|inspect` read: no teacher or controller needed (issue 25),
    while the data section, student.model and ray are checked as for `ddk train`."""
    from ddk.trainer.config import DataJobConfig

    cfg_dir, write = setup
    monkeypatch.chdir(tmp_path)
    no_teacher = write(teacher={}, controller={})  # kd.gamma 0.2 and policy ddk by default: a run needs a teacher
    assert usage_message(no_teacher).startswith("teacher.urls: required when kd.gamma > 0")
    assert usage_message(no_teacher, ["kd.gamma=0"]).startswith("teacher.urls: required for mixture.policy ddk")
    job = load_config(str(no_teacher), ["ray.address=auto", "data.seq_len=32"], for_job="data")
    assert isinstance(job, DataJobConfig)
    assert job.student.model == str(cfg_dir / "student") and job.data.file == str(cfg_dir / "data.yaml")
    assert (job.ray.address, job.data.seq_len) == ("auto", 32)
    assert not hasattr(job, "teacher") and not hasattr(job, "train")
    # what the data job reads is still checked, with the run's messages
    for changes, overrides, key in [
            ({"data": {"seq_len": 64}}, [], "data: give exactly one of data.file or data.domains"),
            ({"data": {"domains": [{"name": "a", "files": ["x"]}, {"name": "a", "files": ["y"]}]}}, [],
             "data.domains: domain names must be unique"),
            ({}, ["data.seq_len=1"], "data.seq_len: must be greater than 1"),
            ({"data": {"file": "nope.yaml"}}, [], "data.file: no such file"),
            ({"student": {"model": "missing-dir"}}, [], "student.model: no such directory"),
            ({"student": {"model": "student", "modle": "x"}}, [], "student.modle: unknown key"),
            ({}, ["ray.num_workers=0"], "ray.num_workers: must be greater than 0"),
            ({}, ["trian.steps=3"], "trian.steps: unknown key")]:
        with pytest.raises(UsageError) as e:
            load_config(str(write(teacher={}, controller={}, **changes)), overrides, for_job="data")
        assert str(e.value).startswith(key), (key, str(e.value))
    with pytest.raises(ValueError, match="for_job"):
        load_config(str(no_teacher), for_job="eval")


def _tiny_student(path: Path) -> None:
    """A tokenizer folder standing in for student.model (ddk data reads only the student's tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["a small corpus of words", "another line of text"],
                            trainers.BpeTrainer(vocab_size=280, special_tokens=["<eos>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(path)


def test_ddk_data_takes_a_config_without_a_teacher_and_ddk_train_refuses_it(tmp_path, capsys):
    """Issue 25: `ddk data prepare|inspect train.yaml` on a machine where no teacher runs yet: exit 0;
    `ddk train` on the same file: exit 2, one line naming teacher.urls."""
    from ddk.cli import main

    _tiny_student(tmp_path / "student")
    docs = {n: [f"{n} document {i} " + "word " * (i % 7 + 20) for i in range(30)] for n in ("a", "b")}
    domains = []
    for n, texts in docs.items():
        (tmp_path / f"{n}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        domains.append({"name": n, "files": [f"{n}.jsonl"]})
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"run_id": "no-teacher", "student": {"model": "student"},
                                      "data": {"domains": domains, "seq_len": 16, "val_fraction": 0.2},
                                      "train": {"steps": 10}}))
    cache = ["--cache-dir", str(tmp_path / "cache"), "--workers", "1"]
    assert main(["data", "prepare", str(config), *cache, "--quiet"]) == 0, capsys.readouterr().err
    assert "2 domains" in capsys.readouterr().out
    assert main(["data", "inspect", str(config), *cache, "--json"]) == 0, capsys.readouterr().err
    rows = {r["domain"]: r for r in json.loads(capsys.readouterr().out)["domains"]}
    assert set(rows) == {"a", "b"} and rows["a"]["train_blocks"] > 0
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "teacher.urls: required when kd.gamma > 0" in err, err


@pytest.mark.slow
def test_the_kit_train_yaml_loads(kit):
    cfg = load_config(str(kit / "train.yaml"))
    assert cfg.student.model == str(kit / "student") and cfg.data.file == str(kit / "data.yaml")
    assert cfg.output_dir == str(kit / "runs" / cfg.run_id)
    assert cfg.mixture.policy == "ddk" and cfg.teacher.urls and cfg.controller.url
