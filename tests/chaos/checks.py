"""The chaos run's checks (all must pass) and its report.

* the driver finished (exit 0) within ``--duration-limit``, and every planned fault was injected;
* ``metrics.jsonl`` holds every step 1..N exactly once, in order, an evaluation at each boundary exactly once,
  and one ``end`` record; each step's weights are the controller's weights of the version it names;
* the controller's history: versions 0, 1, 2 ... (no gap, no duplicate), one per interval at steps 0, K, 2K ...
  N, and each version's weights are the DDK update of its recorded losses, recomputed here independently
  (:func:`paper_update`, written again from the paper, not imported);
* the final student loads with transformers and gives finite logits; when the schedule killed only teachers
  and train workers, it equals the fault-free run (same seed; ``--baseline``) within float tolerance;
* no process the harness started is left (``ray start``, gcs, raylet and workers included), no port held;
* ``--on-policy``: the rollout ids of metrics.jsonl (:func:`check_rollout_ids`): each once, none missing across
  the restarts.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from chaos.schedule import KINDS
from chaos.supervisor import ALPHA, RunResult

Check = tuple[str, bool, str]  # (name, passed, detail)


# the paper's update, written again (not ddk.controller.mixture): Liu et al. 2024, DDK, arXiv 2407.16154

def paper_update(student: dict, teacher: dict, previous: dict | None, alpha: float) -> dict[str, float]:
    """q_i = PPL_S,i / PPL_T,i = exp(L_S,i - L_T,i). First evaluation: r = softmax(q). Later ones:
    psi_i = r_prev,i * exp(q_i), r = alpha * psi / sum(psi) + (1 - alpha) / N."""
    names = sorted(student)
    q = [math.exp(student[n] - teacher[n]) for n in names]
    if previous is None:
        logits = q
    else:
        logits = [math.log(previous[n]) + qi if previous[n] > 0 else -math.inf for n, qi in zip(names, q)]
    top = max(logits)
    e = [math.exp(x - top) for x in logits]
    z = sum(e)
    psi = [x / z for x in e]
    if previous is None:
        return dict(zip(names, psi))
    return {n: alpha * p + (1.0 - alpha) / len(names) for n, p in zip(names, psi)}


# ----------------------------------------------------------------------------------------------------------
# the checks

def expected_evals(steps: int, interval: int) -> list[int]:
    return sorted(set(range(0, steps + 1, interval)) | {steps})


def check_metrics(records: list[dict], steps: int, interval: int) -> list[str]:
    problems = []
    got = [int(r["step"]) for r in records if r.get("event") == "step"]
    if got != list(range(1, steps + 1)):
        dup = sorted({s for s in got if got.count(s) > 1})
        missing = sorted(set(range(1, steps + 1)) - set(got))
        problems.append(f"metrics: step records {len(got)} (missing {missing[:10]}, duplicated {dup[:10]}, "
                        f"in order: {got == sorted(got)})")
    evals = [int(r["step"]) for r in records if r.get("event") == "eval"]
    if evals != expected_evals(steps, interval):
        problems.append(f"metrics: eval records at {evals}, expected {expected_evals(steps, interval)}")
    ends = sum(r.get("event") == "end" for r in records)
    if ends != 1:
        problems.append(f"metrics: {ends} end records")
    return problems


def check_history(history: list[dict], records: list[dict], steps: int, interval: int) -> tuple[list[str], float]:
    problems = []
    versions = [v["version"] for v in history]
    if versions != list(range(len(history))):
        problems.append(f"history: versions {versions} (gap or duplicate)")
    if not history or history[0]["step"] is not None:
        problems.append("history: no version 0 without a step")
    got = [v["step"] for v in history if v["version"] > 0]
    if got != expected_evals(steps, interval):
        problems.append(f"history: versions at steps {got}, expected one per interval "
                        f"{expected_evals(steps, interval)}")
    worst = 0.0
    by_version = {v["version"]: v for v in history}
    for v in history:
        if v["version"] == 0:
            continue
        prev = by_version.get(v["version"] - 1)
        want = paper_update(v["student_loss"], v["teacher_loss"], prev["weights"] if prev and prev["version"] > 0
                            else None, ALPHA)
        diff = max(abs(want[n] - v["weights"][n]) for n in want)
        worst = max(worst, diff)
        if diff > 1e-9 or set(want) != set(v["weights"]):
            problems.append(f"history: version {v['version']} weights differ from the paper's update by {diff:.3g}")
    for r in records:
        if r.get("event") != "step":
            continue
        v = by_version.get(r["version"])
        if v is None or max(abs(v["weights"][n] - r["weights"][n]) for n in r["weights"]) > 1e-9:
            problems.append(f"metrics: step {r['step']} drew with weights that are not version {r['version']}'s")
            break
    return problems, worst


def parse_rollout_id(rid: str) -> tuple[int, int, int, int] | None:
    """``"seed-rank-call-row"`` -> its four integers (None: not such an id)."""
    parts = str(rid).split("-")
    return tuple(int(x) for x in parts) if len(parts) == 4 and all(x.isdigit() for x in parts) else None


def check_rollout_ids(records: list[dict], seed: int, domains=None) -> tuple[list[str], int]:
    """The step records' ``onpolicy.rollout_ids`` of a ``kd.on_policy: 1`` run (every row of a conversation
    domain a rollout; ``domains``: their names, None: every domain): per step as many ids as the step's rows of
    those domains (none missing), none twice in the run (none trained on twice), each of the rollout seed
    ``seed``; per rank the engine's calls 0, 1, 2 ... in step order with no gap or repeat (a lost or a redone
    call), the rows of each call 0..n-1. Returns the problems and the number of ids."""
    problems: list[str] = []
    seen: dict[str, int] = {}
    calls: dict[int, list[int]] = {}
    for r in (r for r in records if r.get("event") == "step"):
        step, ids = r["step"], (r.get("onpolicy") or {}).get("rollout_ids")
        if ids is None:
            problems.append(f"step {step}: no onpolicy.rollout_ids")
            continue
        want = sum(int(n) for d, n in r.get("rows", {}).items() if domains is None or d in domains)
        if len(ids) != want:
            problems.append(f"step {step}: {len(ids)} rollout ids for {want} conversation rows")
        rows: dict[tuple[int, int], list[int]] = {}
        for rid in ids:
            parsed = parse_rollout_id(rid)
            if parsed is None or parsed[0] != seed:
                problems.append(f"step {step}: rollout id {rid!r} is not {seed}-rank-call-row")
                continue
            if rid in seen:
                problems.append(f"rollout {rid} trained on twice (steps {seen[rid]} and {step})")
            seen[rid] = step
            rows.setdefault(parsed[1:3], []).append(parsed[3])
        for (rank, call), got in sorted(rows.items()):
            if sorted(got) != list(range(len(got))):
                problems.append(f"step {step}: rank {rank} call {call} has rows {sorted(got)}")
            calls.setdefault(rank, []).append(call)
    for rank, got in sorted(calls.items()):
        if got != list(range(len(got))):
            problems.append(f"rank {rank}: rollout calls {got[:20]} in step order (a gap: lost, a repeat: redone)")
    return problems, sum(len((r.get("onpolicy") or {}).get("rollout_ids") or []) for r in records
                         if r.get("event") == "step")


def check_student(final: Path) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=False, use_safetensors=True,
                                                     dtype=torch.float32)
        with torch.no_grad():
            logits = model(input_ids=torch.arange(16).unsqueeze(0) % model.config.vocab_size).logits
    except Exception as e:  # noqa: BLE001
        return [f"final student does not load: {type(e).__name__}: {e}"]
    return [] if bool(torch.isfinite(logits).all()) else ["final student gives non-finite logits"]


def compare_students(a: Path, b: Path) -> float:
    """Largest absolute difference between two exports' tensors (inf when the keys differ)."""
    from safetensors.torch import load_file

    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    if x.keys() != y.keys():
        return math.inf
    return max(float((x[k].double() - y[k].double()).abs().max()) if x[k].numel() else 0.0 for k in x)


def close_students(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    if x.keys() != y.keys():
        return False
    return all(torch.allclose(x[k], y[k], rtol=1e-4, atol=1e-5) for k in x)


def run_checks(args, schedule: list, out: dict, work: Path) -> list[Check]:
    """Every check of a finished run; ``out`` holds ``chaos`` and ``base`` (RunResult or None), ``history``,
    ``records``, ``error``, ``left`` (pids) and ``ports``."""
    chaos, base = out["chaos"], out["base"]
    checks: list[Check] = []
    if out["error"]:
        checks.append(("no error", False, out["error"]))
    if chaos is not None:
        checks += run_result_checks(args, schedule, chaos, out["history"], out["records"], work)
        checks += baseline_checks(args, schedule, base, work)
    left, ports = out["left"], out["ports"]
    checks.append(("no process left", not left, f"{len(left)} left: {left[:10]}" if left else ""))
    checks.append(("no port held", not ports, str(ports) if ports else ""))
    return checks


def run_result_checks(args, schedule: list, chaos: RunResult, history: list[dict], records: list[dict],
                      work: Path) -> list[Check]:
    checks: list[Check] = []
    checks.append(("driver finished within the limit", chaos.rc == 0 and not chaos.timed_out,
                   f"exit {chaos.rc}, {chaos.wall_s} s" + (" (timed out)" if chaos.timed_out else "")))
    injected = sum(f["fired_step"] is not None for f in chaos.faults)
    checks.append(("every planned fault injected", injected == len(schedule), f"{injected} of {len(schedule)}"))
    p = check_metrics(records, args.steps, args.interval)
    checks.append(("metrics.jsonl: steps 1..N once each, evaluations once per interval", not p, "; ".join(p)))
    hp, worst = check_history(history, records, args.steps, args.interval) if history else (["no history"], 0)
    checks.append(("controller history: one version per interval, the paper's update", not hp,
                   "; ".join(hp) or f"{len(history)} versions, largest difference {worst:.2g}"))
    final = work / "chaos" / "final"
    sp = check_student(final) if (final / "config.json").is_file() else ["no final/ export"]
    checks.append(("final student loads (transformers)", not sp, "; ".join(sp)))
    if getattr(args, "on_policy", False):
        rp, n = check_rollout_ids(records, args.seed)
        checks.append(("rollout ids: each once, none missing across restarts", not rp and n > 0,
                       "; ".join(rp[:5]) or f"{n} rollouts"))
    return checks


def baseline_checks(args, schedule: list, base: RunResult | None, work: Path) -> list[Check]:
    """Against the fault-free run: equal when the schedule killed only teachers and train workers."""
    want_equal = {f.kind for f in schedule} <= {"teacher", "worker"}
    final = work / "chaos" / "final"
    if base is not None and base.rc == 0 and (final / "model.safetensors").is_file():
        diff = compare_students(final, work / "base" / "final")
        if want_equal:
            return [("equals the fault-free run (rtol 1e-4, atol 1e-5)",
                     close_students(final, work / "base" / "final"), f"largest difference {diff:.3g}")]
        return [("against the fault-free run (not required: the controller or driver was killed)", True,
                 f"largest difference {diff:.3g}")]
    if want_equal:
        return [("equals the fault-free run", not args.no_baseline, "skipped (--no-baseline)")]
    return []


# ----------------------------------------------------------------------------------------------------------
# the report

def report(args, schedule, chaos: RunResult, base: RunResult | None, checks: list[tuple[str, bool, str]],
           say=print) -> None:
    say("")
    say(f"chaos: {args.steps} steps, {args.faults} faults, seed {args.seed}, interval {args.interval}, "
        f"checkpoint every {args.every}, batch {args.batch_size} x 2 workers"
        + (", kd.on_policy 1" if getattr(args, "on_policy", False) else ""))
    say("")
    say("| # | kind | phase | planned step | fired at step | target | at the kill | restart delay | "
        "back after | recovered after |")
    say("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for f in chaos.faults:
        def since(t, f=f):
            return f"{t - f['fired_at']:.1f} s" if t is not None and f["fired_at"] is not None else "-"
        seen = [f["landed"]] if f["landed"] else []
        if f["orphans"]:
            seen.append(f"its {len(f['orphans'])} workers lived {since(f['orphans_gone_at'])} more"
                        + (f" and wrote {f['orphan_steps']} step(s)" if f["orphan_steps"] else ""))
        say(f"| {f['index']} | {f['kind']} | {f['phase']} | {f['step']} | {f['fired_step'] or 'not fired'} | "
            f"{f['target'] or '-'} | {'; '.join(seen) or '-'} | {f['delay'] if f['kind'] != 'worker' else 'Ray'} | "
            f"{since(f['up_at'])} | {since(f['recovered_at'])} |")
    say("")
    per_kind = {k: (sum(f["kind"] == k for f in chaos.faults), sum(f["kind"] == k and f["fired_step"] is not None
                                                                  for f in chaos.faults)) for k in KINDS}
    say("faults per kind (injected/planned): " + ", ".join(f"{k} {i}/{p}" for k, (p, i) in per_kind.items()))
    say("restarts by the supervisor: "
        + ", ".join(f"{k} {chaos.restarts[k]}" for k in ("teacher", "controller", "driver"))
        + "; unplanned exits restarted: " + ", ".join(f"{k} {v}" for k, v in chaos.unplanned.items() if k != "worker"))
    say(f"Ray Train: {chaos.ray_resumes} attempts resumed from a checkpoint (worker-group restarts and driver "
        f"restarts), {chaos.storage_resumes} of them from a checkpoint found in storage, not registered")
    say(f"teacher request failures logged by the workers (each retried or failed over): "
        f"{chaos.teacher_failures_logged}, {chaos.teacher_cut_mid_request} of them cut mid-request (connection "
        f"reset or closed with the request in flight)")
    recov = [f["recovered_at"] - f["fired_at"] for f in chaos.faults if f["recovered_at"] is not None]
    step = chaos.step_s_median or 0.0
    say(f"stall per fault (kill to the first step past it), median {statistics.median(recov):.1f} s, max "
        f"{max(recov):.1f} s; median step {step:.2f} s" if recov else "no fault recovered")
    if base is not None and base.wall_s and chaos.wall_s:
        say(f"wall time: chaos run {chaos.wall_s:.1f} s, fault-free run {base.wall_s:.1f} s: "
            f"{chaos.wall_s - base.wall_s:.1f} s lost to {sum(v for _, v in per_kind.values())} faults "
            f"({(chaos.wall_s - base.wall_s) / max(1, sum(v for _, v in per_kind.values())):.1f} s per fault)")
    else:
        say(f"wall time: chaos run {chaos.wall_s} s (no fault-free run)")
    say("")
    say("checks:")
    for name, ok, detail in checks:
        say(f"  [{'ok' if ok else 'FAIL'}] {name}" + (f": {detail}" if detail else ""))
    say("")
    say("chaos: PASSED" if all(ok for _, ok, _ in checks) else "chaos: FAILED")
