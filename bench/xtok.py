"""Cross-tokenizer foundation (issue 29): the cost of ``xtok_distill_loss`` against ``distill_loss`` and of the
alignment, on CPU, one thread. Prints numbers and ratios; asserts nothing about time.

  loss   forward + backward on ``[B, T, V]`` random logits, top-k random teacher: ``distill_loss`` (today's path),
         ``xtok_distill_loss`` with the identity alignment (every id shared), and with half the vocabulary
         unshared (so the ULD term does work); best of ``--repeat``.
  align  the quick kit's tokenizer on 12,000 characters of services/trainer/loss.py: byte spans from offsets,
         from pieces, from ids (a byte-length table), and ``align_groups`` + ``compared_positions``.

    .venv/bin/python bench/xtok.py [--B 4 --T 256 --V 8192 --k 16 --repeat 5]

Through the trainer (issue 29, the wired path; the teacher a real ``ddk teacher serve --backend hf``, the Trainer in
this process, one rank, ``OMP_NUM_THREADS`` threads):

  trainer  tokens/s of the same-tokenizer path (the quick kit's student and teacher, plain ``TeacherClient``) and
           of the cross-tokenizer path on the same student, text and teacher (``CrossTokenizerTeacher`` with the
           student's own tokenizer as the teacher's: re-tokenising, aligning and ``xtok_batch_loss`` each step,
           the teacher's work the same), ``--repeats`` interleaved runs, medians; target cross / same >= 0.8.
           Also one run of the real pair (the real kit's SmolLM2-135M teacher) for its own tokens/s.
  pair     the real pair over ``--steps`` steps (fixed mixture, evaluations every ``--interval``): per domain
           the ratio exp(loss_S - loss_T) with the teacher's loss per student token, at each evaluation, and
           (with a cross-tokenizer teacher) the per-byte ratio bits/byte student / teacher of the evaluation text.
           ``--teacher DIR`` (a model folder, served by ``--backend hf``; default the real kit's teacher) and
           ``--student DIR`` (a kit's ``student`` folder; its kit, the folder above, gives the data and
           train.yaml; default the quick kit's): the Gemma pair is ``--student .cache/kit-real/student
           --teacher .cache/kit-real/teacher-gemma3-270m``. ``--batch``, ``--seq-len``, ``--eval-blocks``:
           the run's sizes (default 4, the kit's, 8).

  routes   a teacher of another family on one domain (``--cross-teacher`` on ``--domain``, the others on
           ``--teacher``) against the same runs with ``--teacher`` on every domain, ``--policies`` (kd,ddk) x
           ``--seeds`` (2), in-process with a controller; per domain the last evaluation's per-byte ratio
           (NLL_S / NLL_T of the same text) and the student's loss, with the paired differences ddk - kd and
           cross - same (95 % t-intervals). ``ddk compare`` cannot do this: its held-out scoring sends the
           student's ids to every route's teacher.

    .venv/bin/python bench/xtok.py trainer [--steps 20 --repeats 3 --kit DIR --real-kit DIR]
    .venv/bin/python bench/xtok.py pair [--steps 30 --interval 10 --kit DIR --real-kit DIR --teacher DIR
                                         --student DIR --batch 4 --seq-len N --eval-blocks 8]
    .venv/bin/python bench/xtok.py routes --student DIR --teacher DIR --cross-teacher DIR [--domain code
                                           --policies kd,ddk --seeds 2 --steps 30 --interval 10 --batch 4 ...]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ddk.runtime import set_process_defaults

set_process_defaults()  # before torch loads OpenMP (the trainer modes run the Trainer here)

import torch  # noqa: E402

from ddk.trainer.align import (align_groups, byte_spans, compared_positions, spans_from_ids,  # noqa: E402
                               vocab_byte_lengths)
from ddk.trainer.loss import distill_loss  # noqa: E402
from ddk.trainer.xtok_loss import identity_positions, xtok_distill_loss  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def best(f, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--T", type=int, default=256)
    ap.add_argument("--V", type=int, default=8192)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--tokenizer", default=str(REPO / ".cache" / "kit-quick" / "student" / "tokenizer.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    B, T, V, k = a.B, a.T, a.V, a.k
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, -1] = -100
    t_lp, t_ids = torch.log_softmax(torch.randn(B, T, V, generator=g), -1).topk(k, -1)
    pos = identity_positions(labels)
    g_ids, g_lp = t_ids.reshape(-1, k)[pos], t_lp.reshape(-1, k)[pos]
    ident, shared = torch.arange(V), torch.ones(V, dtype=torch.bool)
    half, half_shared = ident.clone(), shared.clone()
    half[V // 2:] = -1
    half_shared[V // 2:] = False

    def step(fn):
        def run():
            x = logits.clone().requires_grad_(True)
            fn(x)[0].backward()
        return run

    base = best(step(lambda x: distill_loss(x, labels, t_ids, t_lp, 1.0, 1.0)), a.repeat)
    same = best(step(lambda x: xtok_distill_loss(x, labels, pos, g_ids, g_lp, ident, shared, 1.0, 1.0)), a.repeat)
    halfs = best(step(lambda x: xtok_distill_loss(x, labels, pos, g_ids, g_lp, half, half_shared, 1.0, 1.0)),
                 a.repeat)
    print(f"loss fwd+bwd B={B} T={T} V={V} k={k}: distill_loss {base * 1e3:.1f} ms; xtok identity "
          f"{same * 1e3:.1f} ms (x{same / base:.2f}); xtok half shared {halfs * 1e3:.1f} ms (x{halfs / base:.2f})")

    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(a.tokenizer)
    text = (REPO / "services" / "trainer" / "loss.py").read_text(encoding="utf-8")[:12000]
    enc = tok.encode(text, add_special_tokens=False)
    offsets, pieces, ids = enc.offsets, enc.tokens, enc.ids
    table = vocab_byte_lengths(tok.get_vocab(), "byte_level", [t.content for t in tok.get_added_tokens_decoder().values()])
    t_off = best(lambda: byte_spans(text, offsets), a.repeat)
    t_pc = best(lambda: byte_spans(text, offsets, pieces, "byte_level"), a.repeat)
    t_id = best(lambda: spans_from_ids(ids, table), a.repeat)
    s1, s2 = byte_spans(text, offsets, pieces, "byte_level"), byte_spans(text, offsets)
    t_al = best(lambda: compared_positions(align_groups(s1, s2)), a.repeat)
    print(f"align {len(ids)} tokens, {len(text.encode())} bytes: spans from offsets {t_off * 1e3:.2f} ms, from "
          f"pieces {t_pc * 1e3:.2f} ms, from ids {t_id * 1e3:.2f} ms; align_groups + compared_positions "
          f"{t_al * 1e3:.2f} ms")


KIT_CACHE = Path.home() / ".cache" / "ddk" / "test-kits"


def _kit(given: str | None, kind: str) -> Path:
    """``--kit`` / ``--real-kit``, else the newest finished test kit of that kind in the per-machine cache."""
    if given:
        return Path(given)
    found = sorted(KIT_CACHE.glob(f"*/kit-{kind}/kit.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no {kind} kit in {KIT_CACHE}; pass --{'kit' if kind == 'quick' else 'real-kit'} DIR")
    return found[-1].parent


def _job(kit: Path, out: Path, url: str, steps: int, interval: int, *sets: str):
    from ddk.trainer.config import load_config
    from ddk.trainer.launch import prepare

    cfg = load_config(kit / "train.yaml", [
        f"run_id={out.name}", f"output_dir={out}", f"data.cache_dir={kit.parent / 'token-cache'}",
        f"teacher.urls=[{url}]", "controller.url=null", "mixture.policy=fixed", f"train.steps={steps}",
        f"mixture.interval_steps={interval}", "train.batch_size=4", "kd.top_k=16", "checkpoint.every_steps=1000",
        *sets])  # a later ``sets`` entry of the same key wins
    return prepare(cfg)


def _identity_cross(kit: Path, url: str):
    """The cross-tokenizer path with the student's own tokenizer standing in for the teacher's."""
    from transformers import AutoTokenizer

    from ddk.teacher.client import TeacherClient
    from ddk.trainer.xtok_teacher import CrossTokenizerTeacher, Route, Side, identity_family, pair_family

    side = Side(AutoTokenizer.from_pretrained(str(kit / "student"), trust_remote_code=False))
    return CrossTokenizerTeacher(TeacherClient(url), side, {}, [url], {"": Route(side, 1, 1 << 20)},
                                 [identity_family(len(side)), pair_family(side, side, len(side), "self")])


def _serve(model: Path, work: Path, name: str):
    import sys as _sys

    sys_path = str(Path(__file__).resolve().parent)
    if sys_path not in _sys.path:
        _sys.path.insert(0, sys_path)
    from common import start_server

    return start_server([_sys.executable, "-m", "ddk.cli", "teacher", "serve", "--model", str(model), "--backend",
                         "hf"], work / f"teacher-{name}.log", timeout=300)


def trainer_bench(a) -> None:
    import statistics
    import tempfile

    from ddk.trainer.loop import LocalContext, Trainer

    kit, real = _kit(a.kit, "quick"), _kit(a.real_kit, "real")
    work = Path(tempfile.mkdtemp(prefix="ddk-xtok-bench-"))
    (url, proc), (rurl, rproc) = _serve(kit / "teacher", work, "quick"), _serve(real / "teacher", work, "real")
    try:
        tps: dict[str, list[float]] = {"same": [], "cross": []}
        for r in range(a.repeats):
            for name in ("same", "cross"):
                job = _job(kit, work / f"{name}{r}", url, a.steps, a.steps, "eval.sequences_per_domain=2")
                client = _identity_cross(kit, url) if name == "cross" else None
                s = Trainer(job, LocalContext(job.config.output_dir), teacher_client=client).fit()
                tps[name].append(s["tokens_per_s"])
                print(f"  {name} run {r}: {s['tokens_per_s']:.0f} tokens/s", flush=True)
        job = _job(kit, work / "real", rurl, a.steps, a.steps, "eval.sequences_per_domain=2")
        real_tps = Trainer(job, LocalContext(job.config.output_dir)).fit()["tokens_per_s"]
    finally:
        proc.stop()
        rproc.stop()
    same, cross = statistics.median(tps["same"]), statistics.median(tps["cross"])
    print(f"trainer, {a.steps} steps x 4 x 128 tokens, median of {a.repeats}: same-tokenizer path {same:.0f} "
          f"tokens/s, cross-tokenizer path (same teacher) {cross:.0f} tokens/s, cross / same {cross / same:.2f} "
          f"(target >= 0.8); the real pair (SmolLM2-135M teacher) {real_tps:.0f} tokens/s")


def pair_models(a) -> tuple[Path, Path]:
    """(the student's kit, the teacher's model folder) of ``pair``: ``--student DIR``'s parent (a kit's
    ``student`` folder) or the quick kit; ``--teacher DIR`` or the real kit's teacher."""
    kit = Path(a.student).resolve().parent if a.student else _kit(a.kit, "quick")
    if not (kit / "train.yaml").is_file():
        raise SystemExit(f"--student {a.student}: no train.yaml in {kit} (pass a kit's student folder)")
    return kit, Path(a.teacher) if a.teacher else _kit(a.real_kit, "real") / "teacher"


def byte_ratio(e: dict, name: str) -> str:
    """bits/byte student / teacher of one domain in an eval record (``xtok_teacher.eval_record``), or ``-``."""
    b = (e.get("bits_per_byte") or {}).get(name)
    return f"{b['student'] / b['teacher']:8.3f}" if b and b.get("teacher") else f"{'-':>8}"


def pair_run(a) -> None:
    import json
    import tempfile

    from ddk.trainer.loop import LocalContext, Trainer

    kit, teacher = pair_models(a)
    work = Path(tempfile.mkdtemp(prefix="ddk-xtok-pair-", dir=a.work))
    url, proc = _serve(teacher, work, "pair")
    sizes = [f"eval.sequences_per_domain={a.eval_blocks}", f"train.batch_size={a.batch}"]
    if a.student:  # the student folder given: the kit's train.yaml names it relatively ("student")
        sizes.append(f"student.model={Path(a.student).resolve()}")
    if a.seq_len:
        sizes.append(f"data.seq_len={a.seq_len}")
    t0 = time.perf_counter()
    try:
        job = _job(kit, work / "pair", url, a.steps, a.interval, *sizes)
        s = Trainer(job, LocalContext(job.config.output_dir)).fit()
    finally:
        proc.stop()
    evals = [json.loads(x) for x in (work / "pair" / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e.get("event") == "eval"]
    names = sorted(evals[0]["ratio"])
    print(f"pair {kit.name}/student <- {teacher}, {a.steps} steps x {a.batch} rows, {time.perf_counter() - t0:.0f} s "
          f"wall, {s['tokens_per_s']:.0f} tokens/s; out {work / 'pair'}")
    print("ratio = exp(loss_S - loss_T), loss_T per student token | per byte = bits/byte student / teacher")
    print("step  " + "  ".join(f"{n:>8}" for n in names) + "  |  " + "  ".join(f"{n:>8}" for n in names))
    for e in evals:
        print(f"{e['step']:>4}  " + "  ".join(f"{e['ratio'][n]:8.3f}" for n in names) + "  |  "
              + "  ".join(byte_ratio(e, n) for n in names))
    print("teacher loss per student token: " + ", ".join(f"{n} {evals[0]['teacher_loss'][n]:.3f}" for n in names))


def _controller(work: Path):
    import sys as _sys

    from common import start_server

    return start_server([_sys.executable, "-m", "ddk.cli", "controller", "serve", "--db",
                         str(work / "controller.sqlite")], work / "controller.log", timeout=120)


def final_byte_ratios(metrics: Path) -> tuple[dict[str, float], dict[str, float]]:
    """(per domain bits/byte student / teacher, the student's loss in nats per token) at a run's last evaluation.
    The first is NLL_S / NLL_T of the same text, i.e. ``student_loss / teacher_loss`` (both per student token,
    over the same predictions); equal to the ``bits_per_byte`` record's ratio where there is one (checked)."""
    import json

    evals = [e for e in map(json.loads, metrics.read_text().splitlines()) if e.get("event") == "eval"]
    last = evals[-1]
    out = {n: last["student_loss"][n] / last["teacher_loss"][n] for n in sorted(last["teacher_loss"])}
    for n, b in (last.get("bits_per_byte") or {}).items():
        assert abs(b["student"] / b["teacher"] - out[n]) < 1e-6, (n, b, out[n])
    return out, {n: last["student_loss"][n] for n in out}


def routes_run(a) -> None:
    """A cross-family teacher for one domain (``--cross-teacher`` on ``--domain``, the other domains on
    ``--teacher``) against the same runs with ``--teacher`` on every domain; policies kd and ddk, ``--seeds``."""
    import json
    import statistics

    from ddk.data.cache import prepare_domains
    from ddk.data.domains import load_domain_specs, natural_proportions
    from ddk.experiments.compare import policy_overrides
    from ddk.trainer.config import load_config
    from ddk.trainer.loop import LocalContext, Trainer
    from transformers import AutoTokenizer

    kit, same = pair_models(a)
    work = Path(a.work or "/tmp") / "xtok-routes"
    work.mkdir(parents=True, exist_ok=True)
    base = load_config(kit / "train.yaml", [f"data.seq_len={a.seq_len}"] if a.seq_len else [])
    tok = AutoTokenizer.from_pretrained(str(Path(a.student).resolve() if a.student else kit / "student"))
    natural = natural_proportions(prepare_domains(load_domain_specs(base.data.source()), tok, base.data.seq_len,
                                                  kit.parent / "token-cache"))
    (s_url, s_proc), (c_url, c_proc) = _serve(same, work, "same"), _serve(Path(a.cross_teacher), work, "cross")
    ctl_url, ctl = _controller(work)
    ratios: dict[tuple, dict] = {}
    try:
        for seed in range(a.seeds):
            for arm in ("same", "cross"):
                for policy in a.policies.split(","):
                    name = f"{arm}-{policy}-s{seed}"
                    out = work / name
                    if not (out / "summary.json").exists():
                        sets = [f"{k}={json.dumps(v)}" for k, v in policy_overrides(policy, natural, None).items()]
                        sets += [f"seed={seed}", f"controller.url={ctl_url}", f"train.batch_size={a.batch}",
                                 f"eval.sequences_per_domain={a.eval_blocks}"]
                        sets += [f"student.model={Path(a.student).resolve()}"] if a.student else []
                        sets += [f"data.seq_len={a.seq_len}"] if a.seq_len else []
                        sets += [f"teacher.routes={json.dumps({a.domain: [c_url]})}"] if arm == "cross" else []
                        t0 = time.perf_counter()
                        job = _job(kit, out, s_url, a.steps, a.interval, *sets)
                        Trainer(job, LocalContext(job.config.output_dir)).fit()
                        print(f"  {name}: {time.perf_counter() - t0:.0f} s", flush=True)
                    ratios[(arm, policy, seed)] = final_byte_ratios(out / "metrics.jsonl")
    finally:
        for p in (s_proc, c_proc, ctl):
            p.stop()
    routes_table(a, ratios)


def routes_table(a, runs: dict[tuple, tuple]) -> None:
    """Markdown, per-domain byte ratios then the student's loss: each arm's value per seed and the paired
    differences ddk - kd and cross - same with their 95 % t-intervals (``ddk.experiments.stats``)."""
    for i, what in enumerate(("per-byte ratio (bits/byte student / teacher)", "student loss (nats/token)")):
        print(f"\n{what} at the last evaluation; {a.domain} on the cross teacher in the cross arms")
        _routes_table(a, {k: v[i] for k, v in runs.items()})


def _routes_table(a, ratios: dict[tuple, dict]) -> None:
    from ddk.experiments.stats import paired_difference

    seeds = sorted({k[2] for k in ratios})
    names = sorted(next(iter(ratios.values())))
    print("| arm | policy | " + " | ".join(names) + " |")
    print("|---|---|" + "---:|" * len(names))
    for arm in ("same", "cross"):
        for policy in a.policies.split(","):
            cells = [" / ".join(f"{ratios[(arm, policy, s)][n]:.4f}" for s in seeds) for n in names]
            print(f"| {arm} | {policy} | " + " | ".join(cells) + " |")
    pairs = [(f"ddk - kd, {arm}", [(arm, "ddk", s) for s in seeds], [(arm, "kd", s) for s in seeds])
             for arm in ("same", "cross")]
    pairs += [(f"cross - same, {p}", [("cross", p, s) for s in seeds], [("same", p, s) for s in seeds])
              for p in a.policies.split(",")]
    print("\n| paired difference | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for label, xs, ys in pairs:
        if not all(k in ratios for k in xs + ys):
            continue
        cells = []
        for n in names:
            d = paired_difference([ratios[k][n] for k in xs], [ratios[k][n] for k in ys])
            cells.append(f"{d['mean']:+.4f}" + (f" [{d['low']:+.4f}, {d['high']:+.4f}]" if d["low"] is not None
                                                 else ""))
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 1 and sys.argv[1] in ("trainer", "pair", "routes"):
        ap = argparse.ArgumentParser(description="bench/xtok.py " + sys.argv[1])
        ap.add_argument("--steps", type=int, default=20 if sys.argv[1] == "trainer" else 30)
        ap.add_argument("--interval", type=int, default=10)
        ap.add_argument("--repeats", type=int, default=3)
        ap.add_argument("--kit")
        ap.add_argument("--real-kit")
        ap.add_argument("--teacher", help="pair: the teacher's model folder (default: the real kit's teacher)")
        ap.add_argument("--student", help="pair: a kit's student folder (default: the quick kit's)")
        ap.add_argument("--batch", type=int, default=4)
        ap.add_argument("--seq-len", type=int)
        ap.add_argument("--eval-blocks", type=int, default=8)
        ap.add_argument("--work", help="pair: where its run folder goes (default: the system's temp folder)")
        ap.add_argument("--cross-teacher", help="routes: the teacher of another family for --domain")
        ap.add_argument("--domain", default="code", help="routes: the domain routed to --cross-teacher")
        ap.add_argument("--policies", default="kd,ddk")
        ap.add_argument("--seeds", type=int, default=2)
        args = ap.parse_args(sys.argv[2:])
        {"trainer": trainer_bench, "pair": pair_run, "routes": routes_run}[sys.argv[1]](args)
    else:
        main()
