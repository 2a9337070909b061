"""``ddk compare CONFIG --policies cpt,kd,ddk_raw,ddk --seeds N [--out DIR]``: the paper's comparison.

The same distillation (steps, tokens, model, data) once per policy and seed:

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

The table is measured on **held-out blocks**: each domain's validation blocks after the first
``eval.sequences_per_domain``, which the DDK runs use to steer their mixture. So no policy is scored on
the data it steered by. Writes ``DIR/report.md``, ``DIR/report.json`` and ``DIR/compare.png``.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from pathlib import Path

from ddk.errors import UsageError
from ddk.experiments.plots import plot_compare

log = logging.getLogger("ddk.compare")

POLICIES = ("cpt", "kd", "kd_uniform", "ddk_raw", "ddk")


def policy_overrides(policy: str, natural: dict[str, float], config_initial: dict | None) -> dict:
    """The config changes that turn one base config into each policy's run. Pure."""
    fixed = {"mixture.policy": "fixed", "mixture.initial_weights": config_initial or natural}
    if policy == "cpt":
        return {**fixed, "kd.gamma": 0}
    if policy == "kd":
        return fixed
    if policy == "kd_uniform":
        return {"mixture.policy": "fixed", "mixture.initial_weights": {d: 1 / len(natural) for d in natural}}
    if policy in ("ddk_raw", "ddk"):
        return {"mixture.policy": policy}
    raise UsageError(f"--policies: unknown policy {policy!r} (choose from {', '.join(POLICIES)})")


def aggregate(results: dict[str, list[dict]], domains: list[str]) -> dict:
    """Per policy: mean and spread over seeds of each domain's ratio, the mean and worst domain, tokens. Pure.

    ``results[policy]`` is a list (one per seed) of ``{"ratio": {domain: r}, "tokens": {domain: n}}``.
    """
    out = {}
    for policy, runs in results.items():
        per_domain = {}
        for d in domains:
            vals = [r["ratio"][d] for r in runs]
            per_domain[d] = {"mean": statistics.fmean(vals),
                             "spread": (max(vals) - min(vals)) / 2 if len(vals) > 1 else 0.0}
        means = [statistics.fmean(r["ratio"][d] for d in domains) for r in runs]
        worst_domain = max(domains, key=lambda d: per_domain[d]["mean"])
        out[policy] = {"ratio": per_domain,
                       "mean_ratio": statistics.fmean(means),
                       "mean_ratio_spread": (max(means) - min(means)) / 2 if len(means) > 1 else 0.0,
                       "worst_domain": worst_domain, "worst_ratio": per_domain[worst_domain]["mean"],
                       "tokens": {d: statistics.fmean(r["tokens"][d] for r in runs) for d in domains},
                       "seeds": len(runs)}
    return out


def format_report(agg: dict, domains: list[str], initial: dict[str, float], command: str, note: str) -> str:
    policies = list(agg)
    lines = ["# ddk compare", "", f"Command: `{command}`", "", note, "",
             "## Student/teacher perplexity ratio per domain (held-out blocks; mean ± half-range over seeds)", "",
             "| policy | " + " | ".join(domains) + " | mean | worst domain |",
             "|---|" + "---:|" * len(domains) + "---:|---|",
             "| initial student | " + " | ".join(f"{initial[d]:.3f}" for d in domains)
             + f" | {statistics.fmean(initial.values()):.3f} | {max(domains, key=lambda d: initial[d])} |"]
    for p in policies:
        a = agg[p]
        cells = [f"{a['ratio'][d]['mean']:.3f} ± {a['ratio'][d]['spread']:.3f}" for d in domains]
        lines.append(f"| {p} | " + " | ".join(cells)
                     + f" | {a['mean_ratio']:.3f} ± {a['mean_ratio_spread']:.3f} | {a['worst_domain']} |")
    lines += ["", "## Student tokens per domain (mean over seeds)", "",
              "| policy | " + " | ".join(domains) + " |", "|---|" + "---:|" * len(domains)]
    for p in policies:
        total = sum(agg[p]["tokens"].values()) or 1
        lines.append(f"| {p} | " + " | ".join(f"{agg[p]['tokens'][d]:.0f} ({agg[p]['tokens'][d] / total:.0%})"
                                               for d in domains) + " |")
    lagging = max(domains, key=lambda d: initial[d])
    best = min(policies, key=lambda p: agg[p]["mean_ratio"])
    lines += ["", "## The paper's claims, as measured here", "",
              f"- lowest mean ratio: **{best}** ({agg[best]['mean_ratio']:.3f})"]
    gains = {p: initial[lagging] - agg[p]["ratio"][lagging]["mean"] for p in policies}
    top = max(gains, key=gains.get)
    lines.append(f"- largest gain on the domain where the student lagged most ({lagging}, initial ratio "
                 f"{initial[lagging]:.3f}): **{top}** (ratio down by {gains[top]:.3f})")
    if "ddk" in agg and "ddk_raw" in agg:
        lines.append("- smoothing: " + _versus(agg, "ddk", "ddk_raw", "smoothing better", "smoothing not better"))
    if "ddk" in agg and "kd_uniform" in agg:
        lines.append("- measured gaps vs a uniform mixture: "
                     + _versus(agg, "ddk", "kd_uniform", "ddk better", "ddk not better"))
    return "\n".join(lines) + "\n"


def _versus(agg: dict, a: str, b: str, better: str, worse: str) -> str:
    """``a`` against ``b`` on the mean ratio; differences within the seed spread (or 0.0005) count as none."""
    x, y = agg[a]["mean_ratio"], agg[b]["mean_ratio"]
    noise = max(agg[a]["mean_ratio_spread"], agg[b]["mean_ratio_spread"], 5e-4)
    verdict = "no measurable difference" if abs(x - y) <= noise else better if x < y else worse
    return (f"{a} {x:.4f} vs {b} {y:.4f} mean ratio ({verdict}; "
            "differences within the seed spread or 0.0005 count as none)")


def heldout_losses(model_path: Path, domains: dict, skip: int, count: int) -> dict[str, float]:
    """Mean loss on validation blocks [skip, skip+count) of each domain (those no run steered by)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ddk.trainer.evaluate import evaluate_loss

    model = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=False, dtype=torch.float32)
    return {n: evaluate_loss(model, heldout_blocks(d.val, skip, count), 16, "cpu") for n, d in domains.items()}


def heldout_blocks(val, skip: int, count: int):
    """Blocks after the first ``skip`` (the steering ones); all of them when a domain has too few."""
    return val[skip:skip + count] if len(val) > skip else val[:count]


def tokens_per_domain(metrics_path: Path, seq_len: int) -> dict[str, float]:
    from ddk.trainer.metrics import read_metrics

    totals: dict[str, float] = {}
    for r in read_metrics(metrics_path):
        if r.get("event") == "step":
            for d, n in r.get("rows", {}).items():
                totals[d] = totals.get(d, 0) + n * seq_len
    return totals


def main(args) -> int:
    from transformers import AutoTokenizer

    from ddk.trainer.config import load_config
    from ddk.trainer.data import default_cache_dir, load_domain_specs, natural_proportions, prepare_domains
    from ddk.launcher import Services, free_port

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if not policies:
        raise UsageError("--policies: give at least one of " + ", ".join(POLICIES))
    for p in policies:
        policy_overrides(p, {}, None)  # validates the name
    if args.seeds < 1:
        raise UsageError("--seeds: must be at least 1")
    if args.teacher_model and not (Path(args.teacher_model) / "config.json").exists():
        raise UsageError(f"--teacher-model: no Hugging Face model at {args.teacher_model}")
    base = load_config(args.config, args.overrides)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = AutoTokenizer.from_pretrained(base.student.model, trust_remote_code=False)
    source = base.data.file if base.data.file is not None else {
        "domains": [d.model_dump(exclude_none=True) for d in base.data.domains], "val_fraction": base.data.val_fraction}
    domains = prepare_domains(load_domain_specs(source), tokenizer, base.data.seq_len, default_cache_dir())
    names = sorted(domains)
    natural = natural_proportions(domains)
    skip, count = base.eval.sequences_per_domain, max(base.eval.sequences_per_domain, 32)
    short = [n for n in names if len(domains[n].val) <= skip]
    note = ("Held-out blocks: validation blocks after the first "
            f"{skip} per domain (those steer the DDK mixture), up to {count} per domain.")
    if short:
        note += (f" Domains with no block beyond the steering ones ({', '.join(short)}) are scored on their "
                 "steering blocks.")

    results: dict[str, list[dict]] = {p: [] for p in policies}
    with Services(out / "logs") as services:
        teacher_urls = list(base.teacher.urls)
        if args.teacher_model:
            port = free_port()
            services.start("teacher", ["teacher", "serve", "--model", args.teacher_model], port)
            services.wait_healthy("teacher", f"http://127.0.0.1:{port}/healthz")
            teacher_urls = [f"http://127.0.0.1:{port}"]
        if not teacher_urls:
            raise UsageError("teacher.urls: compare needs a teacher (give --teacher-model or teacher.urls)")
        cport = free_port()
        controller_url = f"http://127.0.0.1:{cport}"
        services.start("controller", ["controller", "serve", "--db", str(out / "controller.sqlite")], cport)
        services.wait_healthy("controller", controller_url + "/healthz")

        from ddk.teacher.client import TeacherClient

        tc = TeacherClient(teacher_urls)
        try:
            teacher = {n: _teacher_heldout(tc, heldout_blocks(domains[n].val, skip, count)) for n in names}
        finally:
            tc.close()
        initial_loss = heldout_losses(Path(base.student.model), domains, skip, count)
        initial = {n: math.exp(initial_loss[n] - teacher[n]) for n in names}

        for seed in range(args.seeds):
            for policy in policies:
                run_id = f"{base.run_id}-{policy}-s{seed}"
                run_dir = out / "runs" / run_id
                if not (run_dir / "summary.json").exists():
                    sets = {"run_id": run_id, "seed": seed, "output_dir": str(run_dir),
                            "teacher.urls": json.dumps(teacher_urls), "controller.url": controller_url,
                            **policy_overrides(policy, natural, base.mixture.initial_weights)}
                    argv = ["train", str(Path(args.config).resolve())]
                    for o in args.overrides:
                        argv += ["--set", o]
                    for k, v in sets.items():
                        argv += ["--set", f"{k}={json.dumps(v) if isinstance(v, dict) else v}"]
                    print(f"ddk compare: {run_id} (log {out / 'logs' / (run_id + '.log')})", flush=True)
                    code = services.run(run_id, argv)
                    if code != 0:
                        raise RuntimeError(f"run {run_id} failed with exit code {code}; see its log")
                else:
                    print(f"ddk compare: {run_id} finished before, reused", flush=True)
                loss = heldout_losses(run_dir / "final", domains, skip, count)
                results[policy].append({"ratio": {n: math.exp(loss[n] - teacher[n]) for n in names},
                                        "tokens": {n: tokens_per_domain(run_dir / "metrics.jsonl",
                                                                        base.data.seq_len).get(n, 0) for n in names}})

    agg = aggregate(results, names)
    command = "ddk compare " + " ".join([args.config, "--policies", ",".join(policies), "--seeds", str(args.seeds),
                                         "--out", args.out] + (["--teacher-model", args.teacher_model]
                                                               if args.teacher_model else [])
                                        + [f"--set {o}" for o in args.overrides])
    report = format_report(agg, names, initial, command, note)
    (out / "report.md").write_text(report)
    (out / "report.json").write_text(json.dumps({"policies": agg, "initial": initial, "teacher_loss": teacher,
                                                 "raw": results, "natural_proportions": natural}, indent=1))
    plot_compare(agg, names, initial, out / "compare.png")
    print(report)
    print(f"report: {out / 'report.md'}; plot: {out / 'compare.png'}")
    return 0


def _teacher_heldout(client, blocks) -> float:
    """Teacher mean loss on blocks from its target_logprob."""
    import torch

    total, count = 0.0, 0
    for i in range(0, len(blocks), 16):
        ids = torch.as_tensor(blocks[i:i + 16].astype("int64"))
        out = client.topk(ids, 1)
        total += float(-out.target_logprob.double().sum())
        count += out.target_logprob.numel()
    return total / count
