#!/usr/bin/env bash
# Submit a ddk distillation to a running Ray cluster as a Ray Job, and follow its logs.
#
#   RAY_ADDRESS=http://HEAD:8265 deploy/ray/submit.sh CONFIG.yaml [--set key=value ...]
#
# RAY_ADDRESS is the head's dashboard (Ray Jobs API, port 8265). The current directory is uploaded as
# the job's working directory (Ray honours .gitignore), so local changes to `services/` take effect on
# every node; set DDK_WORKING_DIR to upload another directory. CONFIG is read by the driver on the
# head: an absolute path on the cluster (e.g. /workspace/train.yaml) or a path inside the working
# directory. Inside the job, the trainer joins the cluster (ray.address=auto) instead of starting Ray.
# Exits 1 if the job fails. Extra `ray job submit` options: DDK_SUBMIT_ARGS (e.g. "--no-wait").
set -euo pipefail
: "${RAY_ADDRESS:?set RAY_ADDRESS to the Ray head dashboard, e.g. http://127.0.0.1:8265}"
if [ $# -lt 1 ]; then
  echo "usage: RAY_ADDRESS=http://HEAD:8265 $0 CONFIG.yaml [--set key=value ...]" >&2
  exit 2
fi
CONFIG=$1
shift
# shellcheck disable=SC2086  # DDK_SUBMIT_ARGS is a list of options
exec ray job submit --address "$RAY_ADDRESS" --working-dir "${DDK_WORKING_DIR:-.}" ${DDK_SUBMIT_ARGS:-} \
  -- ddk train "$CONFIG" --set ray.address=auto "$@"
