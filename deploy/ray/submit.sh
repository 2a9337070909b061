#!/usr/bin/env bash
# Submit a ddk distillation to a running Ray cluster as a Ray Job, and follow its logs.
#
#   RAY_ADDRESS=http://HEAD:8265 deploy/ray/submit.sh CONFIG.yaml [--set key=value ...]
#
# RAY_ADDRESS is the head's dashboard (Ray Jobs API, port 8265). The checkout's code ships with the job:
# the package `ddk` (the folder services/ of this repository, staged under its import name) goes as a
# Ray `py_modules` entry, which Ray puts first on every node's path, so local changes take effect on
# every node whatever ddk the nodes' images have installed. The current directory is uploaded as the
# job's working directory (Ray honours .gitignore; set DDK_WORKING_DIR to upload another), so CONFIG may
# be a path inside it, or an absolute path on the cluster (e.g. /workspace/train.yaml). Inside the job,
# the trainer joins the cluster (ray.address=auto) instead of starting Ray.
# Exits 1 if the job fails. Extra runtime-env entries (merged into the one this script builds):
# DDK_RUNTIME_ENV_JSON, e.g. '{"env_vars": {"HF_HOME": "/cache"}}'. Extra `ray job submit` options:
# DDK_SUBMIT_ARGS (e.g. "--no-wait").
set -euo pipefail
: "${RAY_ADDRESS:?set RAY_ADDRESS to the Ray head dashboard, e.g. http://127.0.0.1:8265}"
if [ $# -lt 1 ]; then
  echo "usage: RAY_ADDRESS=http://HEAD:8265 $0 CONFIG.yaml [--set key=value ...]" >&2
  exit 2
fi
CONFIG=$1
shift
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-python3}

STAGE=$(mktemp -d "${TMPDIR:-/tmp}/ddk-submit-XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
# the code under its import name, without bytecode
cp -r "$REPO/services" "$STAGE/ddk"
find "$STAGE/ddk" -name __pycache__ -type d -prune -exec rm -rf {} +
RUNTIME_ENV=$("$PY" - "$STAGE/ddk" "${DDK_RUNTIME_ENV_JSON:-}" <<'PYEOF'
import json, sys
env = json.loads(sys.argv[2]) if sys.argv[2] else {}
env["py_modules"] = [sys.argv[1], *env.get("py_modules", [])]
print(json.dumps(env, separators=(",", ":")))
PYEOF
)
# shellcheck disable=SC2086  # DDK_SUBMIT_ARGS is a list of options
ray job submit --address "$RAY_ADDRESS" --working-dir "${DDK_WORKING_DIR:-.}" \
  --runtime-env-json "$RUNTIME_ENV" ${DDK_SUBMIT_ARGS:-} \
  -- ddk train "$CONFIG" --set ray.address=auto "$@"
