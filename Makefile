# The two commands of the README: `make demo` and `make test`. Both create/reuse .venv/.
.PHONY: setup demo test test-fast kit clean

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/ddk demo --quick

# PYTHONDONTWRITEBYTECODE unset: the ~80 processes a run starts (and both xdist workers' assertion rewriting of the
# tests) reuse the checkout's compiled files instead of compiling ddk and the tests again each (docs/tests.md)
test:
	bash scripts/setup.sh --test
	env -u PYTHONDONTWRITEBYTECODE DDK_REQUIRE_EVAL=1 .venv/bin/python -m pytest -q --durations=20 -n 2 --dist loadfile --no-loadscope-reorder

test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow"

kit: setup
	.venv/bin/ddk fixtures --out ddk-kit

clean:
	rm -rf .venv .venv-eval .venv-eval.log .cache ddk-demo ddk-kit
