"""``ddk compare CONFIG --policies cpt,kd,ddk_raw,ddk --seeds N [--out DIR]``: the paper's comparison.

The same distillation (steps, tokens, model, data) once per policy and seed; the policies are the arms of
``ddk.experiments.arms`` (the baselines below plus every policy that steers; ``--policies`` omitted: the
paper's, ``PAPER_ARMS``):

- ``cpt``: CE only (``kd.gamma = 0``, no teacher calls during training), fixed mixture;
- ``kd``: CE + gamma KL, fixed mixture at the data's natural proportions (unless the config sets
  ``mixture.initial_weights``);
- ``kd_uniform``: CE + gamma KL, fixed uniform mixture (1/N per domain) -- not one of the paper's
  baselines, but the obvious question beside DDK: does moving the budget by measured gaps beat just
  balancing the domains?
- ``ddk_raw``: DDK without smoothing (r = softmax(q) every interval);
- ``ddk``: the paper's smoothed update.

Each run goes to ``DIR/runs/<run_id>-<policy>-s<seed>/``; a run with a ``summary.json`` is finished and
reused, an unfinished one resumes from its last checkpoint (``ddk train`` does that by itself).

One top-k store for all the runs, so that a block the arms share is scored by the teacher once: the teacher
compare starts (``--teacher-model``) serves with a cache, ``ddk teacher serve --cache-dir DIR/teacher-cache``;
with the config's ``teacher.urls`` every arm trains with ``cache.dir: DIR/topk-store`` (misses asked of the
teacher and written back, ``ddk.trainer.topk_source``); a config that sets ``cache.dir`` itself keeps it (and
may leave ``teacher.urls`` empty: then everything comes from that precomputed store). ``--no-cache`` turns off
what compare adds.

The table is measured on **scoring sets**: each domain's validation documents are split in two halves by a
hash of their content (ddk.data.evalset.steering_half); every run steers by whole-document windows of one half
(``eval.documents: steer``) and the report scores on windows of the other (``max(eval.sequences_per_domain,
32)`` windows, or ``eval.tokens_per_domain``), so no policy is scored on a document it steered by. Each run's
scoring-set ratios come with the standard error of their log-ratio, grouped by document. Writes ``DIR/report.md``, ``DIR/report.json``, ``DIR/compare.png`` and
``DIR/compare-curve.png``.

With several seeds the report pairs the runs by seed (same seed, same initial student, same scoring set)
and gives, for each steered policy against each baseline, the mean paired difference in the mean ratio, the
worst domain's ratio and the area under the ratio-vs-tokens curve with a 95% t-interval
(``ddk.experiments.stats``); it words a claim only when the interval excludes 0. ``--seeds 3`` or more for
anything published. The curve is each run's mean ratio at its evaluations (the steering blocks, from its
``metrics.jsonl``) against the student tokens trained so far.

Task accuracy: when every run's ``summary.json`` carries ``task_accuracy`` (``{domain: {"accuracy", "correct",
"total"}}``, the form of ``ddk eval --tasks --json``'s ``domains``), the report adds the accuracy per domain, the
mean and the worst domain, and pairs the mean and the worst accuracy over seeds like the ratios (higher is better
there). Compare writes that field itself after each run when the data config has task domains
(:func:`fill_task_accuracy`: the run's exported student, greedy, on each task domain's validation prompts).

Arms beside the mixture baselines (ddk.experiments.arms): ``seqkd`` (SFT on the teacher's greedy answers to the
training prompts, generated once before the runs, ddk.experiments.seqkd) and ``ARM@onpolicy`` (the arm with
``kd.on_policy: 1``, ``rollout.engine: hf``); the report pairs each of them with ``kd`` and ``ddk``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from ddk.errors import UsageError
from ddk.experiments.plots import plot_compare, plot_curves
from ddk.experiments.tables import aggregate, format_report, format_wall, paired_comparisons, run_accuracy
from ddk.experiments.arms import MODIFIERS, NO_TEACHER_ARMS, PAPER_ARMS, arms, split_modifier, steered
from ddk.vocab import DIVERGENCES, ratio

log = logging.getLogger("ddk.compare")


def policy_overrides(policy: str, natural: dict[str, float], config_initial: dict | None) -> dict:
    """The config changes that turn one base config into each policy's run. Pure. An arm ``POLICY+LOSS``
    (``ddk+jsd``) is that policy's run with ``kd.loss: LOSS`` (ddk.vocab.DIVERGENCES); ``ARM@MODIFIER``
    (``ddk@onpolicy``) adds the modifier's changes (ddk.experiments.arms.MODIFIERS)."""
    base, modifier = split_modifier(policy)
    if modifier:
        return {**policy_overrides(base, natural, config_initial), **MODIFIERS[modifier]}
    if "+" in policy:
        base, _, loss = policy.partition("+")
        if loss not in DIVERGENCES:
            raise UsageError(f"--policies: unknown divergence {loss!r} in {policy!r} "
                             f"(choose from {', '.join(DIVERGENCES)})")
        if base in NO_TEACHER_ARMS:
            raise UsageError(f"--policies: {policy!r}: {base} trains without a teacher, so it has no divergence")
        return {**policy_overrides(base, natural, config_initial), "kd.loss": loss}
    fixed = {"mixture.policy": "fixed", "mixture.initial_weights": config_initial or natural}
    if policy in NO_TEACHER_ARMS:  # seqkd: also data.file, the teacher's answers (compare sets it, seqkd.py)
        return {**fixed, "kd.gamma": 0}
    if policy == "kd":
        return fixed
    if policy == "kd_uniform":
        return {"mixture.policy": "fixed", "mixture.initial_weights": {d: 1 / len(natural) for d in natural}}
    if policy in steered():
        return {"mixture.policy": policy}
    raise UsageError(f"--policies: unknown policy {policy!r} (choose from {', '.join(arms())})")


def scoring_sets(domains: dict, eval_cfg, count: int) -> dict:
    """Per domain the scoring set: ``count`` windows (or ``eval.tokens_per_domain`` predictions) from the
    scoring half of its validation documents (ddk.data.evalset: the runs steer by the other half, so no document
    is in both), drawn as the runs draw theirs."""
    from ddk.data.evalset import evaluation_set

    return {n: evaluation_set(domains[n], count, getattr(eval_cfg, "tokens_per_domain", None),
                              int(getattr(eval_cfg, "seed", 0) or 0), "score") for n in sorted(domains)}


def heldout_losses(model_path: Path, sets: dict, teacher_nll: dict | None = None) -> tuple[dict, dict]:
    """``({domain: mean loss}, {domain: SE of the log-ratio})`` of the model on the scoring sets (the SE needs
    the teacher's per-block losses, ``teacher_nll``; a domain with one document has none)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ddk.trainer.evaluate import score_sets_with

    model = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=False, dtype=torch.float32)
    results = score_sets_with(model, sets, 16, "cpu", teacher_nll)
    return ({n: r.loss for n, r in results.items()},
            {n: r.se for n, r in results.items() if r.se is not None})


def tokens_per_domain(metrics_path: Path, seq_len: int) -> dict[str, float]:
    from ddk.trainer.metrics import read_metrics

    totals: dict[str, float] = {}
    for r in read_metrics(metrics_path):
        if r.get("event") == "step":
            for d, n in r.get("rows", {}).items():
                totals[d] = totals.get(d, 0) + n * seq_len
    return totals


def ratio_curve(records: list[dict], seq_len: int) -> list[list[float]]:
    """[[student tokens trained so far, mean ratio over domains], ...] at each evaluation of one run's metrics
    records (its ``eval`` lines; the tokens from the ``rows`` of its ``step`` lines up to that step). Pure."""
    rows_at: dict[int, int] = {}
    evals: dict[int, float] = {}
    for r in records:
        if r.get("event") == "step":
            rows_at[int(r["step"])] = sum(int(n) for n in r.get("rows", {}).values())
        elif r.get("event") == "eval" and r.get("ratio"):
            q = r["ratio"]
            evals[int(r["step"])] = sum(q.values()) / len(q)  # the last line of a step wins (a redone one)
    out, steps = [], sorted(rows_at)
    for step in sorted(evals):
        tokens = sum(rows_at[s] for s in steps if s <= step) * seq_len
        out.append([float(tokens), evals[step]])
    return out


def main(args, runner=None) -> int:
    """``ddk compare``. Each run is ``ddk train`` with the arm's overrides: ``runner(run_id, argv) -> exit
    code`` runs it, by default as a child process (``ddk train`` under Ray, its log in ``out/logs``); the
    tests pass one that runs the same job in-process."""
    from transformers import AutoTokenizer

    from ddk.launcher import Services, free_port
    from ddk.trainer.config import load_config
    from ddk.data.cache import prepare_domains
    from ddk.data.domains import default_cache_dir, load_domain_specs, natural_proportions
    from ddk.trainer.metrics import read_metrics

    policies = _check_args(args)
    base = load_config(args.config, args.overrides)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = AutoTokenizer.from_pretrained(base.student.model, trust_remote_code=False)
    specs = load_domain_specs(base.data.source())
    domains = prepare_domains(specs, tokenizer, base.data.seq_len, default_cache_dir())
    names = sorted(domains)
    natural = natural_proportions(domains)
    count = max(base.eval.sequences_per_domain, 32)
    scoring = scoring_sets(domains, base.eval, count)

    results: dict[str, list[dict]] = {p: [] for p in policies}
    no_cache = bool(getattr(args, "no_cache", False))
    with Services(out / "logs") as services:
        teacher_urls = list(base.teacher.urls)
        store_sets: dict = {}  # cache.dir for every arm, when compare makes the one store
        if args.teacher_model:
            serve = ["teacher", "serve", "--model", args.teacher_model]
            if not no_cache:  # one service cache for every arm: each block is scored once in the comparison
                serve += ["--cache-dir", str(out / "teacher-cache")]
            tsvc = services.start("teacher", serve, free_port())
            teacher_urls = [tsvc.wait_healthy().url]
        elif teacher_urls and not base.cache.dir and not no_cache and not base.teacher.routes:
            store_sets = {"cache.dir": str(out / "topk-store")}  # one top-k store, filled by the arms as they go
        if not teacher_urls and not base.cache.dir:
            raise UsageError("teacher.urls: compare needs a teacher (give --teacher-model or teacher.urls, or "
                             "cache.dir: a precomputed top-k store)")
        csvc = services.start("controller", ["controller", "serve", "--db", str(out / "controller.sqlite")],
                              free_port())
        controller_url = csvc.wait_healthy().url
        teacher_nll = _teacher_nlls(base, teacher_urls, store_sets.get("cache.dir"), tokenizer, domains, scoring)
        teacher = {n: float(teacher_nll[n].sum()) / scoring[n].predictions for n in names}
        initial = ratio(heldout_losses(Path(base.student.model), scoring, teacher_nll)[0], teacher)
        extra = arm_data(policies, out, teacher_urls, tokenizer, specs)
        for seed in range(args.seeds):
            for policy in policies:
                run_id = f"{base.run_id}-{arm_slug(policy)}-s{seed}"
                run_dir = out / "runs" / run_id
                if (run_dir / "summary.json").exists():
                    print(f"ddk compare: {run_id} finished before, reused", flush=True)
                else:
                    sets = {"run_id": run_id, "seed": seed, "output_dir": str(run_dir),
                            "teacher.urls": json.dumps(teacher_urls), "controller.url": controller_url,
                            "eval.documents": "steer",  # the runs steer by one half, the report scores the other
                            **store_sets, **policy_overrides(policy, natural, base.mixture.initial_weights),
                            **extra.get(policy, {})}
                    print(f"ddk compare: {run_id} (log {out / 'logs' / (run_id + '.log')})", flush=True)
                    t0 = time.monotonic()
                    code = (runner or services.run)(run_id, _train_argv(args, sets))
                    if code != 0:
                        raise RuntimeError(f"run {run_id} failed with exit code {code}; see its log")
                    record_wall(run_dir / "summary.json", time.monotonic() - t0)
                fill_task_accuracy(run_dir, specs)  # the field the accuracy table reads (task domains only)
                loss, se = heldout_losses(run_dir / "final", scoring, teacher_nll)
                tokens = tokens_per_domain(run_dir / "metrics.jsonl", base.data.seq_len)
                curve = ratio_curve(read_metrics(run_dir / "metrics.jsonl"), base.data.seq_len)
                results[policy].append({"seed": seed, "ratio": ratio(loss, teacher), "ratio_log_se": se,
                                        "tokens": {n: tokens.get(n, 0) for n in names}, "curve": curve,
                                        **summary_accuracy(run_dir / "summary.json"),
                                        **run_wall(run_dir / "summary.json")})

    _write_report(args, policies, out, names, results, initial, teacher, natural,
                  _heldout_note(names, scoring))
    return 0


def arm_slug(policy: str) -> str:
    """The arm's part of a run id (ddk.vocab.RUN_ID_PATTERN): ``ddk+jsd`` -> ``ddk.jsd``, ``ddk@onpolicy`` ->
    ``ddk-onpolicy``. Pure."""
    return policy.replace("+", ".").replace("@", "-")


def arm_data(policies: list[str], out: Path, teacher_urls: list[str], tokenizer, specs) -> dict[str, dict]:
    """The per-arm overrides that need work before the runs: ``seqkd``'s ``data.file``, the teacher's answers to
    the task domains' training prompts (ddk.experiments.seqkd, written once under ``out``)."""
    from ddk.experiments.arms import base_policy
    from ddk.experiments.seqkd import seqkd_data, teacher_generator

    wanted = [p for p in policies if base_policy(p) == "seqkd"]
    if not wanted:
        return {}
    if not teacher_urls:
        raise UsageError("--policies seqkd: the teacher must answer the training prompts (give --teacher-model or "
                         "teacher.urls; a top-k store cannot generate)")
    generate, teacher_id = teacher_generator(teacher_urls[0], tokenizer)
    path = seqkd_data(specs, out, tokenizer, generate, teacher_id, lambda line: print(line, flush=True))
    return {p: {"data.file": str(path)} for p in wanted}


def fill_task_accuracy(run_dir: Path, specs, max_new: int = 64) -> dict | None:
    """Write ``task_accuracy`` (``{domain: {"accuracy", "correct", "total", "check"}}``, the form of ``ddk eval
    --tasks --json``'s ``domains``) into the run's ``summary.json``: its exported student (``final/``) answers each
    task domain's validation prompts greedily (ddk.experiments.tasks.model_accuracy, at most ``max_new`` new
    tokens). Nothing when the data has no task domain or the summary has the field already; returns the field."""
    from ddk.experiments.tasks import model_accuracy, result_rows, task_domains

    judged, _ = task_domains(specs)
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text())
    if not judged or "task_accuracy" in summary:
        return summary.get("task_accuracy")
    print(f"ddk compare: task accuracy of {run_dir.name} ({len(judged)} domains, greedy)", flush=True)
    results = model_accuracy(run_dir / "final", judged, max_new=max_new, batch_size=64,
                             progress=lambda line: print(f"  {line}", flush=True))
    rows = result_rows(results, None, {s.name: s.task.check for s in judged})
    _update_summary(path, {"task_accuracy": rows, "task_accuracy_settings": {
        "greedy": True, "max_new_tokens": max_new, "prompts": "val_files"}})
    return rows


def _update_summary(path: Path, fields: dict) -> None:
    summary = json.loads(path.read_text())
    summary.update(fields)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(path)


def record_wall(path: Path, seconds: float) -> None:
    """A run's wall time under compare (its ``ddk train``) and the 1-minute load average at its end, into its
    ``summary.json`` (``compare_wall_s``, ``compare_load_avg``): the machine may be shared."""
    _update_summary(path, {"compare_wall_s": round(seconds, 1), "compare_load_avg": round(os.getloadavg()[0], 2)})


def run_wall(path: Path) -> dict:
    """``{"wall_s", "load_avg"}`` from a run's summary.json (:func:`record_wall`), ``{}`` when it has none."""
    try:
        s = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {"wall_s": s["compare_wall_s"], "load_avg": s.get("compare_load_avg")} if "compare_wall_s" in s else {}


def summary_accuracy(path: Path) -> dict:
    """``{"accuracy": {domain: task accuracy}}`` from a run's ``summary.json`` field ``task_accuracy``
    (:func:`ddk.experiments.tables.run_accuracy`), or ``{}`` when it has none (or cannot be read: a warning)."""
    try:
        acc = run_accuracy(json.loads(path.read_text()))
    except (OSError, ValueError) as e:
        log.warning("%s: no task accuracy read (%s)", path, e)
        return {}
    return {"accuracy": acc} if acc else {}


def _check_args(args) -> list[str]:
    """The arms to run (exit 2 on a bad name, seed count or teacher model)."""
    policies = [p.strip() for p in (args.policies or ",".join(PAPER_ARMS)).split(",") if p.strip()]
    if not policies:
        raise UsageError("--policies: give at least one of " + ", ".join(arms()))
    for p in policies:
        policy_overrides(p, {}, None)  # validates the name
    if args.seeds < 1:
        raise UsageError("--seeds: must be at least 1")
    if args.teacher_model and not (Path(args.teacher_model) / "config.json").exists():
        raise UsageError(f"--teacher-model: no Hugging Face model at {args.teacher_model}")
    return policies


def _train_argv(args, sets: dict) -> list[str]:
    """``ddk train CONFIG`` with compare's own ``--set`` overrides, then the arm's."""
    argv = ["train", str(Path(args.config).resolve())]
    for o in args.overrides:
        argv += ["--set", o]
    for k, v in sets.items():
        argv += ["--set", f"{k}={json.dumps(v) if isinstance(v, dict) else v}"]
    return argv


def _teacher_nlls(base, urls: list[str], store_dir: str | None, tokenizer, domains: dict,
                  sets: dict) -> dict:
    """The teacher's per-block losses on the scoring sets, asked once: from the arms' top-k store when there is
    one (``store_dir``, else the config's ``cache.dir``; its misses from ``urls``, written back), else from the
    teacher."""
    from ddk.teacher.client import TeacherClient
    from ddk.teacher.routes import RoutedTeacher
    from ddk.trainer.evaluate import teacher_nlls

    if base.teacher.routes:  # teacher.routes: each domain's held-out loss from its own teacher (no store then)
        tc = RoutedTeacher(urls, base.teacher.routes)
    else:
        tc = TeacherClient(urls) if urls else None
    try:
        if tc is not None:
            check_same_tokenizer(tc, tokenizer, urls)
    except BaseException:
        tc.close()
        raise
    if (store_dir or base.cache.dir) and not base.teacher.routes:
        from ddk.trainer.topk_source import checked_store_source

        cfg = base.model_copy(deep=True)
        cfg.cache.dir, cfg.teacher.urls = store_dir or base.cache.dir, list(urls)
        try:
            tc = checked_store_source(cfg, tokenizer, domains, tc)
        except BaseException:
            if tc is not None:
                tc.close()
            raise
    try:
        return teacher_nlls(tc, sets)
    finally:
        tc.close()


def check_same_tokenizer(teacher, tokenizer, urls: list[str]) -> None:
    """compare scores every arm in the student's tokens against its teachers' losses on the same blocks, so every
    teacher it asks (``teacher.urls`` = ``urls``, and each ``teacher.routes`` entry of a RoutedTeacher) must share the
    student's tokenizer: one of another tokenizer would be sent the student's ids and answer losses of the wrong
    text. UsageError (exit 2) naming the key and URL; a cross-tokenizer teacher is compared by
    ``bench/xtok.py routes`` in bits per byte (docs/training.md)."""
    from ddk.fingerprint import tokenizer_fingerprint
    from ddk.teacher.routes import RoutedTeacher

    mine = tokenizer_fingerprint(tokenizer)
    if isinstance(teacher, RoutedTeacher):  # the default teacher (for the unrouted domains), then each route
        places = [("teacher.urls" if d is None else f"teacher.routes.{d}", teacher.client(d), teacher.urls_of(d))
                  for d in teacher.route_domains()]
    else:
        places = [("teacher.urls", teacher, list(urls))]
    for where, client, served_by in places:
        theirs = client.info().get("tokenizer_fingerprint")
        if theirs != mine:
            raise UsageError(f"{where} ({','.join(served_by)}): the teacher's tokenizer fingerprint {theirs} differs from "
                             f"student.model's {mine}; ddk compare scores every arm in the student's tokens, so its "
                             f"teachers must share the student's tokenizer (compare a teacher of another tokenizer "
                             f"with bench/xtok.py routes, in bits per byte)")


def _heldout_note(names: list[str], sets: dict) -> str:
    cover = ", ".join(f"{n} {sets[n].documents} documents / {sets[n].predictions} tokens" for n in names)
    note = ("Scoring sets: whole-document windows from the scoring half of each domain's validation documents "
            "(the runs steer by the other half; no document in both), " + cover + ".")
    fallback = [n for n in names if sets[n].note]
    if fallback:
        note += f" Domains whose scoring half is empty ({', '.join(fallback)}) are scored on all their documents."
    return note


def _write_report(args, policies, out: Path, names, results, initial, teacher, natural, note: str) -> None:
    """report.md, report.json and compare.png; the report printed."""
    agg = aggregate(results, names)
    command = "ddk compare " + " ".join([args.config, "--policies", ",".join(policies), "--seeds", str(args.seeds),
                                         "--out", args.out] + (["--teacher-model", args.teacher_model]
                                                               if args.teacher_model else [])
                                        + [f"--set {o}" for o in args.overrides])
    comparisons = paired_comparisons(results, names)
    report = format_report(agg, names, initial, command, note, comparisons)
    report += _se_table(names, results)
    report += "\n".join(format_wall(results) + [""])
    (out / "report.md").write_text(report)
    (out / "report.json").write_text(json.dumps({"policies": agg, "initial": initial, "teacher_loss": teacher,
                                                 "comparisons": comparisons, "raw": results,
                                                 "natural_proportions": natural}, indent=1))
    plot_compare(agg, names, initial, out / "compare.png")
    plot_curves(agg, out / "compare-curve.png")
    print(report)
    print(f"report: {out / 'report.md'}; plots: {out / 'compare.png'}, {out / 'compare-curve.png'}")


def _se_table(names: list[str], results: dict) -> str:
    """Markdown: each run's scoring-set ratio per domain with the standard error of its log-ratio (grouped by
    document): ratio x exp(+-SE) is the one-SE band. Pure."""
    lines = ["", "", "### Scoring-set ratios with standard errors", "",
             "Each run's PPL ratio on the scoring set, +- the standard error of log(PPL_S / PPL_T) grouped by "
             "document (n/a: one document).", "",
             "| run | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for policy, runs in results.items():
        for r in runs:
            se = r.get("ratio_log_se") or {}
            cells = [f"{r['ratio'][n]:.3f} +- {se[n]:.3f}" if n in se else f"{r['ratio'][n]:.3f} (n/a)" for n in names]
            lines.append(f"| {policy} s{r['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
