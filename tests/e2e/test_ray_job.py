"""The deployment's topology for real, without containers: a two-node Ray cluster (`ray start --head` +
`ray start --address`), the teacher and the controller as processes, and a short `ddk train` submitted as
a Ray Job with deploy/ray/submit.sh, which ships the checkout's code to the nodes. The run is the real kit's
(``ddk fixtures --real``: the SmolLM2-135M teacher and its 20-layer student, 49,152 tokens): a 4-step DDK run
across 2 Ray workers whose export transformers loads and generates from (issue 26).

The deployment files themselves (compose, Dockerfiles, k8s, the cluster config) are checked in
tests/unit/test_deploy_files.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SUBMIT = REPO / "deploy" / "ray" / "submit.sh"
VENV_BIN = Path(sys.executable).parent


# ----------------------------------------------------------------------------- the topology, for real

def _export_loads_and_generates(final: Path, kit: Path) -> None:
    """The exported student: transformers loads it (float32), its tokenizer is the kit's (fingerprint), it keeps
    the real vocabulary and tied embeddings, and greedy decoding of a code prompt gives non-empty text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ddk.fingerprint import tokenizer_fingerprint

    tok = AutoTokenizer.from_pretrained(final)
    assert tokenizer_fingerprint(tok) == json.loads((kit / "kit.json").read_text())["tokenizer_fingerprint"]
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    assert model.config.vocab_size == 49152 and model.config.tie_word_embeddings
    prompt = tok("def add(a, b):\n    return", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    text = tok.decode(generated[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert generated.shape[1] > prompt["input_ids"].shape[1] and text.strip(), text


class RayNode:
    """``ray start ... --block`` in its own session; stopping it ends every process of that session.

    Not `ray stop`: that would end every Ray process on the machine, other tests' included.
    """

    def __init__(self, args: list[str], env: dict, log: Path):
        self.log = open(log, "wb")
        self.proc = subprocess.Popen([str(VENV_BIN / "ray"), "start", *args, "--block"], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self, temp_dir: str) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # `ray start --block` tears its node down
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        for pid in self._leftovers(temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        self.log.close()

    def _leftovers(self, temp_dir: str) -> list[int]:
        """Processes of this node's session, or whose command line names this cluster's temp dir."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                stat = (entry / "stat").read_text()
                session = int(stat.rsplit(")", 1)[1].split()[3])
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, ValueError, IndexError):
                continue
            if session == self.proc.pid or temp_dir in cmdline:
                pids.append(int(entry.name))
        return pids


def _get_json(url: str, timeout: float = 5.0):
    import httpx

    r = httpx.get(url, timeout=timeout)
    r.raise_for_status()
    return r.json()


def _state(dashboard: str, resource: str) -> list[dict]:
    """Ray's state API over HTTP (what `ray list nodes|actors` reads), without importing Ray here."""
    reply = _get_json(f"{dashboard}/api/v0/{resource}?limit=1000&detail=1", timeout=30)
    return reply["data"]["result"]["result"]


def _wait_for(predicate, what: str, timeout: float, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"exited with {p.returncode} while waiting for {what}")
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} after {timeout:.0f}s")


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_two_node_ray_cluster_runs_a_ray_job_against_teacher_and_controller(real_kit, tmp_path):
    """The deployment's topology without containers: Ray head + a second Ray node, teacher and
    controller as separate processes, and `ddk train` submitted as a Ray Job by deploy/ray/submit.sh
    (the command docs/deploy.md gives). The run completes, the controller holds its weights, and the
    Ray Train workers ran on both nodes. The kit is the real one: the export loads with transformers, keeps the
    kit's tokenizer and generates text.

    Everything uses ports of its own and Ray keeps its files in a temp dir of its own, so other Ray
    clusters on the machine are neither seen nor touched. About 2 minutes on 2 idle cores."""
    from procs import DDK, free_port, kill_group, wait_healthy

    kit = real_kit

    temp_dir = tempfile.mkdtemp(prefix="ddkray-", dir="/tmp")  # short: Ray's socket paths have a limit
    gcs, dashboard = free_port(), free_port()
    dash = f"http://127.0.0.1:{dashboard}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no outside cluster leaks in
    # RAY_AUTH_MODE: `ray start` turns token authentication on when ~/.ray/auth_token exists (any local
    # ray.init() on this machine writes one); a fresh container has none, so the deployment runs without.
    env.update(PATH=f"{VENV_BIN}:{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")

    def node_args():  # what both nodes share, and ports of each node's own (Ray's defaults are fixed ones)
        return [f"--temp-dir={temp_dir}", "--num-cpus=1", "--num-gpus=0",
                f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
                "--disable-usage-stats"]

    run_id = f"deploy-{os.getpid()}"
    token_file = tmp_path / "token"
    token_file.write_text("deploy-test-token\n")
    nodes: list[RayNode] = []
    services: dict[str, tuple[subprocess.Popen, str]] = {}
    logs = []
    try:
        # One logical CPU per node, so that 2 Ray Train workers need both nodes. The teacher and the
        # controller start while Ray does (on 2 cores, starting is mostly waiting).
        nodes.append(RayNode(["--head", f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                              f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
                              *node_args()], env, tmp_path / "ray-head.log"))
        for name, args in (("teacher", ["teacher", "serve", "--model", str(kit / "teacher"), "--backend", "hf"]),
                           ("controller", ["controller", "serve", "--db", str(tmp_path / "controller.sqlite"),
                                           "--token-file", str(token_file)])):
            port = free_port()
            logs.append(open(tmp_path / f"{name}.log", "wb"))
            proc = subprocess.Popen(DDK + args + ["--host", "127.0.0.1", "--port", str(port)], cwd=REPO,
                                    stdout=logs[-1], stderr=subprocess.STDOUT, start_new_session=True)
            services[name] = proc, f"http://127.0.0.1:{port}"

        def gcs_up():
            with socket.create_connection(("127.0.0.1", gcs), timeout=2):
                return True

        _wait_for(gcs_up, "Ray head GCS", 90, [nodes[0].proc])
        nodes.append(RayNode([f"--address=127.0.0.1:{gcs}", *node_args()], env, tmp_path / "ray-worker.log"))
        for name, (proc, url) in services.items():
            wait_healthy(f"{url}/healthz", proc, timeout=120)

        def two_nodes_alive():
            return sum(n["state"] == "ALIVE" for n in _state(dash, "nodes")) == 2

        _wait_for(two_nodes_alive, "2 Ray nodes alive", 90, [n.proc for n in nodes])

        teacher_url, controller_url = services["teacher"][1], services["controller"][1]
        # Ray Train's helper actors look their cluster up when RAY_ADDRESS is unset; with other Ray
        # clusters on this machine they could pick another one (a container only ever has its own).
        pin_cluster = json.dumps({"env_vars": {"RAY_ADDRESS": f"127.0.0.1:{gcs}"}})
        submit = subprocess.run(
            ["bash", str(SUBMIT), str(kit / "train.yaml"),
             "--set", f"run_id={run_id}",
             "--set", f"teacher.urls=[\"{teacher_url}\"]",
             "--set", f"controller.url={controller_url}",
             "--set", f"controller.token_file={token_file}",
             "--set", "train.steps=4", "--set", "mixture.interval_steps=2", "--set", "train.batch_size=1",
             "--set", "ray.num_workers=2", "--set", "ray.use_gpu=false", "--set", "eval.sequences_per_domain=2",
             # a quarter of the kit's seq_len: what is checked is the path (Ray Job, real model, export), not the size
             "--set", "checkpoint.every_steps=4", "--set", "data.seq_len=64",
             "--set", f"data.cache_dir={kit.parent / 'token-cache'}",
             "--set", f"output_dir={tmp_path / 'out'}"],
            cwd=REPO, env={**env, "RAY_ADDRESS": dash, "DDK_RUNTIME_ENV_JSON": pin_cluster}, capture_output=True,
            text=True, timeout=360)
        (tmp_path / "submit.log").write_text(submit.stdout + "\n--- stderr ---\n" + submit.stderr)
        assert submit.returncode == 0, (submit.stdout + submit.stderr)[-4000:]

        weights = _get_json(f"{controller_url}/v1/runs/{run_id}/weights")
        history = _get_json(f"{controller_url}/v1/runs/{run_id}/history")["versions"]
        jobs = _get_json(f"{dash}/api/jobs/")
        workers = [a for a in _state(dash, "actors") if "TrainWorker" in (a.get("class_name") or "")]
    finally:
        for proc, _ in services.values():
            kill_group(proc)
        for log in logs:
            log.close()
        for node in reversed(nodes):
            node.stop(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)

    # one Ray Job (the `ddk train` driver on the cluster), and it succeeded
    (job,) = [j for j in jobs if j.get("type") == "SUBMISSION"]
    assert job["status"] == "SUCCEEDED" and job["entrypoint"].startswith("ddk train "), job
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    step_records = [r for r in records if r.get("event") == "step"]  # distillation: a teacher term in every step
    assert [r["step"] for r in step_records] == [1, 2, 3, 4], step_records
    assert all(math.isfinite(r["loss"]) and r["kl"] > 0 for r in step_records), step_records
    _export_loads_and_generates(tmp_path / "out" / "final", kit)
    domains = {d["name"] for d in yaml.safe_load((kit / "data.yaml").read_text())["domains"]}
    assert set(weights["weights"]) == domains
    assert abs(sum(weights["weights"].values()) - 1) < 1e-6
    # evaluations at step 0 and every 2 steps: versions 1.. at steps 0, 2 (and 4 if evaluated at the end)
    steps = [v["step"] for v in history if v["version"] > 0]
    assert steps[:2] == [0, 2] and weights["version"] == max(v["version"] for v in history) >= 2
    # the code that ran is the checkout's, shipped by submit.sh as a py_modules entry: the driver and both
    # workers imported ddk from Ray's runtime-resources folder, not from this checkout or site-packages
    origins = re.findall(r"ddk \S+ imported from (\S+)", submit.stdout + submit.stderr)
    assert len(origins) >= 3, (submit.stdout + submit.stderr)[-3000:]
    assert all("runtime_resources" in o and not o.startswith(str(REPO)) for o in origins), origins
    # the two Ray Train workers ran on two different nodes
    assert len({a["node_id"] for a in workers}) == 2, [(a["class_name"], a["node_id"]) for a in workers]
