"""`ddk compare` with 2 arms and 1 seed on the quick kit: compare's own code (its controller process, held-out
scoring, report, plot, reuse of finished runs) for real, each arm's `ddk train` run in-process
(inproc.run_train_argv: the same job without Ray) against the session's teacher.

The report names every domain and arm; kd's mixture stays at the data's natural proportions at every step,
while ddk moves its draws toward the domain where the student lags the teacher most.
"""

from __future__ import annotations

import argparse
import json

import pytest

from inproc import run_train_argv

pytestmark = pytest.mark.slow


def test_compare_kd_vs_ddk_token_shares(kit, teacher_url, tmp_path, capsys):
    from ddk.experiments.compare import main, tokens_per_domain

    out = tmp_path / "cmp"
    sets = ["train.steps=12", "mixture.interval_steps=4", "checkpoint.every_steps=100", "ray.num_workers=1",
            "train.batch_size=8", "eval.sequences_per_domain=8", f"data.cache_dir={tmp_path / 'cache'}",
            f"teacher.urls=[{teacher_url}]"]
    args = argparse.Namespace(config=str(kit / "train.yaml"), policies="kd,ddk", seeds=1, out=str(out),
                              teacher_model=None, overrides=sets)
    assert main(args, runner=run_train_argv) == 0

    report = (out / "report.md").read_text()
    domains = sorted(p.name for p in (kit / "data").iterdir())
    for name in domains + ["kd", "ddk", "initial student"]:
        assert name in report, name
    assert (out / "compare.png").stat().st_size > 1000

    data = json.loads((out / "report.json").read_text())
    assert "Scoring-set ratios with standard errors" in report  # each run's ratios +- their log-ratio SE
    # each run's wall time under compare in its summary and the report; no task domain here: no task accuracy
    summary = json.loads((out / "runs" / "ddk-demo-kd-s0" / "summary.json").read_text())
    assert summary["compare_wall_s"] > 0 and "task_accuracy" not in summary
    assert "| kd | 1 |" in report.split("## Wall time per run")[1] and "## Task accuracy" not in report
    for run in data["raw"]["ddk"] + data["raw"]["kd"]:
        assert set(run["ratio_log_se"]) == set(domains) and all(v > 0 for v in run["ratio_log_se"].values())
    # the runs steered by the other half of the validation documents (eval.documents: steer)
    record = json.loads((out / "runs" / "ddk-demo-ddk-s0" / "eval-set.json").read_text())
    assert record["documents"] == "steer" and set(record["domains"]) == set(domains)
    natural, initial = data["natural_proportions"], data["initial"]
    lagging = max(initial, key=initial.get)

    def steps(policy):
        path = out / "runs" / f"ddk-demo-{policy}-s0" / "metrics.jsonl"
        return path, [json.loads(line) for line in path.read_text().splitlines()
                      if json.loads(line).get("event") == "step"]

    kd_path, kd_steps = steps("kd")
    ddk_path, ddk_steps = steps("ddk")
    assert [r["step"] for r in kd_steps] == list(range(1, 13)) or len(kd_steps) == 12
    for r in kd_steps:  # fixed stays at its proportions
        assert r["weights"] == pytest.approx(natural, abs=1e-9)
    # ddk: after its first evaluation the lagging domain weighs more than its natural share ...
    assert ddk_steps[-1]["weights"][lagging] > natural[lagging] + 0.1
    # ... and received more student tokens than under kd (96 rows drawn each: the gap is far beyond noise)
    kd_tokens, ddk_tokens = tokens_per_domain(kd_path, 128), tokens_per_domain(ddk_path, 128)
    assert sum(kd_tokens.values()) == sum(ddk_tokens.values()) == 12 * 8 * 128
    assert ddk_tokens[lagging] > kd_tokens.get(lagging, 0)
    # the report's token table carries the same counts
    assert data["policies"]["ddk"]["tokens"][lagging] == ddk_tokens[lagging]

    # finished runs are reused: a second invocation trains nothing
    capsys.readouterr()

    def refuse(run_id, argv):
        raise AssertionError(f"{run_id} trained again")

    assert main(args, runner=refuse) == 0
    assert capsys.readouterr().out.count("finished before, reused") == 2
