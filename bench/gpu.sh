#!/usr/bin/env bash
# The one prepared GPU check (issue 12): at most ~8 minutes on one H200.
#   1. the student step at a Llama-3.2-1B shape in bf16 with FSDP2 on 1 GPU and the chunked loss: tokens/s, MFU
#      (bench/gpu_student.py; target MFU >= 40% of the card's bf16 peak), and the plain loss beside it;
#   2. FSDP2 on NCCL: sharded vs unsharded, bf16, resume, export (bench/fsdp_check.py);
#   3. the teacher rows of bench/teacher.py --gpu (a random 1.2B Llama in bf16, both engines).
# Results as JSON (and the printed logs) under $OUT when it is set; the script goes on past a failing part.
# Run from the repository root on a machine with the project installed (bash scripts/setup.sh, or pip install -e .).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
rc=0
timeout 240 "$PY" bench/gpu_student.py --plain --json "$OUT/student.json" 2>&1 | tee "$OUT/student.log" || rc=1
timeout 120 "$PY" bench/fsdp_check.py 2>&1 | tee "$OUT/fsdp_check.log" || rc=1
timeout 180 "$PY" bench/teacher.py --gpu --gpu-batch 64 --gpu-seq 1024 2>&1 | tee "$OUT/teacher.log" || rc=1
echo "results in $OUT"
exit $rc
