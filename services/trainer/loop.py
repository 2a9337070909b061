"""The per-worker distillation loop (one process per rank under Ray Train, or one in-process for benchmarks).

Per step ``s`` (``s`` optimiser steps done so far), every rank:

1. at an interval boundary (``s % interval_steps == 0``, step 0 included, and at the last step), rank 0
   evaluates the student on every domain's validation blocks and posts the losses to the controller,
   which answers with the next weights version (the DDK update). A controller that cannot be reached
   does not stop the run: the run keeps its last weights, says so in the log and retries the same
   evaluation at later steps (1, 2, 4 ... steps later, at most 32) until it gets through or a newer
   evaluation replaces it. A 409 (this step is already recorded: a resumed run) means: use the weights
   the controller recorded for this step.
2. rank 0 broadcasts ``[version, w_1 .. w_N]`` as one float64 tensor (torch.distributed, no pickle);
   every rank now draws with the same weights.
3. the teacher feed hands out the step's batch (drawn with those weights, teacher top-k fetched in the
   background, see feed.py); when the weights changed, batches prefetched under the old ones are dropped.
4. forward, ``CE + gamma * KL`` (loss.py), backward (DDP all-reduce), clip, AdamW, LR schedule.
5. at ``checkpoint.every_steps`` and the last step: a checkpoint (checkpoint.py) reported to Ray Train.

Rank 0 appends to ``output_dir/metrics.jsonl`` (see report.py) and finally writes the student in
Hugging Face format to ``output_dir/final``.

The loop talks to its surroundings through a small context (:class:`RayContext` under Ray Train,
:class:`LocalContext` in-process), so the same code runs in both.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from ddk.trainer import checkpoint as ckpt
from ddk.trainer.optim import build_optimizer, lr_lambda
from ddk.trainer.metrics import METRICS, MetricsWriter, ratios, truncate_metrics

log = logging.getLogger("ddk.trainer")

# Test hook for fault tolerance: "6,10" makes the last rank exit abruptly right after step 6 and after
# step 10 (each once per output_dir; a marker file remembers it), as a crashed worker would.
FAULT_ENV = "DDK_FAULT_AT_STEPS"
MAX_RETRY_GAP = 32  # steps between two attempts to reach an unreachable controller, at most


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


def _faults(output_dir: Path) -> set[int]:
    spec = os.environ.get(FAULT_ENV, "").strip()
    steps = {int(s) for s in spec.split(",") if s.strip()} if spec else set()
    return {s for s in steps if not (output_dir / f".fault-{s}").exists()}


def _load_model(path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False, use_safetensors=True,
                                                 dtype=torch.float32)
    return model


def log_origin() -> None:
    """Which ddk this process runs (a Ray Job ships the checkout's code: deploy/ray/submit.sh)."""
    import ddk

    log.info("ddk %s imported from %s", ddk.__version__, Path(ddk.__file__).parent)


class Controller:
    """Rank 0's side of the controller: post evaluations, keep the last weights, retry when unreachable."""

    def __init__(self, url: str | None, token: str | None, run_id: str, weights: dict[str, float],
                 version: int) -> None:
        self.run_id = run_id
        self.weights, self.version = dict(weights), int(version)
        self.client = None
        if url:
            from ddk.controller.client import ControllerClient

            # few fast retries: an outage must not stall every step for long
            self.client = ControllerClient(url, token, timeout=10.0, max_retries=2, backoff=0.25)
        self.pending: dict | None = None     # {"step", "student_loss", "teacher_loss"} not yet accepted
        self._next_try = 0
        self._gap = 1

    def submit(self, step: int, student_loss: dict[str, float], teacher_loss: dict[str, float] | None) -> None:
        """A new evaluation replaces one still waiting to be posted (the controller wants increasing steps)."""
        self.pending = {"step": step, "student_loss": student_loss, "teacher_loss": teacher_loss}
        self._next_try, self._gap = step, 1

    def try_post(self, step: int) -> dict | None:
        """Post the pending evaluation if it is due; the new {version, step, weights} or None."""
        if self.pending is None or step < self._next_try:
            return None
        if self.client is None:  # fixed mixture without a controller: the weights stay as they are
            self.pending = None
            return {"version": self.version, "step": step, "weights": dict(self.weights)}
        from ddk.controller.client import ControllerError, ControllerUnavailable

        p = self.pending
        try:
            answer = self.client.post_evaluation(self.run_id, p["step"], p["student_loss"], p["teacher_loss"])
        except ControllerUnavailable as e:
            self._next_try = step + self._gap
            log.warning("controller unreachable (%s); keeping weights version %d, retrying at step %d",
                        e, self.version, self._next_try)
            self._gap = min(self._gap * 2, MAX_RETRY_GAP)
            return None
        except ControllerError as e:
            if e.status != 409:
                raise
            answer = self._recorded(p["step"])
            log.info("controller already has the evaluation of step %d (resumed run): using its version %d",
                     p["step"], answer["version"])
        self.pending = None
        self.weights, self.version = {k: float(v) for k, v in answer["weights"].items()}, int(answer["version"])
        return answer

    def _recorded(self, step: int) -> dict:
        """The version the controller recorded for ``step`` (history); its current weights if none matches."""
        for v in reversed(self.client.history(self.run_id).get("versions", [])):
            if v.get("step") == step and v.get("version", 0) > 0:
                return {"version": v["version"], "step": step, "weights": v["weights"]}
        return self.client.get_weights(self.run_id)

    def close(self) -> None:
        if self.client is not None and hasattr(self.client, "close"):
            self.client.close()


# ----------------------------------------------------------------------------------------------------------
# the loop

def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point (``TorchTrainer(train_loop_per_worker, train_loop_config=config)``)."""
    logging.basicConfig(level=config.get("log_level", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log_origin()
    run(config, RayContext(storage=run_storage(config["config"]["output_dir"], config["config"]["run_id"])))


def run(config: dict, ctx, teacher_client: Any | None = None) -> dict:
    """Train one rank. ``config``: {"config": config_to_dict(cfg), "teacher_loss": {domain: loss} | None,
    "initial_weights": {domain: w}, "initial_version": int, "controller_token": str | None}.

    ``teacher_client`` replaces the TeacherClient built from ``teacher.urls`` (benchmarks). Returns the
    end-of-run numbers of this attempt.
    """
    from transformers import AutoTokenizer

    from ddk.trainer.config import TrainConfig
    from ddk.trainer.data import load_domain_specs, prepare_domains
    from ddk.trainer.feed import TeacherFeed
    from ddk.trainer.loss import distill_loss
    from ddk.trainer.sampler import DomainSampler

    cfg = TrainConfig.model_validate(config["config"])
    rank, world = ctx.rank, ctx.world_size
    out_dir = Path(cfg.output_dir)
    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // ctx.local_world_size))
    torch.set_num_threads(max(1, threads))
    torch.manual_seed(cfg.seed)
    device = ctx.device()
    total, K = cfg.train.steps, cfg.mixture.interval_steps
    gamma, T = cfg.kd.gamma, cfg.kd.temperature

    # data: the driver prepared the cache, so this only memory-maps it
    tokenizer = AutoTokenizer.from_pretrained(cfg.student.model, trust_remote_code=False)
    source = cfg.data.file if cfg.data.file is not None else {
        "domains": [d.model_dump(exclude_none=True) for d in cfg.data.domains], "val_fraction": cfg.data.val_fraction}
    domains = prepare_domains(load_domain_specs(source), tokenizer, cfg.data.seq_len, cfg.data.cache_dir)
    names = sorted(domains)
    seq_len = cfg.data.seq_len
    sampler = DomainSampler({n: len(domains[n].train) for n in names}, seed=cfg.seed, rank=rank, world_size=world,
                            tokens_per_block=seq_len)

    model = _load_model(cfg.student.model)
    optimizer = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.train.warmup_steps, total))

    weights = {n: float(config["initial_weights"][n]) for n in names}
    version = int(config.get("initial_version", 0))
    teacher_loss = config.get("teacher_loss")
    pending = None
    step, restored = 0, False
    with ctx.restored() as d:
        if d is not None:
            restored = True
            shared, own = ckpt.load_checkpoint(d, rank=rank)
            ckpt.load_model(d, model)
            optimizer.load_state_dict(shared["optimizer"])
            if shared.get("scheduler") is not None:
                scheduler.load_state_dict(shared["scheduler"])
            torch.set_rng_state(shared["torch_rng"])
            step = int(shared["step"])
            weights, version = {n: float(shared["weights"][n]) for n in names}, int(shared["version"])
            extra = shared.get("extra") or {}
            teacher_loss = teacher_loss or extra.get("teacher_loss")
            pending = extra.get("pending")
            if own is not None and own.get("sampler") is not None:
                try:
                    sampler.load_state_dict(own["sampler"])
                except ValueError as e:
                    log.warning("rank %d: sampler state not reusable (%s); its block order starts afresh", rank, e)
            else:
                log.warning("rank %d: the checkpoint has no sampler state for this rank (world size changed?)", rank)
            log.info("rank %d: resumed from %s at step %d (weights version %d)", rank, d, step, version)
    model = ctx.prepare_model(model)
    raw_model = getattr(model, "module", model)
    if step >= total and rank == 0:
        log.info("the run already reached step %d of %d", step, total)

    # teacher: only when the loss needs it (CPT never calls it)
    teacher = None
    if gamma > 0:
        if teacher_client is not None:
            teacher = teacher_client
        else:
            from ddk.teacher.client import TeacherClient

            teacher = TeacherClient(cfg.teacher.urls)

    def blocks(rows):
        return np.stack([domains[dn].train[i] for dn, i in rows])

    feed = TeacherFeed(sampler, blocks, cfg.train.batch_size, teacher, cfg.kd.top_k)

    controller = writer = None
    if rank == 0:
        controller = Controller(cfg.controller.url, config.get("controller_token"), cfg.run_id, weights, version)
        if pending is not None:
            controller.submit(**pending)
        kept = truncate_metrics(out_dir / METRICS, step if restored else None)
        if kept:
            log.info("metrics: kept %d lines of the attempt that wrote checkpoint step %d", kept, step)
        writer = MetricsWriter(out_dir / METRICS)

    faults = _faults(out_dir) if rank == world - 1 else set()
    tokens_per_step = cfg.train.batch_size * seq_len * world
    t_start, tokens_done, wait_total, step_time_total = time.perf_counter(), 0, 0.0, 0.0
    step_cpu_total = 0.0  # CPU time of this process (loop + feed thread) during the steps, for benchmarks
    model.train()
    try:
        while True:
            # 1. evaluation at boundaries (rank 0), posted to the controller
            if rank == 0 and is_eval_step(step, K, total):
                student_loss = _evaluate(raw_model, domains, names, cfg, device)
                if teacher_loss is None:  # CPT without a teacher: ratios relative to the initial student
                    teacher_loss = dict(student_loss)
                controller.submit(step, student_loss, teacher_loss)
                answer = controller.try_post(step)
                writer.write({"event": "eval", "step": step, "student_loss": student_loss,
                              "teacher_loss": teacher_loss, "ratio": ratios(student_loss, teacher_loss),
                              "version": answer["version"] if answer else None,
                              "weights": answer["weights"] if answer else None})
            elif rank == 0 and controller.pending is not None:
                eval_step = controller.pending["step"]
                answer = controller.try_post(step)
                if answer:
                    writer.write({"event": "weights", "step": step, "eval_step": eval_step,
                                  "version": answer["version"], "weights": answer["weights"]})
            if rank == 0:
                weights, version = controller.weights, controller.version

            # 2. every rank takes rank 0's weights
            weights, version = broadcast_weights(weights, version, names, world, device)
            if step >= total:
                break

            # 3. the batch, drawn with these weights (prefetched up to the next boundary)
            if not feed.covers(step) or feed.version != version:
                feed.schedule(step, window_end(step, K, total), weights, version)  # drops stale batches
            t0, c0 = time.perf_counter(), time.process_time()
            batch, waited = feed.next(step)

            # 4. the update
            ids = batch.input_ids.to(device, non_blocking=True)
            inputs, labels = ids[:, :-1], ids[:, 1:]
            t_ids = t_lp = None
            if batch.teacher is not None:
                t_ids = batch.teacher.ids.to(device)
                t_lp = batch.teacher.logprobs.to(device).float()
            logits = model(input_ids=inputs, use_cache=False).logits
            loss, parts = distill_loss(logits, labels, t_ids, t_lp, gamma, T)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            rows = [sum(1 for dn, _ in batch.rows if dn == n) for n in names]
            sums = all_reduce_sum([loss.item(), parts["ce"].item(), parts["kl"].item(), waited] + rows, world, device)
            dt = time.perf_counter() - t0
            step_cpu_total += time.process_time() - c0
            tokens_done += tokens_per_step
            wait_total += waited
            step_time_total += dt
            if rank == 0:
                writer.write({"event": "step", "step": step, "loss": sums[0] / world, "ce": sums[1] / world,
                              "kl": sums[2] / world, "lr": lr, "tokens": tokens_per_step,
                              "tokens_per_s": tokens_per_step / dt if dt > 0 else 0.0, "step_s": dt,
                              "teacher_wait_s": sums[3] / world, "version": batch.version,
                              "weights": {n: weights[n] for n in names},
                              "rows": {n: int(sums[4 + i]) for i, n in enumerate(names)}})

            # 5. checkpoint
            if step % cfg.checkpoint.every_steps == 0 or step == total:
                _save_and_report(ctx, step, raw_model, optimizer, scheduler, weights, version, feed,
                                 teacher_loss, controller, loss=sums[0] / world)
            if step in faults:
                (out_dir / f".fault-{step}").touch()
                log.error("%s: rank %d exits abruptly after step %d (fault injection)", FAULT_ENV, rank, step)
                os._exit(1)
    finally:
        feed.close()
        if teacher is not None and teacher is not teacher_client and hasattr(teacher, "close"):
            teacher.close()

    summary = {"step": step, "version": version, "weights": weights, "wall_s": time.perf_counter() - t_start,
               "tokens": tokens_done, "tokens_per_s": tokens_done / step_time_total if step_time_total else 0.0,
               "step_s": step_time_total, "step_cpu_s": step_cpu_total,
               "teacher_wait_s": wait_total}
    if rank == 0:
        if controller.pending is not None:
            log.warning("the last evaluation (step %d) never reached the controller", controller.pending["step"])
        _export(raw_model, tokenizer, out_dir / "final")
        writer.write({"event": "end", **summary})
        writer.close()
        controller.close()
    return summary


def _evaluate(model, domains, names, cfg, device) -> dict[str, float]:
    from ddk.trainer.evaluate import evaluate_domains

    losses = evaluate_domains(model, {n: domains[n] for n in names}, cfg.eval.sequences_per_domain,
                              cfg.eval.batch_size, device)
    return {n: float(losses[n]) for n in names}


def _save_and_report(ctx, step, model, optimizer, scheduler, weights, version, feed, teacher_loss,
                     controller, loss: float) -> None:
    extra = {"teacher_loss": teacher_loss,
             "pending": controller.pending if controller is not None else None}
    with tempfile.TemporaryDirectory(prefix="ddk-ckpt-") as tmp:
        ckpt.save_checkpoint(tmp, rank=ctx.rank, step=step, model=model if ctx.rank == 0 else None,
                             optimizer=optimizer if ctx.rank == 0 else None,
                             scheduler=scheduler if ctx.rank == 0 else None, weights=weights, version=version,
                             rank_state={"sampler": feed.state_dict()}, extra=extra, world_size=ctx.world_size)
        ctx.report({"step": step, "loss": loss, "version": version}, Path(tmp), ckpt.checkpoint_name(step))


def _export(model, tokenizer, target: Path) -> None:
    """The student in Hugging Face format (safetensors + tokenizer), replacing an earlier export atomically."""
    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    log.info("final student written to %s", target)
