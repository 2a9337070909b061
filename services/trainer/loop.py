"""The per-worker distillation loop: :class:`Trainer` (one process per rank under Ray Train, or one in-process).

``Trainer(job, ctx).fit()`` runs ``setup()`` (data, the mixture, the student placed by its
:class:`~ddk.trainer.parallel.Distributed`, optimiser, LR schedule, teacher and feed, then ``resume()`` from the
newest checkpoint, then the metrics writer), the steps below, ``export()`` and ``close()``.
Per step ``s`` (``s`` optimiser steps done so far, :attr:`TrainState.step`), every rank:

1. :meth:`Trainer.evaluate`: at an interval boundary (``s % interval_steps == 0``, step 0 included, and at the
   last step), every rank evaluates the student on its shard of every domain's validation blocks (the sums
   all-reduced: :meth:`Trainer.student_losses`) and rank 0 hands the losses to the run's
   :class:`~ddk.trainer.mixture_sync.MixtureSync`, which posts them to the controller; its answer is the next
   weights version (the DDK update). A controller that cannot be reached does not stop the run: the run keeps
   its last weights, says so in the log and retries at later steps (the sync's one retry policy) until every
   evaluation got through, in order; the end of the run keeps trying for a bounded time. With
   ``mixture.signal: accuracy | onpolicy`` rank 0 posts that signal's losses instead
   (:class:`~ddk.trainer.gap_signal.GapSignal`), the evaluator's still logged.
2. :meth:`Trainer.evaluate` then broadcasts rank 0's ``[version, w_1 .. w_N]`` as one float64 tensor
   (torch.distributed, no pickle); every rank now draws with the same weights.
3. :meth:`Trainer.train_step`: the teacher feed hands out the step's batch (drawn with those weights, teacher
   top-k fetched in the background, see feed.py; the feed reads the weights from the mixture sync); when the
   weights changed, batches prefetched under the old ones are dropped.
4. :meth:`Trainer.train_step`: per micro-batch (``train.grad_accum_steps`` of them) forward and
   ``CE + gamma * KL`` (loss.py; from the hidden states in chunks unless ``kd.chunk_tokens: 0``) under
   ``train.precision``'s autocast, backward (DDP all-reduce on the last micro-batch; :meth:`Trainer.backward`,
   scale.py), clip, AdamW, LR schedule, and rank 0's ``step`` line in the metrics. With ``kd.on_policy > 0``
   the step's rollout rows go first (:class:`~ddk.trainer.onpolicy.OnPolicyStep`: rollout, grade, backward).
5. :meth:`Trainer.save`: at ``checkpoint.every_steps`` and the last step, a checkpoint of the model, optimiser,
   schedule, RNG and the registered entries (:class:`~ddk.trainer.state.TrainState`, the mixture sync, each
   rank's sampler position), written by the :class:`~ddk.trainer.parallel.Distributed` and reported to the
   context.

Rank 0 appends to ``output_dir/metrics.jsonl`` (see metrics.py; every record also goes to the trackers of
``logging.*``, see tracking.py) and finally (:meth:`Trainer.export`) writes
the student in Hugging Face format to ``output_dir/final``.

The loop talks to its surroundings through a small context (:class:`RayContext` under Ray Train,
:class:`LocalContext` in-process), so the same code runs in both. Its input is a
:class:`~ddk.trainer.config.TrainJob` (``launch.prepare`` builds it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from ddk.trainer import checkpoint as ckpt
from ddk.trainer import scale
from ddk.trainer.config import FAULT_ENV, TrainJob
from ddk.trainer.metrics import METRICS, MetricsWriter, truncate_metrics
from ddk.trainer.mixture_sync import MixtureSync
from ddk.trainer.optim import build_optimizer, lr_lambda
from ddk.trainer.state import TrainState
from ddk.trainer.tracking import tracked_writer
from ddk.vocab import ratio

log = logging.getLogger("ddk.trainer")

__all__ = ["InjectedFault", "LocalContext", "ProgressReporter", "RayContext", "TrainState", "Trainer",
           "train_loop_per_worker"]


class InjectedFault(RuntimeError):
    """Raised in-process (:class:`LocalContext`) where a Ray worker exits abruptly (``TrainJob.fault_at_steps``)."""


# ----------------------------------------------------------------------------------------------------------
# contexts: where the loop runs

class RayContext:
    """Inside a Ray Train worker: rank/world from Ray, checkpoints reported to Ray Train's storage.

    ``storage`` is the run's folder in Ray Train's storage (``output_dir/ray/<run_id>``), where the
    checkpoints land. See :meth:`restored` for why the loop looks there as well as asking Ray.
    """

    def __init__(self, storage: str | Path | None = None) -> None:
        import ray.train

        c = ray.train.get_context()
        self.rank = c.get_world_rank()
        self.world_size = c.get_world_size()
        self.local_world_size = c.get_local_world_size()
        self.storage = Path(storage) if storage is not None else None

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)  # moves to the device; DDP when world_size > 1

    @contextlib.contextmanager
    def restored(self) -> Iterator[Path | None]:
        """The checkpoint to resume from: the newer of Ray's latest and the newest complete one in storage.

        Ray Train registers a reported checkpoint when its controller next polls the workers (every 2 s).
        A worker that dies within that window loses the registration, although every rank has already
        written its files to storage: Ray would then resume from the checkpoint before. So rank 0 also
        scans the storage folder for the newest complete checkpoint (every file present and readable,
        checkpoint.complete_step) and takes whichever is newer; its choice is broadcast so that every
        rank loads the same step.
        """
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        with contextlib.ExitStack() as stack:
            ray_dir = Path(stack.enter_context(checkpoint.as_directory())) if checkpoint is not None else None
            choice = [-1, 0]  # [step, source]: source 0 none, 1 Ray's checkpoint, 2 found in storage
            if self.rank == 0:
                point = ckpt.resume_point(ray_dir, self.storage)
                if point is not None:
                    step, folder, registered = point
                    choice = [step, 1 if registered else 2]
                    if not registered:
                        log.warning("%s is a complete checkpoint newer than Ray Train's latest registered one "
                                    "(%s), reported just before a failure: resuming from it", folder, ray_dir)
            if _distributed(self.world_size):
                t = torch.tensor(choice, dtype=torch.int64, device=_comm_device(self.device()))
                dist.broadcast(t, src=0)
                choice = t.cpu().tolist()
            step, source = choice
            if source == 0:
                yield None
            elif source == 1:
                yield ray_dir
            else:
                d = self.storage / ckpt.checkpoint_name(step)
                if not d.is_dir():
                    raise RuntimeError(f"rank {self.rank}: checkpoint {d} chosen by rank 0 is not visible here; "
                                       "on a multi-node cluster output_dir must be on shared storage")
                yield d

    def report(self, metrics: dict, directory: Path | None, name: str | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(directory)) if directory is not None else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint else None)

    def crash(self, step: int) -> None:
        """Fault injection: exit abruptly, as a crashed worker would (Ray Train replaces the worker group)."""
        os._exit(1)


class LocalContext:
    """One process, no Ray (benchmarks, debugging): checkpoints under ``output_dir/checkpoints``."""

    def __init__(self, output_dir: str | Path, device: str | torch.device = "cpu", keep: int = 2) -> None:
        self.rank, self.world_size, self.local_world_size = 0, 1, 1
        self._device = torch.device(device)
        self.root = Path(output_dir) / "checkpoints"
        self.keep = keep

    def device(self) -> torch.device:
        return self._device

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self._device)

    def _saved(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        # complete ones only: a copy cut short (full disk, crash) must not be resumed from
        return sorted((p for p in self.root.iterdir()
                       if p.name.startswith("step-") and ckpt.complete_step(p) is not None), key=lambda p: p.name)

    @contextlib.contextmanager
    def restored(self) -> Iterator[Path | None]:
        saved = self._saved()
        yield saved[-1] if saved else None

    def report(self, metrics: dict, directory: Path | None, name: str | None) -> None:
        if directory is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.root / (name or ckpt.checkpoint_name(metrics["step"]))
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(directory, target)
        for old in self._saved()[:-self.keep]:
            shutil.rmtree(old)

    def crash(self, step: int) -> None:
        """Fault injection in-process: raise (exiting would end the caller's process too)."""
        raise InjectedFault(f"{FAULT_ENV}: fault injected after step {step}")


# ----------------------------------------------------------------------------------------------------------
# collectives (no-ops on one rank)

def _distributed(world_size: int) -> bool:
    return world_size > 1 and dist.is_available() and dist.is_initialized()


def _comm_device(device: torch.device) -> torch.device:
    """NCCL needs CUDA tensors; gloo CPU ones."""
    return device if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_weights(weights: dict[str, float], version: int, names: list[str], world_size: int,
                      device: torch.device) -> tuple[dict[str, float], int]:
    """Rank 0's (weights, version) on every rank: one float64 tensor [version, w_1..w_N]."""
    if not _distributed(world_size):
        return weights, version
    t = torch.tensor([float(version)] + [float(weights[n]) for n in names], dtype=torch.float64,
                     device=_comm_device(device))
    dist.broadcast(t, src=0)
    values = t.cpu().tolist()
    return {n: values[i + 1] for i, n in enumerate(names)}, int(round(values[0]))


def all_reduce_sum(values: list[float], world_size: int, device: torch.device) -> list[float]:
    if not _distributed(world_size):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


# ----------------------------------------------------------------------------------------------------------
# pieces

def is_eval_step(step: int, interval: int, total: int) -> bool:
    return step % interval == 0 or step == total


def window_end(step: int, interval: int, total: int) -> int:
    """The next interval boundary after ``step`` (where new weights may arrive), capped at ``total``."""
    return min((step // interval + 1) * interval, total)


def run_storage(output_dir: str | Path, run_id: str) -> Path:
    """The run's folder in Ray Train's storage: ``RunConfig(storage_path=output_dir/ray, name=run_id)``."""
    return Path(output_dir) / "ray" / run_id


def pending_faults(steps: list[int], output_dir: Path) -> set[int]:
    """The fault-injection steps not yet triggered for this output_dir (each fires once: a marker file)."""
    return {int(s) for s in steps if not (output_dir / f".fault-{s}").exists()}


def _load_model(path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False, use_safetensors=True,
                                                dtype=torch.float32)


def log_origin() -> None:
    """Which ddk this process runs (a Ray Job ships the checkout's code: deploy/ray/submit.sh)."""
    import ddk

    log.info("ddk %s imported from %s", ddk.__version__, Path(ddk.__file__).parent)


class _ProgressPoster:
    """Fire-and-forget progress reports to the controller, on one daemon thread.

    Only the newest report waits to be sent (a slow or absent controller neither queues reports up nor holds a
    step); each is sent once, with a short timeout and no retry. Failures are logged (once per outage), never
    raised. :meth:`close` lets the thread send the last report, waiting at most ``timeout`` seconds.
    """

    def __init__(self, url: str, token: str | None, run_id: str, timeout: float) -> None:
        from ddk.controller.client import ControllerClient

        self.client = ControllerClient(url, token, timeout=timeout, max_retries=0)
        self.run_id, self.timeout = run_id, timeout
        self._cond = threading.Condition()
        self._next: dict | None = None
        self._closed = self._failing = False
        self._thread = threading.Thread(target=self._run, name="ddk-progress", daemon=True)
        self._thread.start()

    def offer(self, report: dict) -> None:
        with self._cond:
            self._next = report
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._next is None and not self._closed:
                    self._cond.wait()
                if self._next is None:
                    return
                report, self._next = self._next, None
            try:
                self.client.post_progress(self.run_id, **report)
            except Exception as e:  # noqa: BLE001 - progress is for the page: the run goes on regardless
                if not self._failing:
                    log.warning("progress not posted to the controller (%s); training goes on", e)
                self._failing = True
            else:
                if self._failing:
                    log.info("progress reaches the controller again")
                self._failing = False

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(self.timeout + 1.0)
        if not self._thread.is_alive():
            self.client.close()


def _finite_or_none(x: float | None) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def onpolicy_progress(rec: dict | None) -> dict | None:
    """The progress report's ``onpolicy`` object from a step's on-policy record (ddk.trainer.onpolicy's, as
    metrics.jsonl logs it): its ``ddk.vocab.ONPOLICY_FIELDS``, non-finite numbers left out; None for
    a step without rollouts (its record has no timings). Pure."""
    from ddk.vocab import ONPOLICY_FIELDS

    if not rec or "generation_s" not in rec:
        return None
    out: dict = {}
    for k in ONPOLICY_FIELDS:
        v = rec.get(k)
        if k == "completion_len":
            v = {d: float(x) for d, x in (v or {}).items() if np.isfinite(x)} or None
        elif k == "version_lag":
            v = None if v is None else int(v)
        else:
            v = _finite_or_none(v)
        if v is not None:
            out[k] = v
    return out


class ProgressReporter:
    """Rank 0's progress reports (step of total, loss) for the controller's page, which never block or fail the
    run (the evaluations and the weights are the mixture sync's, ddk.trainer.mixture_sync)."""

    PROGRESS_EVERY_S = 5.0   # progress reports at most this often, besides the one at each evaluation step
    PROGRESS_TIMEOUT_S = 2.0

    def __init__(self, url: str | None, token: str | None, run_id: str) -> None:
        self._poster: _ProgressPoster | None = None  # no controller: no progress reports
        if url:
            self._poster = _ProgressPoster(url, token, run_id, self.PROGRESS_TIMEOUT_S)
        self._progress_at = -float("inf")

    def progress(self, step: int, total_steps: int, loss: float | None = None, ce: float | None = None,
                 kl: float | None = None, tokens_per_s: float | None = None, force: bool = False,
                 onpolicy: dict | None = None) -> bool:
        """Report progress, at most every PROGRESS_EVERY_S seconds unless ``force`` (an evaluation step);
        returns whether a report was handed to the background poster. Non-finite numbers go as null.
        ``onpolicy``: the step's on-policy numbers (:func:`onpolicy_progress`), sent when given."""
        if self._poster is None:
            return False
        now = time.monotonic()
        if not force and now - self._progress_at < self.PROGRESS_EVERY_S:
            return False
        self._progress_at = now
        self._poster.offer({"step": int(step), "total_steps": int(total_steps), "loss": _finite_or_none(loss),
                            "ce": _finite_or_none(ce), "kl": _finite_or_none(kl),
                            "tokens_per_s": _finite_or_none(tokens_per_s),
                            **({"onpolicy": onpolicy} if onpolicy else {})})
        return True

    def close(self) -> None:
        if self._poster is not None:
            self._poster.close()
            self._poster = None


@dataclass
class _Throughput:
    """This attempt's totals over its steps (the end line and the summary)."""

    tokens: int = 0
    step_s: float = 0.0
    step_cpu_s: float = 0.0  # CPU time of this process (loop + feed thread) during the steps, for benchmarks
    wait_s: float = 0.0

    def add(self, tokens: int, step_s: float, step_cpu_s: float, wait_s: float) -> None:
        self.tokens += tokens
        self.step_s += step_s
        self.step_cpu_s += step_cpu_s
        self.wait_s += wait_s


# ----------------------------------------------------------------------------------------------------------
# the loop


def step_objective(dataset_loss: float, dataset_tokens: float, rollout_tokens: float, rollout_sum: float) -> float:
    """An on-policy step's loss, what its gradient is the gradient of (ddk.trainer.onpolicy.OnPolicyStep): the
    mean over the step's N dataset tokens (``dataset_loss``: CE + gamma D) and M rollout tokens (``rollout_sum``:
    gamma M x the on-policy term, summed over the workers), ``(N dataset_loss + rollout_sum) / (N + M)``; without
    dataset tokens the rollouts' mean alone, without rollouts the dataset loss."""
    n, m = float(dataset_tokens), float(rollout_tokens)
    if m <= 0:
        return dataset_loss
    if n <= 0:
        return rollout_sum / m
    return (n * dataset_loss + rollout_sum) / (n + m)


class Trainer:
    """One rank of a distillation run: ``Trainer(job, ctx).fit()`` (the module docstring has the steps).

    ``job``: a :class:`~ddk.trainer.config.TrainJob` (or its ``model_dump()``); ``ctx``: :class:`RayContext` or
    :class:`LocalContext`; ``teacher_client`` replaces the TeacherClient built from ``teacher.urls``
    (benchmarks). Every rank holds the run's :attr:`mixture` (rank 0's talks to the controller) and its
    :attr:`distributed` (:class:`~ddk.trainer.parallel.Distributed`: placement, checkpoints, export); rank 0 alone holds
    ``progress`` and ``writer``.
    """

    def __init__(self, job: TrainJob | dict, ctx, teacher_client: Any | None = None) -> None:
        from ddk.runtime import apply_process_defaults

        apply_process_defaults("Trainer")  # OMP_WAIT_POLICY=PASSIVE; a warning when torch loaded OpenMP without it
        self.job = job if isinstance(job, TrainJob) else TrainJob.model_validate(job)
        self.cfg = self.job.config
        self.ctx = ctx
        self.rank, self.world = ctx.rank, ctx.world_size
        self.out_dir = Path(self.cfg.output_dir)
        self.total, self.K = self.cfg.train.steps, self.cfg.mixture.interval_steps
        self.teacher_client = teacher_client
        self.state = TrainState(teacher_loss=self.job.teacher_loss)
        self.restored = False
        self.mixture: MixtureSync | None = None
        self.model = self.raw_model = self.teacher = self.feed = self.progress = self.writer = self.distributed = None
        self.throughput = _Throughput()
        self.t_start = time.perf_counter()
        self.onpolicy = None  # kd.on_policy > 0: ddk.trainer.onpolicy.OnPolicyStep
        self.gap_signal = None  # mixture.signal accuracy / onpolicy, rank 0: ddk.trainer.gap_signal.GapSignal

    # -- setup -------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Data and the mixture; the student placed (:class:`~ddk.trainer.parallel.Distributed`), optimiser and
        schedule; the teacher and its feed; the checkpoint entries registered and :meth:`resume` (into all of
        them); on rank 0 the progress reports and the metrics writer."""
        cfg = self.cfg
        threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // self.ctx.local_world_size))
        torch.set_num_threads(max(1, threads))
        torch.manual_seed(cfg.seed)
        self.device = self.ctx.device()
        self._setup_data()
        self.raw_model = _load_model(cfg.student.model)
        from ddk.trainer.parallel import Distributed

        # train.strategy (parallel.py): placed first, so that the optimiser holds the placed parameters (the
        # sharded DTensors when sharded)
        self.distributed = Distributed(cfg.train.strategy, self.ctx, self.device,
                                scale.resolve_precision(cfg.train.precision, self.device))
        self.model = self.distributed.place(self._student_step())  # the student + its loss (scale.StudentStep)
        self.raw_model = getattr(self.model, "module", self.model).student
        self.optimizer = build_optimizer(self.raw_model, cfg.train.lr, cfg.train.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg.train.warmup_steps,
                                                                                     self.total))
        self._setup_feed()
        self.distributed.attach(self.raw_model, self.optimizer, self.scheduler)
        self.distributed.register("trainer", self.state)
        self.distributed.register("mixture", self.mixture)
        self.distributed.register("sampler", self.feed, per_rank=True)  # the sampler's position after the last batch
        if cfg.kd.on_policy > 0:  # rollout rows (issue 28, ddk.trainer.onpolicy); the engine's counter per rank
            from ddk.trainer.onpolicy import OnPolicyStep

            self.onpolicy = OnPolicyStep(cfg, self.rank, self.domains, self.out_dir, self.job.teacher_token)
            self.distributed.register("rollout", self.onpolicy, per_rank=True)
        if cfg.mixture.signal != "ratio" and self.rank == 0:  # the gap the controller sees (gap_signal.py)
            from ddk.trainer.gap_signal import GapSignal

            self.gap_signal = GapSignal(cfg, self.tokenizer, self.job.teacher_token)
        self.resume()
        self._setup_scale()
        if self.state.step >= self.total and self.rank == 0:
            log.info("the run already reached step %d of %d", self.state.step, self.total)
        if self.rank == 0:
            self._setup_rank0()
        self.faults = pending_faults(self.job.fault_at_steps, self.out_dir) if self.rank == self.world - 1 else set()
        self.tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum_steps * cfg.data.seq_len * self.world
        self.t_start = time.perf_counter()

    def _student_step(self) -> torch.nn.Module:
        """What the context places (DDP under Ray): :class:`~ddk.trainer.scale.StudentStep`, the student with its
        loss, so that the forward DDP wraps returns the loss and every parameter is used inside it. Switches on
        ``train.activation_checkpointing``. The hidden-state (chunked) loss is taken when ``kd.chunk_tokens != 0``
        and the student's logits are its output projection of its last hidden states (checked on a short input;
        otherwise the full-logits path, with a warning)."""
        cfg = self.cfg
        if cfg.train.activation_checkpointing:
            scale.enable_activation_checkpointing(self.raw_model)
        chunk = cfg.kd.chunk_tokens
        if chunk != 0:
            problem = scale.hidden_state_problem(self.raw_model)
            if problem is not None:
                log.warning("kd.chunk_tokens: %s; rank %d computes the loss from the full logits", problem,
                            self.rank)
                chunk = 0
        self.step_module = scale.StudentStep(self.raw_model, cfg.kd, chunk)
        return self.step_module

    def _setup_scale(self) -> None:
        """``train.precision`` (autocast dtype; fp16's GradScaler, resumed with the run), ``train.compile``
        (the placed student's decoder, in place) and the FLOPs count behind MFU."""
        cfg = self.cfg
        self.accum = cfg.train.grad_accum_steps
        self.precision = scale.resolve_precision(cfg.train.precision, self.device)
        self.scaler = scale.grad_scaler(self.device, self.precision)
        if self.state.scaler is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict(self.state.scaler)
        if cfg.train.compile:
            scale.compile_student(self.raw_model, self.device)
        self.flop_params = scale.flop_parameters(self.raw_model)
        self.peak_tflops = scale.peak_tflops(cfg.train.peak_tflops, self.device, self.precision)
        if self.rank == 0:
            log.info("precision %s, %d x %d sequences per worker and step, loss from %s%s%s", self.precision,
                     self.accum, cfg.train.batch_size,
                     "the hidden states (chunked)" if self.step_module.chunked else "the full logits",
                     ", activation checkpointing" if cfg.train.activation_checkpointing else "",
                     ", torch.compile" if cfg.train.compile else "")

    def _setup_data(self) -> None:
        """The driver prepared the token cache, so this only memory-maps it."""
        from transformers import AutoTokenizer

        from ddk.data.cache import prepare_domains
        from ddk.data.domains import load_domain_specs
        from ddk.trainer.sampler import DomainSampler

        cfg = self.cfg
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.student.model, trust_remote_code=False)
        self.domains = prepare_domains(load_domain_specs(cfg.data.source()), self.tokenizer, cfg.data.seq_len,
                                       cfg.data.cache_dir)
        self.names = sorted(self.domains)
        self.sampler = DomainSampler({n: len(self.domains[n].train) for n in self.names}, seed=cfg.seed,
                                     rank=self.rank, world_size=self.world)
        # the run's one copy of the mixture; rank 0's posts the evaluations to the controller (mixture_sync.py)
        self.mixture = MixtureSync.connect(cfg.controller.url if self.rank == 0 else None, self.job.controller_token,
                                           cfg.run_id, {n: float(self.job.initial_weights[n]) for n in self.names},
                                           int(self.job.initial_version))

    def _setup_feed(self) -> None:
        """The teacher only when the loss needs it (CPT never calls it), and the feed that prefetches from it."""
        from ddk.trainer.feed import TeacherFeed, domain_labels

        if self.cfg.kd.gamma > 0:
            self.teacher = self.teacher_client if self.teacher_client is not None else self._open_teacher()

        def blocks(rows):
            return np.stack([self.domains[dn].train[i] for dn, i in rows])

        self.feed = TeacherFeed(self.sampler, blocks, self.cfg.train.batch_size, self.teacher, self.cfg.kd.top_k,
                                micro_batches=self.cfg.train.grad_accum_steps, mixture=self.mixture,
                                labels=domain_labels(self.domains))  # conversations: assistant tokens only

    def _open_teacher(self):
        """The configured teacher: the top-k store (``cache.dir``, teacher.urls behind it: topk_source.py), or
        the service (``teacher.routes``: each domain's rows to its own teacher, ddk.teacher.routes)."""
        from ddk.trainer.xtok_teacher import open_cross_tokenizer  # teachers of another tokenizer (issue 29)

        if self.cfg.cache.dir:
            from ddk.trainer.topk_source import open_source

            return open_cross_tokenizer(self.cfg, open_source(self.cfg, self.job.teacher_token), self.tokenizer,
                                        self.job.teacher_token)
        from ddk.teacher.client import TeacherClient
        from ddk.teacher.routes import RoutedTeacher

        token = self.job.teacher_token
        return open_cross_tokenizer(self.cfg, RoutedTeacher(self.cfg.teacher.urls, self.cfg.teacher.routes,
                                    make_client=lambda urls: TeacherClient(urls, token=token))
                                    if self.cfg.teacher.routes else TeacherClient(self.cfg.teacher.urls, token=token),
                                    self.tokenizer, token)

    def _setup_rank0(self) -> None:
        s = self.state
        self.progress = ProgressReporter(self.cfg.controller.url, self.job.controller_token, self.cfg.run_id)
        kept = truncate_metrics(self.out_dir / METRICS, s.step if self.restored else None)
        if kept:
            log.info("metrics: kept %d lines of the attempt that wrote checkpoint step %d", kept, s.step)
        # logging.*: every metrics record also goes to the configured trackers (tracking.py)
        self.writer = tracked_writer(MetricsWriter(self.out_dir / METRICS), self.cfg,
                                     resume_step=s.step if self.restored else None)

    def resume(self) -> bool:
        """Load the newest checkpoint the context offers (none: a fresh start, False) into the student,
        optimiser, schedule, RNG and the registered entries (:attr:`state`, :attr:`mixture`, the feed's sampler),
        whatever the number of workers and the strategy that wrote it. The job's teacher losses win over the
        saved ones."""
        with self.ctx.restored() as d:
            if d is None:
                return False
            given = self.state.teacher_loss
            self.distributed.load(d)
            self.mixture.adopt({n: self.mixture.weights[n] for n in self.names}, self.mixture.version)
            self.state.teacher_loss = given or self.state.teacher_loss
            log.info("rank %d: resumed from %s at step %d (weights version %d)", self.rank, d, self.state.step,
                     self.mixture.version)
        self.restored = True
        return True

    # -- the steps ---------------------------------------------------------------------------------------
    def evaluate(self) -> None:
        """Steps 1-2: at a boundary every rank evaluates its share and rank 0 posts the losses (or retries the
        unposted ones, when a try is due); every rank takes rank 0's weights, and the feed drops what it drew under
        older ones."""
        s, m = self.state, self.mixture
        before = m.version
        losses = self.student_losses() if is_eval_step(s.step, self.K, self.total) else None
        if self.rank == 0:
            if losses is not None:
                self._post_evaluation(losses)
            elif m.unposted:
                eval_step = m.unposted[-1]["step"]
                answer = m.try_post(s.step)
                if answer:
                    self.writer.write({"event": "weights", "step": s.step, "eval_step": eval_step,
                                       "version": answer["version"], "weights": answer["weights"]})
        m.adopt(*broadcast_weights(m.weights, m.version, self.names, self.world, self.device))
        if m.version != before:
            self.feed.cancel()  # batches prefetched under the old weights are dropped

    def student_losses(self) -> dict[str, float]:
        """The student's loss per domain on the run's evaluation sets, the evaluation split over the ranks
        (:class:`ddk.trainer.evaluate.Evaluator`: each rank scores its part of every domain's blocks, the per-block
        sums are all-reduced). Also sets :attr:`evaluation` (teacher losses, standard errors, diagnostics)."""
        self.evaluation = self._evaluator().evaluate(self.raw_model, self.state.tokens, self._route_label)
        self.diagnostics = self.evaluation.diagnostics
        return self.evaluation.student_loss

    def _evaluator(self):
        """The run's :class:`~ddk.trainer.evaluate.Evaluator`, built at the first evaluation; rank 0 records the
        evaluation sets (``eval-set.json``: fingerprint and coverage per domain) and warns when a resumed run's
        differ from the checkpointed attempt's (the validation data changed)."""
        if getattr(self, "_eval", None) is None:
            from ddk.trainer.evaluate import Evaluator

            teacher = self.teacher if self.teacher is not None else self._eval_teacher()
            self._eval = Evaluator(self.cfg, {n: self.domains[n] for n in self.names}, self.rank, self.world,
                                   self.device, self.precision, self.step_module.chunked, teacher,
                                   lambda v: all_reduce_sum(v, self.world, self.device))
            if getattr(teacher, "cross_tokenizer", False):  # its top-k is in another vocabulary: no diagnostics
                self._eval.uses_topk = False
            if self.rank == 0:
                self._record_eval_set(self._eval.record())
        return self._eval

    def _eval_teacher(self):
        """A teacher for the evaluation alone when the loss does not use one (``kd.gamma: 0``) but the config
        names one (``teacher.urls`` or ``cache.dir``): the ratios are then the teacher's, not the first
        evaluation's. None without one."""
        if not (self.cfg.teacher.all_urls() or self.cfg.cache.dir):
            return None
        self._own_eval_teacher = self._open_teacher()
        return self._own_eval_teacher

    def _record_eval_set(self, record: dict) -> None:
        path = self.out_dir / "eval-set.json"
        try:
            old = json.loads(path.read_text()) if path.exists() else None
        except (OSError, ValueError):
            old = None
        if old and old.get("fingerprint") != record["fingerprint"]:
            log.warning("the evaluation set changed (fingerprint %s, was %s): the validation data or eval.* differ "
                        "from the earlier attempt's, so this run's evaluations before and after step %d are not "
                        "comparable", record["fingerprint"], old.get("fingerprint"), self.state.step)
        path.write_text(json.dumps(record, indent=1))
        cover = record["domains"]
        log.info("evaluation set %s: %s", record["fingerprint"], ", ".join(
            f"{n} {c['documents']} docs / {c['tokens']} tokens" for n, c in cover.items()))

    def _route_label(self, domain: str) -> str:
        """Which teacher served ``domain``: its route's URLs, or the top-k store."""
        from ddk.teacher.routes import RoutedTeacher

        urls = self.teacher.urls_of(domain) if isinstance(self.teacher, RoutedTeacher) else self.cfg.teacher.urls
        where = ",".join(urls)
        if self.cfg.cache.dir:
            return f"store {self.cfg.cache.dir}" + (f" + {where}" if where else "")
        return where or "teacher"

    def _post_evaluation(self, losses: dict[str, float]) -> None:
        s = self.state
        student_loss = {n: float(losses[n]) for n in self.names}
        ev = getattr(self, "evaluation", None)
        if ev is not None and ev.teacher_loss is not None:  # the teacher's, asked once by the evaluator
            s.teacher_loss = dict(ev.teacher_loss)
        if s.teacher_loss is None:  # CPT without a teacher: ratios relative to the initial student
            s.teacher_loss = dict(student_loss)
        diagnostics = getattr(self, "diagnostics", None)
        se = dict(ev.log_ratio_se) if ev is not None and ev.teacher_loss is not None else {}  # the ratio's
        gap = self.gap_signal.measure(self.raw_model) if self.gap_signal is not None else None
        # what the controller gets: the ratio's losses and SEs, or (mixture.signal accuracy / onpolicy) the signal's
        post_s, post_t, post_se, signal = student_loss, s.teacher_loss, se, {}
        if gap is not None:  # a domain without an SE (one prompt) is left out, as the evaluator's
            post_s, post_t, signal = gap["student_loss"], gap["teacher_loss"], {"signal": gap["signal"]}
            post_se = {d: v for d, v in ((d, _finite_or_none(v)) for d, v in gap["log_ratio_se"].items())
                       if v is not None}
        self.mixture.submit(s.step, post_s, post_t, {n: float(s.tokens.get(n, 0.0)) for n in self.names},
                            diagnostics, **({"log_ratio_se": post_se} if post_se else {}), **signal)
        answer = self.mixture.try_post(s.step)
        from ddk.trainer.xtok_teacher import eval_record
        if answer and answer.get("warning"):  # the controller: the gaps are within their standard errors
            log.warning("step %d: the mixture is steering by noise; raise eval tokens", s.step)
        self.writer.write({"event": "eval", "step": s.step, "student_loss": student_loss,
                           "teacher_loss": s.teacher_loss, "ratio": ratio(student_loss, s.teacher_loss),
                           "version": answer["version"] if answer else None,
                           "weights": answer["weights"] if answer else None,
                           **({"log_ratio_se": se} if se else {}),
                           **({"warning": answer["warning"]} if answer and answer.get("warning") else {}),
                           **({"eval_set": self._eval.fingerprint} if getattr(self, "_eval", None) else {}),
                           **({"diagnostics": diagnostics} if diagnostics else {}),
                           **({"signal": gap} if gap is not None else {}),  # what was posted (its SEs), why
                           **eval_record(self, student_loss, s.teacher_loss)})  # cross-tokenizer: unit, bits/byte

    def train_step(self) -> float:
        """Steps 3-4: the step's ``train.grad_accum_steps`` micro-batches (forward, loss, backward each), clip,
        AdamW + schedule, the step line. The step's mean loss."""
        s, cfg, device, world = self.state, self.cfg, self.device, self.world
        if not self.feed.covers(s.step):  # drawn with the mixture's weights (evaluate cancels stale windows)
            self.feed.schedule(s.step, window_end(s.step, self.K, self.total))
        t0, c0 = time.perf_counter(), time.process_time()
        micro, waited = [], 0.0
        for _ in range(self.accum):
            b, w = self.feed.next(s.step)
            micro.append(b)
            waited += w
        self.optimizer.zero_grad(set_to_none=True)
        onp = None if self.onpolicy is None else self.onpolicy.backward(  # first: local gradients (its docstring)
            micro, self.raw_model, s.step, device, lambda: scale.autocast(device, self.precision), self.scaler)
        loss, ce, kl = self.backward(micro)
        onp_sums = None
        if onp is not None:  # the step's loss: the mean over dataset and rollout tokens (N, M, gamma M x term);
            # the record is already over all workers (OnPolicyStep.over_workers: N, M summed, the term M-weighted)
            onp_sums = [onp["dataset_tokens"], onp["rollout_tokens"],
                        cfg.kd.gamma * onp["rollout_tokens"] * onp.get("loss", 0.0)]
            self.onpolicy.rescale(self.model.parameters(), onp_sums[0], onp_sums[1])
        if cfg.train.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)  # fp16: clip the true gradient (a no-op otherwise)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)
        self.scaler.step(self.optimizer)  # optimizer.step(), unless fp16 found inf/NaN gradients
        self.scaler.update()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        s.step += 1
        rows = [sum(1 for b in micro for dn, _ in b.rows if dn == n) for n in self.names]
        sums = all_reduce_sum([loss, ce, kl, waited] + rows, world, device)
        for i, n in enumerate(self.names):  # every rank: the rows are all ranks' (all-reduced)
            s.tokens[n] = s.tokens.get(n, 0.0) + float(sums[4 + i]) * cfg.data.seq_len
        dt = time.perf_counter() - t0
        self.throughput.add(self.tokens_per_step, dt, time.process_time() - c0, waited)
        step_loss = sums[0] / world if onp_sums is None else step_objective(sums[0] / world, *onp_sums)
        if self.rank == 0:
            tps = self.tokens_per_step
            self.writer.write({"event": "step", "step": s.step, "loss": step_loss, "ce": sums[1] / world,
                               "kl": sums[2] / world, "lr": lr, "tokens": tps,
                               "tokens_per_s": tps / dt if dt > 0 else 0.0, "step_s": dt,
                               "teacher_wait_s": sums[3] / world, "version": self.mixture.version,
                               "weights": {n: self.mixture.weights[n] for n in self.names},
                               "rows": {n: int(sums[4 + i]) for i, n in enumerate(self.names)},
                               **self._mfu(tps, dt), **({"onpolicy": onp} if onp is not None else {})})
            self.progress.progress(s.step, self.total, step_loss, sums[1] / world, sums[2] / world,
                                     tps / dt if dt > 0 else None, force=is_eval_step(s.step, self.K, self.total),
                                     onpolicy=onpolicy_progress(onp))  # the step's, over all workers
        return step_loss

    def backward(self, micro: list) -> tuple[float, float, float]:
        """Forward and backward of each micro-batch of a step; the gradients add up to the gradient of the
        whole step's batch: micro-batch m's mean loss is scaled by its share of the step's labelled tokens
        (scale.micro_weights), and DDP all-reduces on the last micro-batch only (``no_sync`` before). The
        forward and the loss run under ``train.precision``'s autocast. Returns the step's (loss, ce, kl)."""
        from ddk.trainer.loss import IGNORE_INDEX

        device, last = self.device, len(micro) - 1
        shares = scale.micro_weights([int((b.targets() != IGNORE_INDEX).sum()) for b in micro])
        total = torch.zeros(3, dtype=torch.float64)
        for i, (b, share) in enumerate(zip(micro, shares)):
            ids = b.input_ids.to(device, non_blocking=True)
            t_ids = t_lp = None
            if b.teacher is not None:
                t_ids, t_lp = b.teacher.ids.to(device), b.teacher.logprobs.to(device).float()
            self._xtok = getattr(b.teacher, "xtok", None)  # a cross-tokenizer batch's alignment (xtok_teacher.py)
            with scale.no_sync(self.model, sync=i == last):
                with scale.autocast(device, self.precision):
                    labels = ids[:, 1:] if b.labels is None else b.labels.to(device, non_blocking=True)
                    loss, parts = self._forward(ids[:, :-1], labels, t_ids, t_lp)
                self.scaler.scale(loss * share).backward()
            total += torch.stack([loss.detach().float(), parts["ce"].float(), parts["kl"].float()]).cpu().double() * share
        return tuple(float(x) for x in total)

    def _forward(self, inputs, labels, t_ids, t_lp):
        """The placed student's loss (scale.StudentStep through DDP); a failing torch.compile named as such."""
        xtok = getattr(self, "_xtok", None)
        if not self.cfg.train.compile:
            return self.model(inputs, labels, t_ids, t_lp, xtok)
        try:
            return self.model(inputs, labels, t_ids, t_lp, xtok)
        except Exception as e:
            if scale.is_compile_error(e):
                log.error("train.compile: torch.compile failed on rank %d: %s", self.rank, e)
                raise scale.compile_error(e) from e
            raise

    def _mfu(self, tokens: int, seconds: float) -> dict:
        """The step line's ``mfu`` (6 x parameters x tokens over world x peak): on CUDA, or wherever a peak is
        known (``train.peak_tflops``); null on CUDA without a peak, absent on CPU without one."""
        if self.device.type != "cuda" and self.peak_tflops is None:
            return {}
        return {"mfu": scale.mfu(self.flop_params, tokens, seconds, self.peak_tflops, self.world)}

    def save(self, loss: float) -> None:
        """Step 5: the checkpoint of this step (every registered entry: the trainer's state, the mixture with its
        unposted evaluations, each rank's sampler position), written by every rank through :attr:`distributed` and
        reported to the context."""
        self.state.scaler = self.scaler.state_dict() if self.scaler.is_enabled() else None
        self.distributed.save_and_report(self.state.step, {"step": self.state.step, "loss": loss,
                                                    "version": self.mixture.version})

    def _post_last_evaluation(self) -> None:
        """Before the export: evaluations still unposted (the controller was away at the last boundary) are
        retried for a bounded time (the mixture sync's retry policy, :meth:`MixtureSync.flush`), so the
        controller's history ends with the run's last interval; after that the run ends without them."""
        for eval_step, answer in self.mixture.flush():
            self.writer.write({"event": "weights", "step": self.state.step, "eval_step": eval_step,
                               "version": answer["version"], "weights": answer["weights"]})

    def _inject_fault(self) -> None:
        step = self.state.step
        if step in self.faults:
            (self.out_dir / f".fault-{step}").touch()
            log.error("%s: rank %d exits abruptly after step %d (fault injection)", FAULT_ENV, self.rank, step)
            self.ctx.crash(step)

    # -- the end -----------------------------------------------------------------------------------------
    def export(self) -> Path:
        """The student in Hugging Face format (safetensors + tokenizer) in ``output_dir/final``, with its model
        card ``README.md`` (:mod:`ddk.trainer.card`), replacing an earlier export atomically."""
        target = self.out_dir / "final"
        tmp = target.with_name(target.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        self.distributed.save_pretrained(tmp)  # every rank ran dist.prepare_export (fit)
        self.tokenizer.save_pretrained(tmp)
        try:
            (tmp / "README.md").write_text(self._model_card(), encoding="utf-8")
        except Exception as e:  # the card describes the student; its absence must not lose the student
            log.warning("final/README.md (model card) not written: %s: %s", type(e).__name__, e)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        log.info("final student written to %s", target)
        return target

    def _model_card(self) -> str:
        """The export's README.md: the config, the metrics' evaluations, the tokenizer fingerprint and the
        starting model's license (from its own card, when it has one)."""
        from ddk.fingerprint import tokenizer_fingerprint
        from ddk.trainer.card import license_of, model_card
        from ddk.trainer.config import config_to_dict
        from ddk.trainer.metrics import read_metrics

        base_card = Path(self.cfg.student.model) / "README.md"
        try:
            fingerprint = tokenizer_fingerprint(self.tokenizer)
        except Exception:  # a tokenizer without get_vocab: the card goes without it
            fingerprint = None
        return model_card(config_to_dict(self.cfg), read_metrics(self.out_dir / METRICS), self.names,
                          tokenizer_fingerprint=fingerprint, world_size=self.world,
                          license=license_of(base_card.read_text(errors="replace")) if base_card.is_file() else None)

    def summary(self) -> dict:
        """The end-of-run numbers of this attempt (what :meth:`fit` returns and the ``end`` line holds)."""
        t, s, m = self.throughput, self.state, self.mixture
        return {"step": s.step, "version": m.version, "weights": dict(m.weights),
                "wall_s": time.perf_counter() - self.t_start, "tokens": t.tokens, "tokens_per_s": t.tokens / t.step_s if t.step_s else 0.0,
                "step_s": t.step_s, "step_cpu_s": t.step_cpu_s, "teacher_wait_s": t.wait_s}

    def _close_inputs(self) -> None:
        if self.gap_signal is not None:
            self.gap_signal.close()
            self.gap_signal = None
        if self.onpolicy is not None:
            self.onpolicy.close()
            self.onpolicy = None
        if self.feed is not None:
            self.feed.close()
            self.feed = None
        if self.teacher is not None and self.teacher is not self.teacher_client and hasattr(self.teacher, "close"):
            self.teacher.close()
        self.teacher = None
        own = getattr(self, "_own_eval_teacher", None)  # the evaluation's own teacher (kd.gamma 0)
        if own is not None and hasattr(own, "close"):
            own.close()
        self._own_eval_teacher = None

    def close(self) -> None:
        """Stop the feed; close the teacher client built here, the metrics file and the controller clients."""
        self._close_inputs()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        for name in ("progress", "mixture"):
            if getattr(self, name, None) is not None:
                getattr(self, name).close()
                setattr(self, name, None)

    def fit(self) -> dict:
        """Set up (resuming), run the steps to ``train.steps``, export; returns :meth:`summary`."""
        try:
            self.setup()
            self.model.train()
            while True:
                self.evaluate()
                if self.state.step >= self.total:
                    break
                loss = self.train_step()
                if self.state.step % self.cfg.checkpoint.every_steps == 0 or self.state.step == self.total:
                    self.save(loss)
                self._inject_fault()
            self._close_inputs()
            summary = self.summary()
            self.distributed.prepare_export()  # every rank (sharded: each takes part in gathering the student)
            if self.rank == 0:
                self._post_last_evaluation()
                summary.update(version=self.mixture.version, weights=dict(self.mixture.weights))
                self.export()
                self.writer.write({"event": "end", **summary})
            return summary
        finally:
            self.close()


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point (``TorchTrainer(train_loop_per_worker, train_loop_config=job.model_dump(mode="json"))``):
    the job validated again on this side, then :meth:`Trainer.fit` under a :class:`RayContext`."""
    job = TrainJob.model_validate(config)
    from ddk.logsetup import setup_worker_logging

    setup_worker_logging(job.log_level)  # the driver's console rules on Ray Train's console handler
    log_origin()
    Trainer(job, RayContext(storage=run_storage(job.config.output_dir, job.config.run_id))).fit()
