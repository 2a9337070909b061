"""``ddk train CONFIG [--set key=value ...]``: the driver of a distillation run under Ray Train.

What the driver does, in order (everything that can be wrong with the input is found before Ray starts):

1. load and validate the config (config.py; bad keys/values -> exit 2), and check that the packages of the
   trackers ``logging.*`` turns on are installed (tracking.py; exit 2 when one is missing);
2. compare the student's tokenizer fingerprint with the teacher's ``/v1/info`` (exit 2 when they differ:
   top-k ids of one vocabulary mean nothing to a student of another), and check ``kd.top_k`` and
   ``data.seq_len`` against what the teacher serves;
3. tokenise the domains once into the memory-mapped cache (workers only map it);
4. with ``cache.dir``, check the top-k store's manifest and count what it lacks (topk_source.py); the teacher's
   per-domain validation losses come from the workers' first evaluation, which asks the teacher once per
   evaluation block (its ``target_logprob``; evaluate.py ``Evaluator``);
5. create the run at the controller (the same spec again is fine; a different spec under the same
   ``run_id`` is exit 2) and read its initial weights;
6. start the workers: ``TorchTrainer`` with a fixed run name (``run_id``) and storage path
   (``output_dir/ray``), so starting the same run again resumes from its latest checkpoint (Ray Train V2
   reloads the run's checkpoint list from that folder), and ``FailureConfig(max_failures)`` so a worker
   that dies is replaced and the group resumes from the last checkpoint within the same ``fit()``;
7. while ``fit()`` runs, a thread tails ``metrics.jsonl`` (written by rank 0) into a progress bar;
8. at the end: ``weights.png``, ``ratios.png``, ``summary.json`` and a per-domain table.

The per-step work is in loop.py (``Trainer``); ``prepare(cfg)`` alone gives the ``TrainJob`` that
``Trainer(job, LocalContext(output_dir)).fit()`` runs in-process.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from ddk.data.cache import prepare_data
from ddk.data.tokenizer import student_tokenizer
from ddk.errors import UsageError
from ddk.trainer.config import FAULT_ENV, TrainJob, parse_fault_steps

log = logging.getLogger("ddk.trainer")

DEFAULT_MAX_FAILURES = 3
MAX_FAILURES_ENV = "DDK_RAY_MAX_FAILURES"  # when ray.max_failures is not set
FORWARDED_ENV = ("DDK_CACHE_DIR",)  # passed on to the Ray workers when set (DDK_FAULT_AT_STEPS: in the job)
# the trackers' own settings (logging.*), passed on to the Ray workers when set: rank 0 starts the trackers
TRACKER_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME",
               "MLFLOW_TRACKING_PASSWORD", "MLFLOW_ALLOW_FILE_STORE", "WANDB_API_KEY", "WANDB_BASE_URL",
               "WANDB_ENTITY", "WANDB_MODE", "WANDB_DIR")


def check_teacher(info: dict, fingerprint: str, cfg, student_vocab: int, cross: bool = False) -> None:
    """Refuse (UsageError -> exit 2) a teacher the student cannot learn from. Pure: ``info`` is /v1/info.
    ``cross``: the pair passed the cross-tokenizer checks (:func:`_cross_checked`): another tokenizer is fine."""
    theirs = info.get("tokenizer_fingerprint")
    if theirs != fingerprint and not cross:
        raise UsageError(f"teacher.urls: the teacher's tokenizer fingerprint {theirs} differs from "
                         f"student.model's {fingerprint} (they must share one tokenizer"
                         + (", as kd.cross_tokenizer is off)" if getattr(cfg.kd, "cross_tokenizer", "") == "off"
                            else ")"))
    if cfg.kd.gamma > 0 and cfg.kd.top_k > int(info.get("max_top_k", cfg.kd.top_k)):
        raise UsageError(f"kd.top_k: {cfg.kd.top_k} is more than the teacher serves (max_top_k {info['max_top_k']})")
    if cfg.data.seq_len + 1 > int(info.get("max_seq_len", cfg.data.seq_len + 1)):
        raise UsageError(f"data.seq_len: blocks of {cfg.data.seq_len + 1} tokens exceed the teacher's "
                         f"max_seq_len {info['max_seq_len']}")
    if not cross and int(info.get("vocab_size", 0)) > student_vocab:
        raise UsageError(f"student.model: vocabulary of {student_vocab} is smaller than the teacher's "
                         f"{info['vocab_size']}")
    if "max_seq_len" in info:  # kd.on_policy: prompt + rollout.max_new_tokens must fit the teacher
        from ddk.trainer.onpolicy import check_rollout_length

        check_rollout_length(cfg, int(info["max_seq_len"]))


def resolve_initial_weights(cfg, names: list[str]) -> dict[str, float] | None:
    """``mixture.initial_weights`` checked against the domains and normalised (None: uniform)."""
    w = cfg.mixture.initial_weights
    if w is None:
        return None
    unknown = sorted(set(w) - set(names))
    if unknown:
        raise UsageError(f"mixture.initial_weights: unknown domain {unknown[0]!r} (domains: {', '.join(names)})")
    total = sum(w.values())
    return {n: float(w.get(n, 0.0)) / total for n in names}


class Progress(threading.Thread):
    """Tails metrics.jsonl into a tqdm bar until stopped (the driver's view of rank 0's progress; ``ddk demo``
    shows the same bar for its ``ddk train`` child): step of total, loss, weights version, tokens/s and the ETA.

    The bar appears at the first step line of the attempt, and its rate and ETA count from there, so the
    start-up of Ray and the workers does not make the first steps look slow. The last step closes it."""

    def __init__(self, path: Path, total: int, desc: str = "train"):
        super().__init__(name="ddk-progress", daemon=True)
        self.path, self.total, self.desc = path, total, desc
        self._halt = threading.Event()

    def run(self) -> None:
        # a restarted run's file still holds the last attempt's lines until rank 0 truncates it: skip them
        self._pos, self._buf = (self.path.stat().st_size if self.path.exists() else 0), ""
        self._bar = None
        try:
            while not self._halt.wait(0.5):
                if self._drain():
                    return
            self._drain()  # what was written just before the stop
        finally:
            if self._bar is not None:
                self._bar.close()

    def _drain(self) -> bool:
        """Show the lines written since the last call; True once the run's ``end`` line is shown."""
        if not self.path.exists():
            return False
        if self.path.stat().st_size < self._pos:  # rewritten on resume: start over
            self._pos, self._buf = 0, ""
        with open(self.path, encoding="utf-8") as fh:
            fh.seek(self._pos)
            self._buf += fh.read()
            self._pos = fh.tell()
        *lines, self._buf = self._buf.split("\n")
        for line in lines:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("event") == "step":
                self._show_step(r)
            elif r.get("event") == "eval" and r.get("version") is None:
                self._write(f"step {r['step']}: controller unreachable, keeping the previous weights")
            elif r.get("event") == "eval" and r.get("warning"):  # the controller: gaps within their SEs
                self._write(f"step {r['step']}: the mixture is steering by noise; raise eval tokens")
            elif r.get("event") == "end":
                if self._bar is not None:
                    self._bar.close()
                    self._bar = None
                return True
        return False

    def _show_step(self, r: dict) -> None:
        from tqdm import tqdm

        step = int(r["step"])
        if self._bar is not None and step < self._bar.n:  # a new attempt resumed from a checkpoint
            self._bar.close()
            self._bar = None
        if self._bar is None:  # created at the first step line: the rate and ETA count from there
            self._bar = tqdm(total=self.total, initial=step - 1, desc=self.desc, unit="step", dynamic_ncols=True)
            self._bar.start_t -= float(r.get("step_s") or 0.0)
        self._bar.n = step
        onp = r.get("onpolicy") or {}  # kd.on_policy > 0: the step's generation and grading seconds, rollout tokens/s
        extra = {"gen_s": f"{onp['generation_s']:.2f}", "grade_s": f"{onp['grading_s']:.2f}",
                 "roll_tok_s": f"{onp['rollout_tokens_per_s'] or 0:.0f}"} if "generation_s" in onp else {}
        self._bar.set_postfix(loss=f"{r['loss']:.3f}", v=r.get("version"), tok_s=f"{r['tokens_per_s']:.0f}",
                              **extra, refresh=False)
        self._bar.refresh()
        if step >= self.total:  # the last step: closed now, so that its rate is the steps' alone
            self._bar.close()
            self._bar = None

    def _write(self, text: str) -> None:
        from tqdm import tqdm

        (self._bar.write if self._bar is not None else tqdm.write)(text)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


_Progress = Progress  # the earlier name


def check_compile(cfg) -> None:
    """``train.compile`` on CPU workers: torch.compile's C++ compiler is here (exit 2 otherwise). GPU workers
    check Triton themselves (the driver may have no GPU), as every worker checks again."""
    if cfg.train.compile and not cfg.ray.use_gpu:
        from ddk.trainer.scale import compile_problem

        problem = compile_problem("cpu")
        if problem is not None:
            raise UsageError(f"train.compile: {problem}; set train.compile: false")


def prepare(cfg, log_level: str | None = None) -> TrainJob:
    """Steps 2-5: the checks, the data cache, teacher losses and the controller run. Returns the workers' job
    (``DDK_FAULT_AT_STEPS`` read into its ``fault_at_steps``; ``log_level``: the workers' console level, by
    default this process's root level)."""
    from ddk.trainer.tracking import check_packages

    check_packages(cfg)  # logging.*: each configured tracker's package imports (exit 2 otherwise)
    check_compile(cfg)
    from ddk.trainer.checkpoint import check_resumable
    from ddk.trainer.loop import run_storage

    check_resumable(run_storage(cfg.output_dir, cfg.run_id))  # a checkpoint this version cannot resume: exit 2
    if cfg.kd.on_policy > 0:  # on-policy needs conversation domains for its prompts (exit 2 naming them)
        from ddk.data.domains import load_domain_specs
        from ddk.trainer.onpolicy import check_on_policy

        check_on_policy(cfg, load_domain_specs(cfg.data.source()))
    if cfg.mixture.signal != "ratio":  # the gap signal's domains (mixture.signal, gap_signal.py): exit 2 naming them
        from ddk.data.domains import load_domain_specs
        from ddk.trainer.gap_signal import check_signal

        check_signal(cfg, load_domain_specs(cfg.data.source()))
    tokenizer, student_vocab = student_tokenizer(cfg)
    client = _checked_teacher(cfg, tokenizer, student_vocab)  # None without teacher.urls
    try:
        domains = prepare_data(cfg, tokenizer)
        names = sorted(domains)
        initial = resolve_initial_weights(cfg, names)
        check_routes(cfg, names)
        if cfg.cache.dir:  # the top-k store, checked (exit 2 naming what differs), the teacher behind it for misses
            from ddk.trainer.topk_source import checked_store_source

            client = checked_store_source(cfg, tokenizer, domains, client)
    except BaseException:
        if client is not None:
            client.close()
        raise
    if client is not None:  # checked; the workers ask the teacher for the evaluation blocks themselves, once
        client.close()
    teacher_loss = None
    token = Path(cfg.controller.token_file).read_text().strip() if cfg.controller.token_file else None
    if cfg.controller.url:
        _create_run(cfg, token, names, initial)
    # Version 0 is the initial mixture (the controller's too). It is only in force until the evaluation at
    # step 0, which comes before any training; a resumed run takes its weights from the checkpoint.
    return TrainJob(config=cfg, teacher_loss=teacher_loss,
                    initial_weights=initial or {n: 1.0 / len(names) for n in names}, initial_version=0,
                    controller_token=token, teacher_token=_teacher_token(cfg),
                    log_level=log_level or logging.getLevelName(logging.getLogger().getEffectiveLevel()),
                    fault_at_steps=parse_fault_steps(os.environ.get(FAULT_ENV)))


def _teacher_token(cfg) -> str | None:
    """The bearer token of ``teacher.token_file`` (read once, here; the workers get it in the TrainJob)."""
    if not cfg.teacher.token_file:
        return None
    from ddk.tokenfile import read_token

    return read_token(cfg.teacher.token_file, "teacher.token_file")


def _checked_teacher(cfg, tokenizer, student_vocab: int):
    """Step 2: a TeacherClient for ``teacher.urls`` once :func:`check_teacher` accepts it (None without urls);
    with ``teacher.routes`` a RoutedTeacher, every route checked (the error names its domain and URL)."""
    if not cfg.teacher.all_urls():
        return None
    from ddk.fingerprint import tokenizer_fingerprint
    from ddk.teacher.client import TeacherClient, TeacherUnavailable

    token = _teacher_token(cfg)
    if not cfg.teacher.routes:
        client = TeacherClient(cfg.teacher.urls, token=token)
        try:
            info = client.info()
            cross = _cross_checked(cfg, client, info, tokenizer, "teacher.urls")
            check_teacher(info, tokenizer_fingerprint(tokenizer), cfg, student_vocab, cross)
        except BaseException:
            client.close()
            raise
        return client
    from ddk.teacher.routes import RoutedTeacher

    routed = RoutedTeacher(cfg.teacher.urls, cfg.teacher.routes,
                           make_client=lambda urls: TeacherClient(urls, token=token, retry_for=30.0))
    fingerprint = tokenizer_fingerprint(tokenizer)
    try:
        for domain in routed.route_domains():
            where = "teacher.urls" if domain is None else f"teacher.routes.{domain}"
            urls = ",".join(routed.urls_of(domain))
            try:
                info = routed.client(domain).info()
                cross = _cross_checked(cfg, routed.client(domain), info, tokenizer, f"{where} ({urls})")
                check_teacher(info, fingerprint, cfg, student_vocab, cross)
            except UsageError as e:  # "teacher.urls: ..." becomes "teacher.routes.math (URL): ..."
                key, _, rest = str(e).partition(": ")
                raise UsageError(f"{where} ({urls}): {rest}" if key == "teacher.urls"
                                 else f"{e} (the teacher of {where}, {urls})") from None
            except TeacherUnavailable as e:
                raise UsageError(f"{where}: no teacher answers at {urls} ({e})") from None
    except BaseException:
        routed.close()
        raise
    return routed


def _cross_checked(cfg, client, info: dict, tokenizer, where: str) -> bool:
    """True when the teacher's tokenizer differs from the student's, ``kd.cross_tokenizer`` is auto and the pair
    can work (``xtok_teacher.check_pair``: offsets, bytes, round-trips; UsageError naming ``where`` otherwise)."""
    from ddk.fingerprint import tokenizer_fingerprint

    if cfg.kd.cross_tokenizer == "off" or info.get("tokenizer_fingerprint") == tokenizer_fingerprint(tokenizer):
        return False
    from ddk.trainer.xtok_teacher import checked_teacher_tokenizer

    checked_teacher_tokenizer(client, tokenizer, where)  # cache.dir: keyed by the teacher's rows (topk_source.py)
    log.info("%s: the teacher has another tokenizer; distilling across tokenizers (kd.cross_tokenizer: auto)",
             where)
    return True


def check_routes(cfg, names: list[str]) -> None:
    """``teacher.routes`` name known domains, and every domain has a teacher (a route or ``teacher.urls``)."""
    unknown = sorted(set(cfg.teacher.routes) - set(names))
    if unknown:
        raise UsageError(f"teacher.routes: unknown domain {unknown[0]!r} (domains: {', '.join(names)})")
    if cfg.teacher.routes and not cfg.teacher.urls and cfg.kd.gamma > 0:
        bare = [n for n in names if n not in cfg.teacher.routes]
        if bare:
            raise UsageError(f"teacher.urls: domain {bare[0]} has no route in teacher.routes and teacher.urls is empty")


def _create_run(cfg, token: str | None, names: list[str], initial: dict[str, float] | None) -> None:
    """Step 5: the run at the controller (the same spec again is fine)."""
    from ddk.controller.client import ControllerClient, ControllerError

    cc = ControllerClient(cfg.controller.url, token)
    try:
        cc.create_run(cfg.run_id, names, policy=cfg.mixture.policy, alpha=cfg.mixture.alpha,
                      interval_steps=cfg.mixture.interval_steps, initial_weights=initial,
                      policy_params=cfg.mixture.policy_params, gap_estimate=cfg.mixture.gap_estimate)
    except ControllerError as e:
        if e.status == 409:
            raise UsageError(f"run_id: {cfg.run_id} exists at the controller with a different spec "
                             f"({e.detail})") from None
        raise UsageError(f"controller.url: the controller refused the run ({e.status}: {e.detail})") from None
    finally:
        if hasattr(cc, "close"):
            cc.close()


def launch(job: TrainJob):
    """Step 6: Ray Train, the job crossing to the workers as plain data. Returns the ``Result``."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ddk.logsetup import ray_train_log_level
    from ddk.runtime import PROCESS_DEFAULTS, set_process_defaults
    from ddk.trainer.loop import run_storage, train_loop_per_worker
    from ddk.trainer.tracking import configured

    cfg = job.config
    set_process_defaults()  # before ray.init starts the raylet: the workers load OpenMP with them
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    if configured(cfg):
        env.update({k: os.environ[k] for k in TRACKER_ENV if os.environ.get(k)})
    env.update({k: os.environ[k] for k in PROCESS_DEFAULTS})  # also on a cluster started elsewhere (ray.address)
    env["TOKENIZERS_PARALLELISM"] = "false"
    started = False
    if not ray.is_initialized():
        ray.init(address=cfg.ray.address or None, runtime_env={"env_vars": env}, include_dashboard=False,
                 logging_level=logging.WARNING)
        started = True
    max_failures = cfg.ray.max_failures
    if max_failures is None:
        max_failures = int(os.environ.get(MAX_FAILURES_ENV, DEFAULT_MAX_FAILURES))
    try:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=job.model_dump(mode="json"),
            scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu),
            run_config=RunConfig(
                name=cfg.run_id,
                storage_path=str(run_storage(cfg.output_dir, cfg.run_id).parent),
                failure_config=FailureConfig(max_failures=max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
                # Ray Train's own console lines (per report, per checkpoint) off unless --log-level DEBUG
                logging_config=LoggingConfig(log_level=ray_train_log_level(job.log_level)),
            ),
        )
        return trainer.fit()
    finally:
        if started:
            ray.shutdown()


def finish(out: Path) -> dict:
    """Step 8: plots, summary.json and the table."""
    from ddk.trainer.metrics import plot_ratios, plot_weights
    from ddk.trainer.metrics import METRICS, format_summary, read_metrics, summarize

    records = read_metrics(out / METRICS)
    plot_weights(records, out / "weights.png")
    plot_ratios(records, out / "ratios.png")
    summary = summarize(records)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(format_summary(summary), flush=True)
    return summary


def main(args) -> int:
    from ddk.trainer.config import config_to_dict, load_config
    from ddk.trainer.loop import log_origin
    from ddk.trainer.metrics import METRICS

    cfg = load_config(args.config, args.overrides)
    log_origin()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    job = prepare(cfg, log_level=getattr(args, "log_level", None) or "INFO")  # ddk's --log-level, to the workers
    (out / "config.json").write_text(json.dumps(config_to_dict(job.config), indent=1))  # resolved cache_dir

    t0 = time.perf_counter()
    progress = Progress(out / METRICS, cfg.train.steps)
    progress.start()
    try:
        launch(job)
    finally:
        progress.stop()
    log.info("training finished in %.1f s; outputs in %s", time.perf_counter() - t0, out)
    finish(out)
    return 0
