#!/usr/bin/env bash
# The GPU check (issues 12 and 30), one command from the repository root, made for the lent GPU machine: one H100
# or H200, Python 3.12 whose python3 holds torch, transformers, numpy, httpx, ... but no pydantic, FastAPI,
# uvicorn, Ray or vLLM, nothing to fetch, at most 8 files back from $OUT. No install of ddk is needed: `ddk` is a
# link to services/ in a temporary folder on PYTHONPATH. The wheels the service path needs (bench/device/wheels.txt)
# come from the folder $WHEELS (default bench/device/wheels; fill it here with bench/device/fetch_wheels.sh and
# carry it) and are installed with --no-index into that temporary folder unless python already imports them.
#
# Five parts, each in its own process with its own time limit; each goes on past a failing one, and says why it
# failed in one line. Each writes $OUT/PART.json; everything printed goes to $OUT/gpu.log (lines 'PART| ...'),
# and $OUT/summary.json says which passed: 7 files.
#   student  bench/gpu_student.py: the student step at Llama-3.2-1B's shape, bf16, FSDP2 on one GPU, chunked loss:
#            tokens/s and MFU (target >= 40 %), the plain loss beside it
#   eval     bench/gpu_eval.py: one evaluation batch at vocabulary 128,256: peak memory, chunked vs full logits
#   teacher  bench/gpu_teacher.py: the transformers teacher engine (HFEngine), top-k 16, in-process and through
#            `ddk teacher serve` on uvicorn (loopback): prefill tokens/s, MFU, their ratio
#   rollout  bench/gpu_rollout.py: student rollouts with transformers generate: new tokens/s
#   fsdp     bench/fsdp_check.py: FSDP2 on NCCL: sharded vs unsharded, bf16, save, resume, export
# vLLM cannot travel (its wheels are far over the 64 MiB a run may carry): it is not measured, and the log says so.
#
#   bench/gpu.sh [--dry-run] [--only PART[,PART...]]
# --dry-run: every part on the CPU at tiny shapes, the same code paths (bench/gpu_common.py's Target is the one
# switch) and the same files; what tests/unit/test_gpu_dryrun.py runs. OUT defaults to a new temporary folder.
# PY: the python (default .venv/bin/python where it exists, else python3); STUDENT_ARGS, EVAL_ARGS, TEACHER_ARGS,
# ROLLOUT_ARGS, FSDP_ARGS: more options for one part (its --help). Exit 0 when every part passed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
PARTS="student eval teacher rollout fsdp"
DRY=0
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only) ONLY=${2:-}; [ -n "$ONLY" ] || { echo "gpu.sh: --only needs PART[,PART...] ($PARTS)" >&2; exit 2; }; shift ;;
    --only=*) ONLY=${1#--only=} ;;
    -h|--help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu.sh: unknown argument '$1' (--dry-run, --only PART[,PART...])" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "$ONLY" ]; then
  for p in ${ONLY//,/ }; do
    case " $PARTS " in *" $p "*) ;; *) echo "gpu.sh: --only: unknown part '$p' ($PARTS)" >&2; exit 2 ;; esac
  done
  PARTS=${ONLY//,/ }
fi
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/ddk-gpu-check-XXXXXX")}
mkdir -p "$OUT" || { echo "gpu.sh: cannot create OUT=$OUT" >&2; exit 2; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ddk-gpu-work-XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ln -s "$REPO/services" "$WORK/ddk"   # `import ddk` without an install
export PYTHONPATH="$WORK:$REPO/bench${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 \
  TRANSFORMERS_VERBOSITY=error PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
LOG="$OUT/gpu.log"
: >"$LOG"
say() { echo "$1| $2" | tee -a "$LOG"; }
t_start=$SECONDS
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
say gpu.sh "$(date -u +%Y-%m-%dT%H:%M:%SZ) commit $commit; $([ $DRY = 1 ] && echo 'DRY RUN on the CPU, tiny shapes' || echo 'on the GPU'); python $PY; OUT $OUT; parts: $PARTS"

# -- the wheels the service path needs ------------------------------------------------------------------------
WHEELS=${WHEELS:-bench/device/wheels}
if "$PY" -c "import fastapi, uvicorn, pydantic" 2>/dev/null; then
  wheels="fastapi, uvicorn and pydantic already import in $PY: no wheel installed"
else
  files=()
  missing=()
  while read -r pin; do
    pin=${pin%%#*}; pin=$(echo "$pin" | tr -d '[:space:]')
    [ -n "$pin" ] || continue
    name=${pin%%==*}; ver=${pin#*==}
    f=$(ls "$WHEELS"/"${name//-/_}"-"$ver"-*.whl 2>/dev/null | head -1)
    if [ -n "$f" ]; then files+=("$f"); else missing+=("$pin"); fi
  done <bench/device/wheels.txt
  if [ ${#missing[@]} -gt 0 ]; then
    wheels="not installed: $WHEELS lacks ${missing[*]} (fill it with bench/device/fetch_wheels.sh and carry it); the teacher part will fail"
  elif "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "${files[@]}" \
      >"$WORK/pip.log" 2>&1; then
    export PYTHONPATH="$WORK/site:$PYTHONPATH"
    wheels="installed ${#files[@]} wheels from $WHEELS (--no-index --no-deps) into a temporary folder on PYTHONPATH"
  else
    wheels="install from $WHEELS failed: $(grep -v '^\s*$' "$WORK/pip.log" | tail -1)"
  fi
fi
say wheels "$wheels"
say vllm "not measured: vLLM's wheels (with the CUDA libraries they pull) are far over the 64 MiB a run may carry, and nothing can be fetched on the GPU machine"

gpu=""
if [ $DRY = 1 ]; then
  dry=--dry-run
else
  dry=""
  gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)
  say nvidia-smi "$gpu"
fi

# -- the parts: each with its own limit (about 7 minutes in all on an H100, at most) ----------------------------
rcs=()
for part in $PARTS; do
  case $part in
    student) script=bench/gpu_student.py; limit=120 ;;
    eval)    script=bench/gpu_eval.py;    limit=60 ;;
    teacher) script=bench/gpu_teacher.py; limit=120 ;;
    rollout) script=bench/gpu_rollout.py; limit=90 ;;
    fsdp)    script=bench/fsdp_check.py;  limit=60 ;;
  esac
  var="$(echo "$part" | tr '[:lower:]' '[:upper:]')_ARGS"   # e.g. STUDENT_ARGS="--batch 4" for a rerun
  extra=${!var:-}
  rm -f "$OUT/$part.json"
  say gpu.sh "part $part: $script $dry $extra (limit $limit s)"
  # shellcheck disable=SC2086
  timeout -k 10 "$limit" "$PY" "$script" $dry $extra --json "$OUT/$part.json" 2>&1 | sed -u "s/^/$part| /" | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && say gpu.sh "part $part: stopped at its limit of $limit s"
  rcs+=("$part=$rc")
done

"$PY" bench/gpu_common.py summarize "$OUT" "${rcs[@]}" --log "$LOG" $dry --gpu "$gpu" --wheels "$wheels" \
  --commit "$commit" --wall-s $((SECONDS - t_start)) 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
echo "gpu.sh: results in $OUT ($(ls "$OUT" | wc -l) files), $((SECONDS - t_start)) s"
exit "$rc"
