"""Deployment files: docker compose, Dockerfiles, the Ray cluster launcher config, Kubernetes manifests.

No Docker engine or Kubernetes cluster runs here, so these tests check what can be checked without
one: compose validates with docker-compose, the cluster config with Ray's own validator, every `ddk`
and `ray` command line parses with the real CLIs, every file a Dockerfile copies exists, versions and
ports agree across files. The same topology runs for real, without containers, in
tests/e2e/test_ray_job.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import yaml

from ddk.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
CLUSTER = DEPLOY / "ray" / "cluster.yaml"
SUBMIT = DEPLOY / "ray" / "submit.sh"
K8S = DEPLOY / "k8s"
DOCKERFILES = sorted((DEPLOY / "docker").glob("*.Dockerfile"))
VENV_BIN = Path(sys.executable).parent

TEACHER_PORT, CONTROLLER_PORT, RAY_GCS_PORT, RAY_DASHBOARD_PORT = 8100, 8200, 6379, 8265

# The train config keys of the contract (preamble / ARCHITECTURE): deployment files may set only these.
CONTRACT_KEYS = {
    "run_id", "teacher.urls", "controller.url", "controller.token_file", "student.model", "data.file",
    "data.domains", "data.seq_len", "train.steps", "train.batch_size", "train.lr", "kd.gamma",
    "kd.temperature", "kd.top_k", "mixture.policy", "mixture.interval_steps", "mixture.alpha",
    "eval.sequences_per_domain", "ray.address", "ray.num_workers", "ray.use_gpu",
    "checkpoint.every_steps", "output_dir", "seed",
}


# ----------------------------------------------------------------------------- helpers

def env_example() -> dict[str, str]:
    """KEY=VALUE lines of .env.example."""
    env = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}|\$(\w+)")


def substitute(text: str, env: dict[str, str]) -> str:
    """Shell/compose-style ${VAR}, ${VAR:-default} and $VAR, from ``env`` (else the default)."""

    def one(m: re.Match) -> str:
        name = m.group(1) or m.group(3)
        if name in env:
            return env[name]
        if m.group(2) is not None:
            return m.group(2)
        raise KeyError(f"${name} has no value and no default")

    return _VAR.sub(one, text)


def compose() -> dict:
    """docker-compose.yml with ${VARS} substituted from .env.example (YAML merge keys resolved)."""
    return yaml.safe_load(substitute(COMPOSE.read_text(), env_example()))


def k8s_docs() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") != "Kustomization"]
    return docs


def k8s_objects(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in k8s_docs() if d.get("kind") == kind}


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuation lines joined, comments dropped."""
    instructions, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        word, _, rest = current.partition(" ")
        instructions.append((word.upper(), rest.strip()))
        current = ""
    return instructions


def exec_form(args: str) -> list[str]:
    """A Dockerfile CMD/ENTRYPOINT argument: JSON exec form, else shell words."""
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def parse_ddk(argv: list[str]):
    """Parse ``ddk <argv>`` with the real CLI parser; a bad command line fails the test."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on an unknown subcommand or flag
        pytest.fail(f"`ddk {shlex.join(argv)}` does not parse (exit {e.code})")


def set_keys(argv: list[str]) -> dict[str, object]:
    """The --set key=value pairs of a `ddk train` argv, values parsed as YAML (the contract)."""
    args = parse_ddk(argv)
    assert args.command == "train"
    pairs = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        assert sep, f"--set {item!r} has no '='"
        pairs[key] = yaml.safe_load(value)
    return pairs


def parse_ray(argv: list[str]):
    """Parse ``ray <argv>`` with Ray's real click CLI, without running it: (command, params)."""
    import click

    with warnings.catch_warnings():  # Ray's CLI imports Ray Serve, which warns about pydantic
        warnings.simplefilter("ignore")
        from ray.scripts.scripts import cli

    ctx, cmd = cli.make_context("ray", list(argv)), cli
    try:
        while isinstance(cmd, click.Group):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                rest = [*ctx.protected_args, *ctx.args]
            name, cmd, rest = cmd.resolve_command(ctx, rest)
            ctx = cmd.make_context(name, rest, parent=ctx)
    except click.UsageError as e:
        pytest.fail(f"`ray {shlex.join(argv)}` does not parse: {e}")
    return cmd.name, ctx.params


def shell_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line joined with && or ;, each split into words."""
    return [shlex.split(part) for part in re.split(r"&&|;", line) if part.strip()]


def ddk_after(words: list[str]) -> list[str]:
    """The `ddk ...` argv that follows `--` (a `ray job submit` entrypoint) or starts the list."""
    if "--" in words:
        words = words[words.index("--") + 1:]
    assert words and words[0] == "ddk", words
    return words[1:]


def port_of(url: str) -> int:
    m = re.match(r"https?://[^/:]+:(\d+)", url)
    assert m, f"no port in {url!r}"
    return int(m.group(1))


def flag(argv: list[str], name: str) -> str:
    """Value of ``--name V`` or ``--name=V`` in an argv."""
    for i, word in enumerate(argv):
        if word == name:
            return argv[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    raise AssertionError(f"{name} not in {argv}")


# ----------------------------------------------------------------------------- YAML and compose

def test_every_yaml_file_parses():
    files = [COMPOSE, CLUSTER, *sorted(K8S.glob("*.yaml"))]
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), path
    # the train config embedded in the ConfigMap is YAML too
    cm = k8s_objects("ConfigMap")["ddk-train-config"]
    assert isinstance(yaml.safe_load(cm["data"]["train.yaml"]), dict)


@pytest.mark.parametrize("env_file", [None, ".env.example"])
def test_compose_validates_with_docker_compose(env_file, tmp_path):
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose not installed (apt-get install -y docker-compose)")
    cmd = [exe, "-f", str(COMPOSE)] + (["--env-file", str(REPO / env_file)] if env_file else [])
    # a scratch project directory: no .env of the user's leaks in
    ok = subprocess.run(cmd + ["config", "-q"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    # and it can fail: a service that depends on a service that does not exist is rejected
    broken = tmp_path / "broken.yml"
    data = yaml.safe_load(COMPOSE.read_text())
    data["services"]["train"]["depends_on"]["no-such-service"] = {"condition": "service_healthy"}
    broken.write_text(yaml.safe_dump(data))
    bad = subprocess.run([exe, "-f", str(broken), "config", "-q"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode != 0


def test_compose_variables_all_come_from_env_example():
    used = {m.group(1) or m.group(3) for m in _VAR.finditer(COMPOSE.read_text())}
    defaults = {m.group(1): m.group(2) for m in _VAR.finditer(COMPOSE.read_text()) if m.group(1)}
    env = env_example()
    assert used == set(env), f"only in compose: {used - set(env)}; only in .env.example: {set(env) - used}"
    for name, default in defaults.items():  # an absent .env behaves like the example
        assert default == env[name], f"${{{name}}}: compose default {default!r} != .env.example {env[name]!r}"


def test_compose_services_and_gpu_placement():
    c = compose()
    services = c["services"]
    assert {"teacher", "controller", "ray-head", "ray-worker", "train"} <= set(services)

    def gpus(name):
        devices = services[name].get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        return [(d["driver"], tuple(d["device_ids"]), tuple(d["capabilities"])) for d in devices]

    teacher, worker = gpus("teacher"), gpus("ray-worker")
    assert teacher and worker and all(d[0] == "nvidia" and "gpu" in d[2] for d in teacher + worker)
    teacher_ids = {i for d in teacher for i in d[1]}
    student_ids = {i for d in worker for i in d[1]}
    assert teacher_ids and student_ids and not teacher_ids & student_ids, "teacher and students share a GPU"
    assert not gpus("ray-head") and not gpus("controller") and not gpus("train")

    # the one-shot train waits for healthy teacher, controller and Ray, and is not restarted
    train = services["train"]
    for dep in ("teacher", "controller", "ray-head"):
        assert train["depends_on"][dep]["condition"] == "service_healthy"
    assert train.get("restart") == "no"
    for name in ("teacher", "controller", "ray-head", "ray-worker"):
        assert services[name]["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name

    # SQLite on a named volume; the token from a compose secret that both ends mount
    volumes = services["controller"]["volumes"]
    db = flag(["ddk"] + services["controller"]["command"], "--db")
    assert any(v.split(":")[0] in c["volumes"] and db.startswith(v.split(":")[1]) for v in volumes)
    token = flag(["ddk"] + services["controller"]["command"], "--token-file")
    assert token == "/run/secrets/controller_token" and "controller_token" in c["secrets"]
    train_sets = set_keys(ddk_after(train["command"]))
    assert train_sets["controller.token_file"] == token
    for name in ("controller", "ray-head", "ray-worker"):  # the driver and the workers read it
        assert "controller_token" in services[name]["secrets"], name


def test_compose_ddk_command_lines_parse_and_bind_all_interfaces():
    services = compose()["services"]
    for name, sub in (("teacher", "teacher"), ("controller", "controller")):
        args = parse_ddk(services[name]["command"])  # the image's ENTRYPOINT is `ddk`
        assert args.command == sub
        assert args.host == "0.0.0.0", f"{name} must bind 0.0.0.0 inside a container"
    assert parse_ddk(services["teacher"]["command"]).port == TEACHER_PORT
    assert parse_ddk(services["controller"]["command"]).port == CONTROLLER_PORT

    train = services["train"]["command"]
    assert parse_ray(train[1:])[0] == "submit"
    sets = set_keys(ddk_after(train))
    assert set(sets) <= CONTRACT_KEYS, set(sets) - CONTRACT_KEYS
    assert sets["teacher.urls"] == [f"http://teacher:{TEACHER_PORT}"]
    assert sets["controller.url"] == f"http://controller:{CONTROLLER_PORT}"
    assert sets["ray.address"] == "auto" and sets["ray.use_gpu"] is True


def test_compose_ports_agree():
    c = compose()
    s = c["services"]
    # published container ports and the healthcheck URLs are the ports the commands bind
    for name, port in (("teacher", TEACHER_PORT), ("controller", CONTROLLER_PORT)):
        assert [int(p.split(":")[-1]) for p in s[name]["ports"]] == [port]
        assert port_of(re.search(r"http://[^'\"]+", " ".join(s[name]["healthcheck"]["test"])).group(0)) == port
    _, head = parse_ray(s["ray-head"]["command"][1:])
    assert head["head"] and head["port"] == RAY_GCS_PORT and head["dashboard_port"] == RAY_DASHBOARD_PORT
    assert head["dashboard_host"] == "0.0.0.0" and head["num_gpus"] == 0
    assert [int(p.split(":")[-1]) for p in s["ray-head"]["ports"]] == [RAY_DASHBOARD_PORT]
    _, worker = parse_ray(s["ray-worker"]["command"][1:])
    assert worker["address"] == f"ray-head:{RAY_GCS_PORT}" and worker["num_gpus"] == 1
    _, submit = parse_ray(s["train"]["command"][1:])
    assert submit["address"] == f"http://ray-head:{RAY_DASHBOARD_PORT}"
    # Ray Train needs one GPU per worker: as many workers as GPUs reserved by ray-worker services
    student_gpus = sum(len(d["device_ids"]) for n, svc in s.items() if n.startswith("ray-worker")
                       for d in svc["deploy"]["resources"]["reservations"]["devices"])
    assert set_keys(ddk_after(s["train"]["command"]))["ray.num_workers"] == student_gpus


# ----------------------------------------------------------------------------- Dockerfiles

def test_three_images_exist():
    assert {p.name for p in DOCKERFILES} == {"teacher.Dockerfile", "trainer.Dockerfile", "controller.Dockerfile"}
    services = compose()["services"]
    for name, file in (("teacher", "teacher"), ("controller", "controller"), ("ray-head", "trainer"),
                       ("ray-worker", "trainer"), ("train", "trainer")):
        assert services[name]["build"]["dockerfile"] == f"deploy/docker/{file}.Dockerfile"
        assert services[name]["build"]["context"] == "."


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_exist_and_are_not_ignored(path):
    ignore = path.with_name(path.name + ".dockerignore")
    allowed = [line[1:].rstrip("/") for line in ignore.read_text().splitlines() if line.startswith("!")]
    copies = [rest for word, rest in dockerfile(path) if word in ("COPY", "ADD")]
    assert copies
    for rest in copies:
        words = [w for w in shlex.split(rest) if not w.startswith("--")]
        assert "--from" not in rest
        for src in words[:-1]:
            assert (REPO / src).exists(), f"{path.name}: COPY {src}: no such file in the repository"
            assert any(src == a or src.startswith(a + "/") for a in allowed), \
                f"{path.name}: COPY {src} is excluded by {ignore.name}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_non_root_healthcheck_no_weights(path):
    instructions = dockerfile(path)
    users = [rest for word, rest in instructions if word == "USER"]
    assert users and users[-1] not in ("root", "0"), f"{path.name} runs as root"
    assert any(word == "HEALTHCHECK" for word, _ in instructions)
    text = path.read_text()
    assert not re.search(r"\.safetensors|\.bin\b|huggingface-cli download|snapshot_download", text)


def _base_image(path: Path) -> str:
    instructions = dockerfile(path)
    args = dict(re.match(r"(\w+)=(\S+)", rest).groups() for word, rest in instructions if word == "ARG"
                and "=" in rest)
    base = next(rest for word, rest in instructions if word == "FROM")
    return substitute(base, args)


def _pins() -> dict[str, str]:
    pins = {}
    for line in (DEPLOY / "docker" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.lower()] = version
    return pins


def test_images_and_versions_are_pinned_and_agree_with_pyproject():
    import tomllib

    from packaging.requirements import Requirement

    pins = _pins()
    images = {p.name.split(".")[0]: _base_image(p) for p in DOCKERFILES}
    for name, image in images.items():
        assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned base image {image}"
    assert images["teacher"] == f"vllm/vllm-openai:v{pins['vllm']}"
    assert images["trainer"] == f"rayproject/ray:{pins['ray']}-py311-gpu"
    assert images["controller"].startswith("python:3.11")
    assert k8s_objects("RayJob")["ddk-train"]["spec"]["rayClusterSpec"]["rayVersion"] == pins["ray"]

    # every pin lies inside the range pyproject.toml declares for it
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    declared = {}
    for text in reqs:
        req = Requirement(text)
        declared.setdefault(req.name.lower(), []).append(req.specifier)
    for name, version in pins.items():
        assert name in declared, f"constraints.txt pins {name}, which pyproject.toml does not declare"
        for spec in declared[name]:
            assert spec.contains(version, prereleases=True), f"{name}=={version} outside pyproject's {spec}"
    for name in ("torch", "ray", "vllm", "transformers", "fastapi", "uvicorn"):
        assert name in pins, f"{name} not pinned"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_commands_parse(path):
    instructions = dockerfile(path)
    entry = [exec_form(rest) for word, rest in instructions if word == "ENTRYPOINT"]
    cmd = exec_form([rest for word, rest in instructions if word == "CMD"][-1])
    exposed = {int(p) for word, rest in instructions if word == "EXPOSE" for p in rest.split()}
    health = [rest for word, rest in instructions if word == "HEALTHCHECK"][-1]
    if entry:
        assert entry[-1] == ["ddk"], path.name
        args = parse_ddk(cmd)
        assert args.host == "0.0.0.0" and args.port in exposed
        assert port_of(re.search(r"http://[^'\"]+", health).group(0)) == args.port
    else:  # the Ray image: `ray start --head` by default
        assert cmd[0] == "ray"
        _, params = parse_ray(cmd[1:])
        assert {params["port"], params["dashboard_port"]} <= exposed


def test_pins_keep_the_base_images_versions():
    """pins.py: packages already in the base image keep their version; the others get ours."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pins", DEPLOY / "docker" / "pins.py")
    pins = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pins)
    ours = {"torch": "torch==2.13.0", "fastapi": "fastapi==0.136.3", "pyyaml": "PyYAML==6.0.4"}
    image = {"torch": "torch==2.13.0+cu129", "vllm": "vllm==0.32.0"}
    assert pins.merge(ours, image) == ["fastapi==0.136.3", "PyYAML==6.0.4", "torch==2.13.0+cu129",
                                      "vllm==0.32.0"]
    assert pins.canonical("Prometheus_Client") == "prometheus-client"
    out = subprocess.run([sys.executable, str(DEPLOY / "docker" / "pins.py"),
                          str(DEPLOY / "docker" / "constraints.txt")], capture_output=True, text=True, check=True)
    assert sorted(out.stdout.split()) == sorted(f"{k}=={v}" for k, v in _pins().items())


# ----------------------------------------------------------------------------- Ray cluster launcher

def test_cluster_yaml_validates_with_rays_own_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(CLUSTER.read_text())
    validate_config(prepare_config(config))  # what `ray up` runs before touching any machine
    broken = dict(config, no_such_field=1)
    with pytest.raises(Exception):
        validate_config(prepare_config(broken))
    assert config["docker"]["image"] == f"{compose()['services']['ray-head']['image']}"
    # the ray commands parse with Ray's CLI and use the ports of the rest of the deployment
    env = {"RAY_HEAD_IP": config["provider"]["head_ip"]}
    head = [c for line in config["head_start_ray_commands"] for c in shell_commands(line) if c[0] == "ray"]
    worker = [c for line in config["worker_start_ray_commands"] for c in shell_commands(line) if c[0] == "ray"]
    starts = [parse_ray([substitute(w, env) for w in c[1:]]) for c in head + worker]
    (h,) = [p for name, p in starts if name == "start" and p["head"]]
    (w,) = [p for name, p in starts if name == "start" and not p["head"]]
    assert h["port"] == RAY_GCS_PORT and h["dashboard_port"] == RAY_DASHBOARD_PORT
    assert w["address"] == f"{config['provider']['head_ip']}:{RAY_GCS_PORT}"


def test_submit_script_command_parses(tmp_path):
    """deploy/ray/submit.sh hands `ray job submit` an argv that Ray's CLI and ddk's CLI both accept.

    A stand-in `ray` on PATH records the argv the script builds (its quoting and "$@" are what is
    under test here); the slow test below runs the script against a real cluster."""
    subprocess.run(["bash", "-n", str(SUBMIT)], check=True)
    fake = tmp_path / "ray"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import json, sys; print(json.dumps(sys.argv[1:]))' \"$@\"\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}",
           "RAY_ADDRESS": f"http://10.0.0.10:{RAY_DASHBOARD_PORT}"}
    out = subprocess.run(["bash", str(SUBMIT), "/workspace/train.yaml", "--set", "run_id=a b",
                          "--set", 'teacher.urls=["http://t:8100"]'], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    argv = json.loads(out.stdout)
    name, params = parse_ray(argv)
    assert name == "submit" and params["address"] == env["RAY_ADDRESS"] and params["working_dir"] == "."
    ddk = list(params["entrypoint"])
    assert ddk[:3] == ["ddk", "train", "/workspace/train.yaml"]
    assert set_keys(ddk[1:]) == {"ray.address": "auto", "run_id": "a b", "teacher.urls": ["http://t:8100"]}
    # without RAY_ADDRESS it stops before calling ray
    env.pop("RAY_ADDRESS")
    out = subprocess.run(["bash", str(SUBMIT), "x.yaml"], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "RAY_ADDRESS" in out.stderr and not out.stdout


# ----------------------------------------------------------------------------- Kubernetes

def _pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def test_k8s_objects_present():
    kinds = {(d["kind"], d["metadata"]["name"]) for d in k8s_docs()}
    assert {("RayJob", "ddk-train"), ("Deployment", "ddk-teacher"), ("Service", "ddk-teacher"),
            ("Deployment", "ddk-controller"), ("Service", "ddk-controller"),
            ("PersistentVolumeClaim", "ddk-controller-db"), ("Secret", "ddk-controller-token"),
            ("ConfigMap", "ddk-train-config")} <= kinds
    assert k8s_objects("RayJob")["ddk-train"]["apiVersion"] == "ray.io/v1"


def test_k8s_teacher_and_controller():
    deployments, services = k8s_objects("Deployment"), k8s_objects("Service")
    for name, sub, port in (("ddk-teacher", "teacher", TEACHER_PORT),
                            ("ddk-controller", "controller", CONTROLLER_PORT)):
        dep = deployments[name]
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        assert services[name]["spec"]["selector"].items() <= pod_labels.items(), f"{name}: Service selects nothing"
        (container,) = _pod_spec(dep)["containers"]
        args = parse_ddk(container["args"])  # the image's ENTRYPOINT is `ddk`
        assert args.command == sub and args.host == "0.0.0.0" and args.port == port
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        (svc_port,) = services[name]["spec"]["ports"]
        assert svc_port["port"] == port and named[svc_port["targetPort"]] == port
        probe = container["readinessProbe"]["httpGet"]
        assert probe["path"] == "/healthz" and named.get(probe["port"], probe["port"]) == port
        assert _pod_spec(dep)["securityContext"]["runAsNonRoot"] is True
    teacher = _pod_spec(deployments["ddk-teacher"])["containers"][0]
    assert teacher["resources"]["limits"]["nvidia.com/gpu"] == 1
    controller = deployments["ddk-controller"]
    assert controller["spec"]["replicas"] == 1 and controller["spec"]["strategy"]["type"] == "Recreate"


def test_k8s_references_resolve():
    """Every claim, ConfigMap, Secret and mounted file the pods name exists in the manifests."""
    claims, configmaps, secrets = (set(k8s_objects(k)) for k in ("PersistentVolumeClaim", "ConfigMap", "Secret"))
    rayjob = k8s_objects("RayJob")["ddk-train"]["spec"]["rayClusterSpec"]
    head = rayjob["headGroupSpec"]["template"]["spec"]
    ray_pods = [head] + [g["template"]["spec"] for g in rayjob["workerGroupSpecs"]]
    pods = [_pod_spec(d) for d in k8s_objects("Deployment").values()] + ray_pods
    for pod in pods:
        volumes = {v["name"]: v for v in pod["volumes"]}
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps
            if "secret" in v:
                assert v["secret"]["secretName"] in secrets
        for c in pod["containers"]:
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{c['name']}: mount of undeclared volume {m['name']}"

    def mounted(pod, path):
        """The volume mounted at a directory that holds ``path`` in the pod's first container."""
        for m in pod["containers"][0]["volumeMounts"]:
            if path.startswith(m["mountPath"].rstrip("/") + "/"):
                return {v["name"]: v for v in pod["volumes"]}[m["name"]]
        raise AssertionError(f"{path} is on no volume")

    config_path = ddk_after(shlex.split(k8s_objects("RayJob")["ddk-train"]["spec"]["entrypoint"]))[1]
    vol = mounted(head, config_path)
    assert Path(config_path).name in k8s_objects("ConfigMap")[vol["configMap"]["name"]]["data"]
    config = yaml.safe_load(k8s_objects("ConfigMap")["ddk-train-config"]["data"]["train.yaml"])
    token = config["controller"]["token_file"]
    for pod in ray_pods:  # the driver and the workers can read the trainer's token file
        assert mounted(pod, token)["secret"]["secretName"] == "ddk-controller-token"
    ctl = _pod_spec(k8s_objects("Deployment")["ddk-controller"])
    ctl_args = ctl["containers"][0]["args"]
    assert Path(flag(ctl_args, "--token-file")).name == Path(token).name
    assert mounted(ctl, flag(ctl_args, "--token-file"))["secret"]["secretName"] == "ddk-controller-token"
    assert "persistentVolumeClaim" in mounted(ctl, flag(ctl_args, "--db"))


def test_k8s_rayjob_and_train_config():
    job = k8s_objects("RayJob")["ddk-train"]["spec"]
    sets = set_keys(ddk_after(shlex.split(job["entrypoint"])))
    config = yaml.safe_load(k8s_objects("ConfigMap")["ddk-train-config"]["data"]["train.yaml"])

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and f"{prefix}{k}" not in CONTRACT_KEYS:
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    keys = dict(flat(config))
    assert set(keys) <= CONTRACT_KEYS, set(keys) - CONTRACT_KEYS
    assert set(sets) <= CONTRACT_KEYS
    settings = {**keys, **sets}
    services = k8s_objects("Service")
    assert settings["teacher.urls"] == [f"http://ddk-teacher:{services['ddk-teacher']['spec']['ports'][0]['port']}"]
    assert settings["controller.url"] == f"http://ddk-controller:{services['ddk-controller']['spec']['ports'][0]['port']}"
    assert settings["ray.address"] == "auto" and settings["ray.use_gpu"] is True
    groups = job["rayClusterSpec"]["workerGroupSpecs"]
    gpu_workers = sum(g["replicas"] * g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
                      for g in groups)
    assert settings["ray.num_workers"] == gpu_workers, "one GPU per Ray Train worker"
    head = job["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus") == "0"
    ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert {RAY_GCS_PORT, RAY_DASHBOARD_PORT} <= ports
    for group in groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert settings["output_dir"].startswith("/outputs/")


def _validate_train_config(raw: dict, overrides: dict) -> None:
    """The trainer's own schema (unknown keys and bad values are errors) on config + --set values."""
    config = pytest.importorskip("ddk.trainer.config")
    raw = json.loads(json.dumps(raw))
    for key, value in overrides.items():
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    config.validate_config(raw)


def test_deployed_train_settings_pass_the_trainers_validation():
    # Kubernetes: the ConfigMap's config with the RayJob's --set values
    job = k8s_objects("RayJob")["ddk-train"]["spec"]
    cm = yaml.safe_load(k8s_objects("ConfigMap")["ddk-train-config"]["data"]["train.yaml"])
    _validate_train_config(cm, set_keys(ddk_after(shlex.split(job["entrypoint"]))))
    # compose: the user's train.yaml (a minimal one here) with the `train` service's --set values
    minimal = {"run_id": "x", "student": {"model": "/workspace/student"}, "data": {"file": "/workspace/data.yaml"},
               "train": {"steps": 10}}
    _validate_train_config(minimal, set_keys(ddk_after(compose()["services"]["train"]["command"])))
    # and the check can fail
    from ddk.errors import UsageError

    with pytest.raises(UsageError):
        _validate_train_config(cm, {"ray.num_wrokers": 2})


def test_kustomize_renders_everything_into_one_namespace():
    exe = shutil.which("kubectl")
    if exe is None:
        pytest.skip("kubectl not installed")
    out = subprocess.run([exe, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    expected = sum(len([d for d in yaml.safe_load_all((K8S / f).read_text()) if d]) for f in listed)
    assert len(rendered) == expected
    for d in rendered:
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "ddk", d["metadata"]["name"]
    assert "secret.yaml" not in listed  # never overwrite the real token with the placeholder


# ----------------------------------------------------------------------------- docs/deploy.md's code blocks
# No test parses README prose: the deploy commands live in the fenced code blocks of docs/deploy.md, and only
# those blocks are read here.

DEPLOY_DOC = REPO / "docs" / "deploy.md"


def docs_deploy_blocks(lang: str | None = None) -> list[str]:
    """The fenced code blocks of docs/deploy.md (only those of language ``lang`` when given)."""
    text = DEPLOY_DOC.read_text()
    return [body for tag, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M) if lang in (None, tag)]


def docs_deploy_commands() -> list[list[str]]:
    """The simple commands of the page's bash blocks: continuations joined, comments dropped,
    split at && ; | &, leading VAR=value assignments removed."""
    commands = []
    for block in docs_deploy_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            lex = shlex.shlex(line, posix=True, punctuation_chars=True)
            lex.whitespace_split = True
            words = []
            for token in [*lex, ";"]:
                if token in (";", "&&", "||", "|", "&"):
                    while words and re.fullmatch(r"\w+=.*", words[0]):
                        words.pop(0)
                    if words:
                        commands.append(words)
                    words = []
                else:
                    words.append(token)
    return commands


def test_docs_deploy_files_exist():
    blocks = "\n".join(docs_deploy_blocks())
    paths = set(re.findall(r"(?<![\w/.-])((?:deploy|scripts)/[\w./-]*\w|docker-compose\.yml|\.env\.example)", blocks))
    assert {"docker-compose.yml", ".env.example", "deploy/ray/cluster.yaml", "deploy/ray/submit.sh",
            "deploy/k8s"} <= paths
    for path in paths:
        assert (REPO / path).exists(), f"docs/deploy.md's code blocks name {path}, which does not exist"


def test_docs_deploy_commands_match_the_real_clis_and_files():
    """Every ray, ddk, submit.sh, docker run, make, kubectl and curl command of docs/deploy.md's bash blocks."""
    from ddk.controller.app import create_app

    commands = docs_deploy_commands()
    kinds = {w[0] for w in commands}
    assert {"ray", "deploy/ray/submit.sh", "docker", "kubectl", "curl", "make"} <= kinds, kinds
    compose_images = {s["image"] for s in compose()["services"].values()}
    k8s_names = {d["metadata"]["name"] for d in k8s_docs()}
    makefile = (REPO / "Makefile").read_text()
    with tempfile.TemporaryDirectory() as tmp:
        routes = [r.path for r in create_app(Path(tmp) / "c.sqlite").routes]
    minimal = {"run_id": "x", "student": {"model": "/workspace/student"}, "data": {"file": "/workspace/data.yaml"},
               "train": {"steps": 10}}
    checked = 0
    for words in commands:
        name, args = words[0], words[1:]
        if name == "ray":
            parse_ray(args)
        elif name == "ddk":
            parse_ddk(args)
        elif name == "deploy/ray/submit.sh":  # what the script runs: ddk train CONFIG --set ray.address=auto ...
            sets = set_keys(["train", args[0], "--set", "ray.address=auto", *args[1:]])
            assert set(sets) <= CONTRACT_KEYS, set(sets) - CONTRACT_KEYS
            _validate_train_config(minimal, sets)
        elif name == "docker" and args[0] == "run":
            (image,) = [w for w in args if re.match(r"ddk/\w+:", w)]
            assert image in compose_images, f"{image}: not an image docker-compose.yml builds"
            rest = args[args.index(image) + 1:]
            if rest:  # arguments to the image's ENTRYPOINT, `ddk`
                parse_ddk(rest)
        elif name == "make":
            for target in args:
                assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"no `make {target}`"
        elif name == "kubectl":
            for word in args:
                for ref in re.findall(r"(?:^|[/=])(ddk-[a-z-]+)$", word):
                    assert ref in k8s_names, f"kubectl names {ref}, which deploy/k8s does not define"
        elif name == "curl":
            (url,) = [w for w in args if w.startswith("http")]
            path = re.sub(r"^https?://[^/]+", "", url)
            assert any(re.fullmatch(re.sub(r"\{\w+\}", "[^/]+", r), path) for r in routes), f"no controller route {path}"
            assert port_of(url) == CONTROLLER_PORT
            assert path.split("/")[3] == env_example()["RUN_ID"], "the compose run's id"
        else:
            continue
        checked += 1
    assert checked >= 10


# ----------------------------------------------------------------------------- deploy/compose.routes.yml

def test_compose_routes_override_adds_a_routed_teacher():
    """The two-teacher compose example: its teacher command parses and binds all interfaces on its own port and
    GPU, and its train command routes math there, a route the train config accepts."""
    from ddk.trainer.config import TeacherSection

    base = compose()["services"]
    extra = yaml.safe_load(substitute((DEPLOY / "compose.routes.yml").read_text(), env_example()))["services"]
    t = parse_ddk(extra["teacher-math"]["command"])
    assert t.command == "teacher" and t.host == "0.0.0.0" and t.port == 8101 != TEACHER_PORT
    assert extra["teacher-math"]["ports"] == ["8101:8101"]
    gpus = [s["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
            for s in (base["teacher"], extra["teacher-math"])]
    assert gpus[0] != gpus[1]
    sets = set_keys(ddk_after(extra["train"]["command"]))
    assert set(sets) - {"teacher.routes"} <= CONTRACT_KEYS
    routes = TeacherSection(urls=sets["teacher.urls"], routes=sets["teacher.routes"]).routes
    assert routes == {"math": ["http://teacher-math:8101"]}
    # the override keeps the base's train settings: same --set keys apart from the route
    assert set(set_keys(ddk_after(base["train"]["command"]))) == set(sets) - {"teacher.routes"}
    assert "teacher-math" in extra["train"]["depends_on"]
