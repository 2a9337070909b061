"""The training config: one YAML file (plus ``--set a.b=VALUE`` overrides) -> a validated :class:`TrainConfig`.

Why pydantic with ``extra="forbid"`` everywhere: a typo in a key (``kd.gama``) must stop the run before Ray
starts, not silently fall back to a default. Every problem surfaces as ``ddk.cli.UsageError`` with a
one-line message that starts with the dotted key, e.g. ``train.steps: must be greater than 0``.

Paths: relative paths written in the config file resolve against the file's directory (so a config can sit
next to its data); paths given with ``--set`` resolve against the current directory (as a shell user expects).
After loading, every path in the config is absolute, because Ray workers do not share the driver's cwd.

This is the one parser of a train config: ``ddk train`` (:func:`load_config`), ``ddk data prepare|inspect``
(``load_config(path, for_job="data")``: data, student.model and ray alone), ``ddk eval --data train.yaml``
and ``load_domain_specs(train.yaml)`` (:func:`train_sections`: the data and eval sections alone), the demo and
``ddk compare``. :class:`TrainJob` is what the driver hands every worker: the validated config plus what it
measured before the workers start (teacher losses, initial weights); it crosses to Ray as plain data
(``model_dump(mode="json")``) and is validated again there.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ddk.data.domains import is_train_config
from ddk.errors import UsageError
from ddk.controller import policies as policy_registry  # the policy names (pydantic, no torch)
from ddk.controller.mixture import GAP_ESTIMATES
from ddk.vocab import DIVERGENCES, RUN_ID_PATTERN, RUN_ID_RULE, SIGNALS

# Test hook for fault tolerance: "6,10" makes the last rank exit abruptly right after step 6 and after step 10
# (each once per output_dir; a marker file remembers it), as a crashed worker would. ``ddk train`` reads it
# into TrainJob.fault_at_steps (launch.prepare); an in-process caller can set that field directly.
FAULT_ENV = "DDK_FAULT_AT_STEPS"


class _Section(BaseModel):
    # allow_inf_nan=False: every float key is a finite number (`train.lr: .inf` is exit 2, not a NaN loss)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TeacherSection(_Section):
    urls: list[str] = Field(default_factory=list)
    # domain -> its own teacher replicas (a domain without a route uses ``urls``): issue 14's routed teachers
    routes: dict[str, list[str]] = Field(default_factory=dict)
    token_file: str | None = None  # bearer token for the teacher's /v1/topk (``ddk teacher serve --token-file``)

    @field_validator("urls", mode="before")
    @classmethod
    def _one_url(cls, v: Any) -> Any:  # `teacher.urls: http://...` (a single string) is a list of one
        return [v] if isinstance(v, str) else v

    @field_validator("routes", mode="before")
    @classmethod
    def _one_route_url(cls, v: Any) -> Any:  # `teacher.routes: {math: http://...}`: a list of one
        return {k: [u] if isinstance(u, str) else u for k, u in v.items()} if isinstance(v, dict) else v

    def all_urls(self) -> list[str]:
        """Every teacher URL of the config, ``urls`` first, each once."""
        seen = dict.fromkeys(self.urls)
        for urls in self.routes.values():
            seen.update(dict.fromkeys(urls))
        return list(seen)


class ControllerSection(_Section):
    url: str | None = None
    token_file: str | None = None


class StudentSection(_Section):
    model: str


class DomainEntry(_Section):
    """One inline domain, the same form as an entry of data.yaml's ``domains``."""

    name: str = Field(min_length=1)
    files: list[str] = Field(min_length=1)
    val_files: list[str] | None = None
    task: Any = None  # checked by ddk.data.tasks.parse_task when the domains load
    overflow: str | None = None  # truncate_left | drop, for conversation domains (checked when the domains load)

    @field_validator("files", "val_files", mode="before")
    @classmethod
    def _one_file(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class DataSection(_Section):
    file: str | None = None
    domains: list[DomainEntry] | None = None
    seq_len: int = Field(128, gt=1)
    val_fraction: float = Field(0.05, gt=0, lt=1)  # for inline domains without val_files
    cache_dir: str | None = None  # tokenised cache; None -> ddk.data.domains.default_cache_dir()

    def source(self) -> str | dict:
        """What :func:`ddk.data.domains.load_domain_specs` reads: ``file``, or the inline domains."""
        if self.file is not None:
            return self.file
        return {"domains": [d.model_dump(exclude_none=True) for d in self.domains or []],
                "val_fraction": self.val_fraction}


class TrainSection(_Section):
    steps: int = Field(gt=0)
    batch_size: int = Field(8, gt=0)
    lr: float = Field(3e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    grad_accum_steps: int = Field(1, gt=0)  # micro-batches of batch_size per optimiser step
    activation_checkpointing: bool = False  # Hugging Face gradient checkpointing of the student
    strategy: Literal["ddp", "fsdp"] = "ddp"  # fsdp: FSDP2 fully_shard per decoder layer, then the root
    compile: bool = False  # torch.compile the student
    peak_tflops: float | None = Field(None, gt=0)  # the accelerator's peak, for MFU in metrics.jsonl


class KDSection(_Section):
    gamma: float = Field(0.2, ge=0)
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(16, gt=0)
    loss: Literal[DIVERGENCES] = "forward_kl"  # the divergence (ddk.trainer.loss computes it; the names: ddk.vocab)
    beta: float = Field(0.5, ge=0, le=1)  # jsd's interpolation: 0 forward KL, 1 reverse KL (TRL's convention)
    skew: float = Field(0.1, gt=0, le=1)  # skew_kl / skew_rkl's mixing weight (DistiLLM)
    # positions per chunk of the loss computed from the hidden states (output projection inside the chunk);
    # None: sized so one chunk's float32 [chunk, vocab] is at most ~256 MB; 0: the plain path (full logits)
    chunk_tokens: int | None = Field(None, ge=0)
    # a teacher (or route) whose tokenizer differs from the student's (issue 29): auto: distil across tokenizers
    # (ddk.trainer.xtok_teacher: the text re-tokenised the teacher's way, aligned by bytes); off: refused, exit 2
    cross_tokenizer: Literal["auto", "off"] = "auto"

    @field_validator("cross_tokenizer", mode="before")
    @classmethod
    def _yaml_off(cls, v):  # YAML reads a bare `off` as false (and `on` as true)
        return {False: "off", True: "auto"}.get(v, v) if isinstance(v, bool) else v
    # on-policy distillation (GKD's lambda, issue 28): the share of each step's rows whose completions the student
    # writes (the ``rollout`` section) from the conversation domains' prompts; 0 is the off-policy run exactly
    on_policy: float = Field(0.0, ge=0, le=1)


class RolloutSection(_Section):
    """How the student writes its completions when ``kd.on_policy > 0`` (ddk.trainer.onpolicy)."""

    engine: Literal["hf", "vllm"] = "hf"  # hf: the trainer's own student (always current); vllm: a copy, synced
    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(1.0, ge=0)  # 0: greedy
    top_p: float = Field(1.0, gt=0, le=1)
    sync_every: int = Field(1, ge=1)  # vllm: steps between weight syncs (1: on-policy; more: bounded staleness)
    seed: int | None = Field(None, ge=0, lt=2**32)  # None: the run's seed
    loss: Literal["gkd", "sampled_reverse_kl"] = "gkd"  # gkd: kd.loss on the teacher's top-k at generated tokens
    clip: float = Field(2.0, gt=0)  # sampled_reverse_kl: the importance weight's cap c (stale vllm weights)


class MixtureSection(_Section):
    policy: Literal[policy_registry.names()] = "ddk"  # the controller's registry (ddk.controller.policies)
    interval_steps: int = Field(1000, gt=0)
    alpha: float = Field(0.5, ge=0, le=1)
    initial_weights: dict[str, float] | None = None
    # the policy's own parameters (GET /v1/policies lists them), checked by the controller on POST /v1/runs
    policy_params: dict[str, Any] = {}
    # how the steering policies read each domain's gap: raw (as measured) or shrunk (towards the domains' mean by
    # its standard error: docs/architecture.md, "The gap estimate")
    gap_estimate: Literal[GAP_ESTIMATES] = "raw"
    # what each domain's gap q measures (ddk.vocab.SIGNALS, ddk.trainer.gap_signal): ratio (PPL_S / PPL_T on the
    # validation blocks), accuracy (task accuracy of greedy answers) or onpolicy (reverse KL on the student's text)
    signal: Literal[SIGNALS] = "ratio"

    @field_validator("initial_weights")
    @classmethod
    def _weights(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None:
            if any(w < 0 for w in v.values()):
                raise ValueError("weights must be >= 0")
            if not v or sum(v.values()) <= 0:
                raise ValueError("weights must have a positive sum")
        return v


class EvalSection(_Section):
    sequences_per_domain: int = Field(32, gt=0)  # whole-document windows per domain (ddk.data.evalset)
    batch_size: int = Field(16, gt=0)
    tokens_per_domain: int | None = Field(None, gt=0)  # instead: windows until this many predictions per domain
    seed: int = Field(0, ge=0)  # the evaluation set's sample (not the run's seed: every arm and seed scores alike)
    documents: Literal["all", "steer", "score"] = "all"  # a half of the validation documents (ddk compare)


class RaySection(_Section):
    address: str = ""
    num_workers: int = Field(2, gt=0)
    use_gpu: bool = False
    max_failures: int | None = Field(None, ge=0)  # worker-group restarts; None: $DDK_RAY_MAX_FAILURES or 3


class CacheSection(_Section):
    dir: str | None = None  # a top-k store (``ddk teacher precompute --out DIR``) to train from


class CheckpointSection(_Section):
    every_steps: int = Field(100, gt=0)
    keep: int = Field(2, ge=1)


class MLflowSection(_Section):
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else a file store in output_dir/mlruns
    experiment: str = Field("ddk", min_length=1)


class WandbSection(_Section):
    project: str = Field("ddk", min_length=1)
    mode: Literal["online", "offline", "disabled"] | None = None  # None: $WANDB_MODE, else online


class LoggingSection(_Section):
    """Experiment trackers (ddk.trainer.tracking); each one's package is optional (``ddk[tracking]``)."""

    tensorboard: bool = False  # event files in output_dir/tb
    mlflow: MLflowSection | None = None
    wandb: WandbSection | None = None

    @field_validator("mlflow", "wandb", mode="before")
    @classmethod
    def _switch(cls, v: Any) -> Any:  # `logging.wandb: true` is the defaults, `false` is off
        if v is True:
            return {}
        return None if v is False else v


class TrainConfig(_Section):
    run_id: str = Field(pattern=RUN_ID_PATTERN)  # ddk.vocab: the controller's rule too
    teacher: TeacherSection = Field(default_factory=TeacherSection)
    controller: ControllerSection = Field(default_factory=ControllerSection)
    student: StudentSection
    data: DataSection
    train: TrainSection
    kd: KDSection = Field(default_factory=KDSection)
    rollout: RolloutSection = Field(default_factory=RolloutSection)
    mixture: MixtureSection = Field(default_factory=MixtureSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    ray: RaySection = Field(default_factory=RaySection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    cache: CacheSection = Field(default_factory=CacheSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    output_dir: str | None = None  # None -> ./runs/<run_id> (filled in by load_config)
    seed: int = Field(0, ge=0, lt=2**32)  # numpy's and the kit's seeds are 32-bit (ddk.argtypes.seed)

    @property
    def cpt(self) -> bool:
        """Continued pre-training: CE only, the teacher is never asked for top-k during training."""
        return self.kd.gamma == 0

    @property
    def rollout_seed(self) -> int:
        """``rollout.seed``, or the run's ``seed`` when it is not set."""
        return self.seed if self.rollout.seed is None else self.rollout.seed

    @model_validator(mode="after")
    def _cross_checks(self) -> "TrainConfig":
        # Messages start with the dotted key; _format_error passes them through unchanged.
        check_data_section(self.data)
        # the run's checks (a command that reads only part of a config, ddk data, uses DataJobConfig instead)
        # a top-k store (cache.dir, ddk.trainer.topk_source) stands in for the teacher: its checks are the driver's
        if self.teacher.routes and self.cache.dir:
            raise ValueError("teacher.routes: not available with cache.dir (a top-k store holds one teacher's outputs)")
        if self.kd.gamma > 0 and not self.teacher.all_urls() and not self.cache.dir:
            raise ValueError("teacher.urls: required when kd.gamma > 0 (or cache.dir: a precomputed top-k store)")
        if self.mixture.policy in policy_registry.steered():
            if not self.teacher.all_urls() and not self.cache.dir:
                raise ValueError(f"teacher.urls: required for mixture.policy {self.mixture.policy} "
                                 "(the weights need teacher losses; or cache.dir: a precomputed top-k store)")
            if not self.controller.url:
                raise ValueError(f"controller.url: required for mixture.policy {self.mixture.policy}")
        if self.kd.on_policy > 0 and not self.teacher.all_urls():
            raise ValueError("kd.on_policy: needs teacher.urls (the teacher grades the student's new text; a "
                             "top-k store in cache.dir cannot)")
        if self.kd.on_policy > 0 and self.kd.gamma == 0:
            raise ValueError("kd.on_policy: needs kd.gamma > 0 (rollouts are trained on the teacher's grades)")
        self._signal_checks()
        if self.kd.on_policy > 0 and self.train.strategy == "fsdp":
            raise ValueError("kd.on_policy: not with train.strategy fsdp yet (the rollout rows run through the "
                             "unsharded student); use ddp")
        return self

    def _signal_checks(self) -> None:
        """``mixture.signal``'s own needs (its domains' needs: ddk.trainer.gap_signal.check_signal, at launch)."""
        signal = self.mixture.signal
        if signal == "ratio":
            return
        if not self.teacher.all_urls():
            raise ValueError(f"mixture.signal: {signal} needs teacher.urls (the teacher answers / grades the "
                             "validation prompts through its service)")
        if signal == "onpolicy" and self.kd.on_policy <= 0:
            raise ValueError("mixture.signal: onpolicy needs kd.on_policy > 0 (the gap on the student's own "
                             "completions is the on-policy run's signal)")
        if self.train.strategy == "fsdp":
            raise ValueError(f"mixture.signal: {signal} not with train.strategy fsdp (rank 0 generates with the "
                             "unsharded student); use ddp")


def check_data_section(data: DataSection) -> None:
    """The data section's own cross-field checks (ValueError naming the key), for every job that reads it."""
    if (data.file is None) == (data.domains is None):
        raise ValueError("data: give exactly one of data.file or data.domains")
    if data.domains is not None:
        names = [d.name for d in data.domains]
        if len(set(names)) != len(names):
            raise ValueError("data.domains: domain names must be unique")


class DataJobConfig(BaseModel):
    """What ``ddk data prepare|inspect`` read of a train config (``load_config(path, for_job="data")``): the
    data section, ``student.model`` (its tokenizer) and ``ray`` (``ray.address`` for ``--ray``), each checked as
    ``ddk train`` checks it. The other sections are the run's: not read and not checked here, so a config
    without a teacher or a controller prepares its data (preparing data before any teacher runs is the point)."""

    model_config = ConfigDict(extra="ignore")
    student: StudentSection
    data: DataSection
    ray: RaySection = Field(default_factory=RaySection)

    @model_validator(mode="after")
    def _data_checks(self) -> "DataJobConfig":
        check_data_section(self.data)
        return self


JOBS = ("train", "data")  # load_config's for_job: the whole run, or what ddk data reads


# ---------------------------------------------------------------------------------------------------------
# loading

SECTIONS = tuple(TrainConfig.model_fields)


def _resolve_paths(raw: dict, base: Path) -> None:
    """Make the path-valued keys of a (partial) raw config absolute against ``base``, in place."""

    def fix(v: Any) -> Any:
        if isinstance(v, str) and v and not os.path.isabs(os.path.expanduser(v)):
            return str((base / v).resolve())
        return os.path.expanduser(v) if isinstance(v, str) else v

    for section, key in (("student", "model"), ("data", "file"), ("data", "cache_dir"),
                         ("controller", "token_file"), ("teacher", "token_file"), ("cache", "dir")):
        sec = raw.get(section)
        if isinstance(sec, dict) and key in sec:
            sec[key] = fix(sec[key])
    if "output_dir" in raw:
        raw["output_dir"] = fix(raw["output_dir"])
    mlflow = raw.get("logging", {}).get("mlflow") if isinstance(raw.get("logging"), dict) else None
    if isinstance(mlflow, dict) and is_local_path(mlflow.get("tracking_uri")):  # a URI stays as it is
        mlflow["tracking_uri"] = fix(mlflow["tracking_uri"])
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("domains"), list):
        for entry in data["domains"]:
            if isinstance(entry, dict):
                for key in ("files", "val_files"):
                    if isinstance(entry.get(key), list):
                        entry[key] = [fix(p) for p in entry[key]]
                    elif isinstance(entry.get(key), str):
                        entry[key] = [fix(entry[key])]


def is_local_path(uri: Any) -> bool:
    """A tracking URI that is a plain path (no ``scheme:``; ``databricks`` is a URI): resolved like a path."""
    return isinstance(uri, str) and bool(uri) and uri != "databricks" and not re.match(r"[A-Za-z][\w+.-]*:", uri)


def _apply_override(raw: dict, item: str, cwd: Path) -> None:
    """``a.b=VALUE`` -> raw["a"]["b"] = yaml.safe_load(VALUE), path values resolved against ``cwd``."""
    if "=" not in item:
        raise UsageError(f"--set {item}: expected KEY=VALUE")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise UsageError(f"--set {item}: bad key {key!r}")
    if parts[0] not in SECTIONS:
        raise UsageError(f"{key}: unknown key {parts[0]!r} (known: {', '.join(SECTIONS)})")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise UsageError(f"{key}: value is not valid YAML ({str(e).splitlines()[0]})") from None
    # Build the override as its own small tree so its paths resolve against the cwd, then graft it.
    patch: dict = {}
    node = patch
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    _resolve_paths(patch, cwd)
    node, src = raw, patch
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node, src = node[p], src[p]
    node[parts[-1]] = src[parts[-1]]


_PYDANTIC_PREFIXES = (("Input should be ", "must be "), ("Value error, ", ""), ("String should ", "must "),
                      ("List should ", "must "), ("Dictionary should ", "must "))


def _format_error(err: ValidationError) -> str:
    """First pydantic error -> 'dotted.key: message' (one line)."""
    e = err.errors()[0]
    loc = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(e["loc"]))
    msg = e["msg"]
    for old, new in _PYDANTIC_PREFIXES:
        if msg.startswith(old):
            msg = new + msg[len(old):]
    if e["type"] == "missing":
        msg = "is required"
    elif e["type"] == "extra_forbidden":
        msg = "unknown key"
    elif e["type"] == "string_pattern_mismatch" and loc == "run_id":
        msg = f"must be {RUN_ID_RULE}"
    return f"{loc}: {msg}" if loc else msg


def validate_config(raw: dict) -> TrainConfig:
    """Validate an already-resolved raw dict; errors -> UsageError('dotted.key: message')."""
    try:
        cfg = TrainConfig.model_validate(raw)
    except ValidationError as err:
        raise UsageError(_format_error(err)) from None
    if cfg.output_dir is None:
        cfg.output_dir = str((Path.cwd() / "runs" / cfg.run_id).resolve())
    return cfg


def load_config(path: str, overrides: list[str] | tuple[str, ...] = (),
                for_job: Literal["train", "data"] = "train") -> TrainConfig | DataJobConfig:
    """Read the YAML config at ``path``, apply ``--set`` overrides, resolve paths, validate.

    Checks that local inputs exist (student.model, data.file, inline data files, controller.token_file), so a
    wrong path is exit 2 here rather than a failure inside a Ray worker.

    ``for_job``: ``"train"`` (default) checks the whole run (a :class:`TrainConfig`); ``"data"`` checks what
    ``ddk data prepare|inspect`` read (a :class:`DataJobConfig`: data, student.model, ray), so the run's
    requirements (``teacher.urls`` when ``kd.gamma > 0``, ``controller.url`` for the DDK policies, ...) do not
    apply. Top-level keys are checked against the sections in both.
    """
    if for_job not in JOBS:
        raise ValueError(f"for_job: must be one of {', '.join(JOBS)}, got {for_job!r}")
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"config {path}: cannot read ({e.strerror or e})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UsageError(f"config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UsageError(f"config {path}: expected a mapping of sections at the top level")
    for key in raw:
        if key not in SECTIONS:
            raise UsageError(f"{key}: unknown key (known: {', '.join(SECTIONS)})")
    _resolve_paths(raw, p.resolve().parent)
    cwd = Path.cwd()
    for item in overrides:
        _apply_override(raw, item, cwd)
    if for_job == "data":
        try:
            job = DataJobConfig.model_validate(raw)
        except ValidationError as err:
            raise UsageError(_format_error(err)) from None
        _check_data_paths(job)
        return job
    cfg = validate_config(raw)
    _check_paths(cfg)
    return cfg


def _check_data_paths(cfg: TrainConfig | DataJobConfig) -> None:
    if not Path(cfg.student.model).is_dir():
        raise UsageError(f"student.model: no such directory: {cfg.student.model}")
    if cfg.data.file is not None and not Path(cfg.data.file).exists():
        raise UsageError(f"data.file: no such file or directory: {cfg.data.file}")
    for i, d in enumerate(cfg.data.domains or []):
        for key in ("files", "val_files"):
            for f in getattr(d, key) or []:
                if not Path(f).exists():
                    raise UsageError(f"data.domains[{i}].{key}: domain {d.name}: no such file: {f}")


def _check_paths(cfg: TrainConfig) -> None:
    _check_data_paths(cfg)
    if cfg.controller.token_file is not None and not Path(cfg.controller.token_file).is_file():
        raise UsageError(f"controller.token_file: no such file: {cfg.controller.token_file}")
    if cfg.teacher.token_file is not None and not Path(cfg.teacher.token_file).is_file():
        raise UsageError(f"teacher.token_file: no such file: {cfg.teacher.token_file}")


def config_to_dict(cfg: TrainConfig) -> dict:
    """JSON/YAML-safe plain dict of the full config (defaults included); loads back with validate_config."""
    return cfg.model_dump(mode="json")


# ---------------------------------------------------------------------------------------------------------
# a train config read for its data alone (ddk eval --data train.yaml, load_domain_specs(train.yaml))

class TrainSections(BaseModel):
    """The sections of a train config that stand on their own: ``data`` and ``eval`` (the rest is ignored)."""

    model_config = ConfigDict(extra="ignore")
    data: DataSection
    eval: EvalSection = Field(default_factory=EvalSection)


def train_sections(raw: dict, base: str | Path) -> TrainSections:
    """The data and eval sections of a parsed train config, with the same models and path rules as
    :func:`load_config` (paths against ``base``, the file's directory); errors -> UsageError('data.x: ...')."""
    part = {k: copy.deepcopy(raw[k]) for k in ("data", "eval") if k in raw}
    _resolve_paths(part, Path(base))
    try:
        sections = TrainSections.model_validate(part)
    except ValidationError as err:
        raise UsageError(_format_error(err)) from None
    if sections.data.file is None and sections.data.domains is None:
        raise UsageError("data: the train config has neither data.file nor data.domains")
    return sections


def load_train_sections(path: str | Path) -> TrainSections | None:
    """:func:`train_sections` of the YAML file at ``path``; None when it is not a readable train config."""
    p = Path(path).expanduser()
    if not p.is_file() or p.suffix not in (".yaml", ".yml"):
        return None
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return train_sections(raw, p.resolve().parent) if is_train_config(raw) else None


# ---------------------------------------------------------------------------------------------------------
# the workers' job

class TrainJob(BaseModel):
    """Everything one worker of a run needs (``launch.prepare`` builds it; ``loop.Trainer`` runs it).

    ``initial_weights``/``initial_version``: the mixture in force until the evaluation at step 0 (a resumed run
    takes its weights from the checkpoint). ``teacher_loss``: the teacher's per-domain validation losses, None
    without a teacher (CPT: the first student evaluation stands in). ``fault_at_steps``: see :data:`FAULT_ENV`.
    """

    model_config = ConfigDict(extra="forbid")
    config: TrainConfig
    initial_weights: dict[str, float]
    initial_version: int = Field(0, ge=0)
    teacher_loss: dict[str, float] | None = None
    controller_token: str | None = None
    teacher_token: str | None = None  # the content of teacher.token_file, read by the driver
    log_level: str = "INFO"
    fault_at_steps: list[int] = Field(default_factory=list)

    @model_validator(mode="after")
    def _resolved(self) -> "TrainJob":
        if self.config.output_dir is None:
            raise ValueError("config.output_dir: must be set (load_config fills it in)")
        return self


def parse_fault_steps(spec: str | None) -> list[int]:
    """``"6,10"`` -> [6, 10] (the value of :data:`FAULT_ENV`; empty or None -> [])."""
    try:
        return sorted({int(s) for s in (spec or "").split(",") if s.strip()})
    except ValueError:
        raise UsageError(f"{FAULT_ENV}: expected comma-separated step numbers, got {spec!r}") from None
