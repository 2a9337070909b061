"""Trainer throughput: does the prefetching teacher feed hide the teacher, and does DDK cost time?

Prints one table. Same kit, steps, batch and seed for every row; the trainer loop runs in this process
(``Trainer(job, LocalContext(...)).fit()``: one rank, no Ray, so Ray's start-up is not in the numbers), pinned to
one core; the teacher service (and the controller) run pinned to another core (``taskset``), so the
two really run side by side as on separate machines.

Rows:
  teacher alone     back-to-back ``TeacherClient.topk`` on batches of the training shape
  (a) precomputed   the KD loop (fixed mixture) with the teacher's outputs replayed from memory:
                    the student's own speed
  (b) live teacher  the same loop with the teacher service behind the prefetching feed
  (c) DDK           (b) with the DDK mixture (evaluations posted to the controller, weights applied)
  (d) from store    (a) with the teacher's outputs read from a top-k store on disk (``cache.dir``: the feed's
                    ``ddk.trainer.topk_source.StoreTeacher`` over a ``TopkStore``, float16 entries) holding the
                    run's batches, no teacher behind it
The evaluation's share of the run's wall time (issue 24 item 4, goal <= 10 % at the default K): the time in the
evaluations of row (c) (``Trainer.student_losses``: the forward over every domain's evaluation set, the teacher
asked once per block at the first one) over its wall time, at the bench's K, and projected to the default
``mixture.interval_steps`` (1000) from the mean time of one evaluation e and of one step s: e / (e + K s).
Ratios: (b)/(a) (target >= 0.9: the feed hides the teacher), DDK wall / fixed-mixture KD wall (target
<= 1.05), (d)/(a) (target >= 0.95: reading the store costs the step nothing), and end-to-end distillation tokens/s over the slower of teacher alone and student alone.
tokens = predicted positions (batch x seq_len) per step; tokens/s from the steps' own time (the
evaluations every K steps are in the wall times only). On a machine other programs are using too, the
wall-clock ratio also measures them; the extra row "(b)/(a) by step CPU time + teacher wait" counts
each step as the trainer process's CPU time (loop and feed thread) plus the time it waited for the
teacher, which is what the step would take with its core to itself.

Sizing. (b)/(a) can only reach 1 when the teacher alone produces faster than the student consumes
(teacher and student are meant to sit on separate hardware, the teacher's sized to keep up). The quick
kit's student is so small (2 x 64) that its training step outruns the kit teacher's forward pass on one
core, so by default (``--student teacher-sized``) the bench trains a student of the teacher's own shape
(random initialisation, the kit's tokenizer): its forward + backward costs about three teacher forwards.
``--student kit`` trains the kit's student instead: then the teacher is the bottleneck and the last ratio
(end to end over the slower of the two) is the number that matters.

Run:  .venv/bin/python bench/trainer.py [--steps 40] [--batch-size 8] [--interval 10] [--student kit] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent

from common import start_server  # noqa: E402
from ddk.launcher import kill_group  # noqa: E402


def start(argv: list[str], core: int | None, log_path: Path) -> tuple[str, subprocess.Popen]:
    prefix = ["taskset", "-c", str(core)] if core is not None else []
    return start_server(prefix + [sys.executable, "-m", "ddk.cli", *argv], log_path, timeout=300,
                        env={**os.environ, "OMP_NUM_THREADS": "1"})


def fill_store(table: dict[bytes, object], path: Path, fingerprint: str, vocab_size: int, batch_size: int):
    """A top-k store holding the recorded batches' outputs (every row one entry), as precompute writes it."""
    from ddk.teacher.store import TopkStore

    store = TopkStore(path, encoding="float16", vocab_size=vocab_size)
    for key, out in table.items():
        rows = np.frombuffer(key, dtype=np.int64).reshape(len(out.ids), -1)  # a batch, or a chunk of eval blocks
        store.put_many(fingerprint, [(rows[j], out.ids[j].numpy(), out.logprobs[j].numpy(),
                                      out.target_logprob[j].numpy()) for j in range(len(rows))])
    store.close()


def store_teacher(path: Path, fingerprint: str, vocab_size: int, top_k: int):
    """What a ``cache.dir`` run's feed asks: the store alone (a miss is an error)."""
    from ddk.teacher.store import TopkStore
    from ddk.trainer.topk_source import StoreTeacher

    return StoreTeacher(TopkStore(path, vocab_size=vocab_size), fingerprint, None, top_k)


class Replay:
    """A teacher that answers from memory: outputs recorded beforehand, keyed by the batch's token ids."""

    def __init__(self, table: dict[bytes, object]):
        self.table, self.misses = table, 0

    def topk(self, ids, top_k):
        return self.table[np.asarray(ids, dtype=np.int64).tobytes()]


class Recorder:
    """A teacher client that keeps every answer it passes on, keyed like :class:`Replay` looks them up."""

    def __init__(self, client, table: dict[bytes, object]):
        self.client, self.table = client, table

    def topk(self, ids, top_k):
        out = self.client.topk(ids, top_k)
        self.table[np.asarray(ids, dtype=np.int64).tobytes()] = out
        return out


def precompute(client, job, steps: int) -> tuple[dict[bytes, object], list[bytes]]:
    """The fixed-mixture run's batches (deterministic from the seed) and their teacher outputs, and the teacher's
    answers on the evaluation blocks, asked in the chunks the loop's diagnostics ask for them (one rank); and the
    training batches' keys, in step order."""
    from transformers import AutoTokenizer

    from ddk.data.cache import prepare_domains
    from ddk.data.domains import load_domain_specs
    from ddk.trainer.sampler import DomainSampler

    cfg = job.config
    tok = AutoTokenizer.from_pretrained(cfg.student.model)
    domains = prepare_domains(load_domain_specs(cfg.data.source()), tok, cfg.data.seq_len, cfg.data.cache_dir)
    names = sorted(domains)
    sampler = DomainSampler({n: len(domains[n].train) for n in names}, seed=cfg.seed, rank=0, world_size=1)
    table = {}
    for step in range(steps):
        rows = sampler.draw(step, job.initial_weights, cfg.train.batch_size)
        ids = torch.from_numpy(np.stack([domains[d].train[i] for d, i in rows]).astype(np.int64))
        table[ids.numpy().tobytes()] = client.topk(ids, cfg.kd.top_k)
    from ddk.trainer.evaluate import evaluation_sets, teacher_answers

    train_keys = list(table)
    for n, es in evaluation_sets(domains, cfg.eval).items():  # as the loop's Evaluator asks for them (one rank)
        if len(es):
            teacher_answers(Recorder(client, table), es, cfg.kd.top_k, cfg.eval.batch_size, n)
    return table, train_keys


def timed_trainer():
    """Trainer that adds up the wall time of its evaluations (``eval_s``, ``evals``) into its summary."""
    from ddk.trainer.loop import Trainer

    class Timed(Trainer):
        eval_s, evals = 0.0, 0

        def student_losses(self):
            t0 = time.perf_counter()
            try:
                return super().student_losses()
            finally:
                self.eval_s += time.perf_counter() - t0
                self.evals += 1

        def summary(self):
            return {**super().summary(), "eval_s": self.eval_s, "evals": self.evals}

    return Timed


def teacher_sized_student(kit: Path, target: Path) -> Path:
    """A randomly initialised student with the teacher's architecture and the kit's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(kit / "teacher", trust_remote_code=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(target, safe_serialization=True)
    for f in (kit / "student").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, target / f.name)
    return target


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kit", default=str(REPO / ".cache" / "kit-quick"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--interval", type=int, default=10, help="mixture.interval_steps")
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--backend", default="hf", help="teacher backend (hf|vllm|auto)")
    ap.add_argument("--student", choices=("teacher-sized", "kit"), default="teacher-sized",
                    help="the student trained (see Sizing above)")
    ap.add_argument("--repeats", type=int, default=1, help="run every row this many times; medians are shown")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, runs)")
    ap.add_argument("--teacher-core", type=int, default=0)
    ap.add_argument("--trainer-core", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from ddk.teacher.client import TeacherClient
    from ddk.trainer.config import load_config
    from ddk.kit.fixtures import build_kit
    from ddk.trainer.launch import prepare
    from ddk.trainer.config import MixtureSection
    from ddk.trainer.loop import LocalContext

    Trainer = timed_trainer()

    kit = build_kit(Path(args.kit), quick=True, seed=0)
    load_start = os.getloadavg()
    cores = os.sched_getaffinity(0)
    pin = len(cores) >= 2 and {args.teacher_core, args.trainer_core} <= cores
    work = Path(tempfile.mkdtemp(prefix="ddk-bench-trainer-"))
    teacher_url, tproc = start(["teacher", "serve", "--model", str(kit / "teacher"), "--backend", args.backend],
                               args.teacher_core if pin else None, work / "teacher.log")
    ctrl_url, cproc = start(["controller", "serve", "--db", str(work / "c.sqlite")],
                            args.teacher_core if pin else None, work / "controller.log")
    student = kit / "student" if args.student == "kit" else teacher_sized_student(kit, work / "student")
    if pin:
        os.sched_setaffinity(0, {args.trainer_core})
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    rows: list[tuple[str, str, str]] = []
    try:
        def config(name: str, policy: str):  # the TrainJob of one row
            cfg = load_config(str(kit / "train.yaml"), [
                f"run_id=bench-{name}-{int(time.time())}", f"output_dir={work / name}",
                f"teacher.urls=[{teacher_url}]", f"controller.url={ctrl_url}", f"train.steps={args.steps}",
                f"train.batch_size={args.batch_size}", f"mixture.interval_steps={args.interval}",
                f"mixture.policy={policy}", f"kd.top_k={args.top_k}", f"checkpoint.every_steps={args.steps}",
                f"student.model={student}",
                "ray.num_workers=1", f"data.cache_dir={work / 'tokens'}"])
            return prepare(cfg)

        seq_len = load_config(str(kit / "train.yaml"), []).data.seq_len
        tokens_per_step = args.batch_size * seq_len
        client = TeacherClient(teacher_url)

        # the batches of the fixed-mixture run (deterministic from the seed) and their teacher outputs
        table, train_keys = precompute(client, config("pre", "fixed"), args.steps)
        batches = [torch.from_numpy(np.frombuffer(k, dtype=np.int64).reshape(args.batch_size, -1).copy())
                   for k in train_keys]
        info = client.info()
        store_file = work / "store" / "topk.sqlite"
        fill_store(table, store_file, info["model_fingerprint"], info["vocab_size"], args.batch_size)

        # Each repeat runs every row back to back, so they share the machine's conditions; medians are shown.
        # The order of (a), (b), (c), (d) rotates from one repeat to the next, so that no row always runs first
        # (cold caches) or last (a warmer, fuller process): measured idle, a fixed order made (c) 5-10% slower.
        teacher, a, b, c, d = [], [], [], [], []
        row_specs = {"a": (a, "fixed", "replay"), "b": (b, "fixed", None), "c": (c, "ddk", None),
                     "d": (d, "fixed", "store")}
        for r in range(args.repeats):
            t0 = time.perf_counter()  # teacher alone: the feed's pattern, one request at a time
            for ids in batches:
                client.topk(ids, args.top_k)
            teacher.append(tokens_per_step * len(batches) / (time.perf_counter() - t0))
            order = "abcd"[r % 4:] + "abcd"[:r % 4]
            for name in order:
                results, policy, replay = row_specs[name]
                source = (Replay(table) if replay == "replay" else
                          store_teacher(store_file, info["model_fingerprint"], info["vocab_size"], args.top_k)
                          if replay == "store" else None)
                results.append(Trainer(config(f"{name}{r}", policy), LocalContext(work / f"{name}{r}"),
                                       teacher_client=source).fit())
                if replay == "store":
                    source.close()
        client.close()

        def med(runs, key):
            return float(np.median([x[key] for x in runs]))

        teacher_tps = float(np.median(teacher))
        a_tps, b_tps, c_tps = med(a, "tokens_per_s"), med(b, "tokens_per_s"), med(c, "tokens_per_s")
        def each(values):  # the per-repeat values behind a median
            return "per repeat " + ", ".join(f"{v:.3f}" for v in values) if len(values) > 1 else ""

        b_over_a_all = [y["tokens_per_s"] / x["tokens_per_s"] for x, y in zip(a, b)]
        c_over_b_all = [y["wall_s"] / x["wall_s"] for x, y in zip(b, c)]
        b_over_a = float(np.median(b_over_a_all))

        def cpu_tps(x):  # the step as if it had its core to itself: its CPU time plus the waits on the teacher
            return x["tokens"] / (x["step_cpu_s"] + x["teacher_wait_s"])

        b_over_a_cpu = float(np.median([cpu_tps(y) / cpu_tps(x) for x, y in zip(a, b)]))
        c_over_b = float(np.median(c_over_b_all))
        d_over_a_all = [y["tokens_per_s"] / x["tokens_per_s"] for x, y in zip(a, d)]
        d_over_a = float(np.median(d_over_a_all))
        d_over_a_cpu = float(np.median([cpu_tps(y) / cpu_tps(x) for x, y in zip(a, d)]))
        e2e = float(np.median([y["tokens_per_s"] / min(t, x["tokens_per_s"]) for t, x, y in zip(teacher, a, b)]))
        rows += [
            ("teacher engine alone (topk, 1 in flight)", f"{teacher_tps:,.0f} tok/s", ""),
            ("(a) student, teacher precomputed", f"{a_tps:,.0f} tok/s", f"wall {med(a, 'wall_s'):.1f} s"),
            ("(b) student + live teacher (prefetch)", f"{b_tps:,.0f} tok/s",
             f"waited {med(b, 'teacher_wait_s'):.2f} s, wall {med(b, 'wall_s'):.1f} s"),
            ("(c) DDK + live teacher", f"{c_tps:,.0f} tok/s",
             f"waited {med(c, 'teacher_wait_s'):.2f} s, wall {med(c, 'wall_s'):.1f} s"),
            ("(b)/(a)  [target >= 0.9]", f"{b_over_a:.3f}",
             ("met" if b_over_a >= 0.9 else "NOT met") + f"  {each(b_over_a_all)}"),
            ("(b)/(a) by step CPU time + teacher wait", f"{b_over_a_cpu:.3f}",
             f"(a) {np.median([cpu_tps(x) for x in a]):,.0f}, (b) {np.median([cpu_tps(x) for x in b]):,.0f} tok/s; "
             "other tenants' load taken out"),
            ("DDK wall / fixed KD wall  [target <= 1.05]", f"{c_over_b:.3f}",
             ("met" if c_over_b <= 1.05 else "NOT met") + f"  {each(c_over_b_all)}"),
            ("(d) student, teacher outputs from the top-k store", f"{med(d, 'tokens_per_s'):,.0f} tok/s",
             f"waited {med(d, 'teacher_wait_s'):.2f} s, wall {med(d, 'wall_s'):.1f} s"),
            ("(d)/(a)  [target >= 0.95]", f"{d_over_a:.3f}",
             ("met" if d_over_a >= 0.95 else "NOT met") + f"  {each(d_over_a_all)}; by step CPU time + wait "
             f"{d_over_a_cpu:.3f}"),
            ("e2e (b) / min(teacher alone, student alone)", f"{e2e:.3f}", ""),
        ]
        share = [x["eval_s"] / x["wall_s"] for x in c]
        per_eval = [x["eval_s"] / max(1, x["evals"]) for x in c]
        per_step = [x["step_s"] / max(1, args.steps) for x in c]
        k_default = MixtureSection().interval_steps
        projected = [e / (e + k_default * st) for e, st in zip(per_eval, per_step)]
        rows += [
            (f"evaluation share of (c)'s wall, K={args.interval}", f"{np.median(share):.3f}",
             f"{med(c, 'evals'):.0f} evaluations, {np.median(per_eval):.2f} s each; step {np.median(per_step):.3f} s"),
            (f"evaluation share at the default K={k_default}  [goal <= 0.10]", f"{np.median(projected):.4f}",
             ("met" if np.median(projected) <= 0.10 else "NOT met") + "  e / (e + K s), from (c)'s e and s"),
        ]
    finally:
        kill_group(cproc)
        kill_group(tproc)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    load = os.getloadavg()
    print(f"\ntrainer bench: kit {kit.name}, {args.steps} steps x batch {args.batch_size} x seq_len {seq_len}, "
          f"top-k {args.top_k}, K={args.interval}, teacher backend {args.backend}, student {args.student}, "
          f"{'teacher on core %d, trainer on core %d' % (args.teacher_core, args.trainer_core) if pin else 'not pinned'}, "
          f"median of {args.repeats} repeat(s); load average at the start {load_start[0]:.2f}, at the end {load[0]:.2f}")
    w = max(len(r[0]) for r in rows)
    v = max(len(r[1]) for r in rows)
    for name, value, note in rows:
        print(f"  {name.ljust(w)}  {value.rjust(v)}  {note}")
    if args.keep:
        print(f"(work dir {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
