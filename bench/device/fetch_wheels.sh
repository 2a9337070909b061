#!/usr/bin/env bash
# Fetch the wheels pinned in bench/device/wheels.txt for the GPU machine (CPython 3.12, manylinux x86-64), each
# without its dependencies (the list names every one the machine lacks), into DIR (default bench/device/wheels,
# ignored by git). Then carry DIR to the machine: `bench/gpu.sh` installs them from there with --no-index.
#   bench/device/fetch_wheels.sh [DIR] [--python-version 3.11]   (another version: the suite's clean-venv test)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=$here/wheels
pyver=3.12
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) pyver=${2:-}; [ -n "$pyver" ] || { echo "fetch_wheels: --python-version needs a value" >&2; exit 2; }; shift ;;
    -*) echo "fetch_wheels: unknown option '$1' ([DIR] [--python-version X.Y])" >&2; exit 2 ;;
    *) dir=$1 ;;
  esac
  shift
done
PY=${PY:-python3}
reqs=$(grep -v '^\s*#' "$here/wheels.txt" | grep -v '^\s*$')
mkdir -p "$dir"
# pip matches each manylinux tag exactly: name the ones a current x86-64 wheel may carry
"$PY" -m pip download -q --timeout 20 --retries 2 --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_31_x86_64 \
  --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64 --platform manylinux1_x86_64 \
  -d "$dir" $reqs
n=$(ls "$dir"/*.whl | wc -l)
want=$(echo "$reqs" | wc -l)
total=$(du -cb "$dir"/*.whl | tail -1 | cut -f1)
echo "fetch_wheels: $n wheels ($want pinned) in $dir, $((total / 1024)) KiB in all (limit 48 MiB)"
[ "$n" -eq "$want" ] || { echo "fetch_wheels: $dir holds $n wheels, expected $want (one per pin): remove the stale ones" >&2; exit 1; }
[ "$total" -le $((48 * 1024 * 1024)) ] || { echo "fetch_wheels: over 48 MiB" >&2; exit 1; }
