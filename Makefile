# Two commands do all the set-up on a fresh machine:
#   make demo   the whole pipeline on the built-in tiny model, offline, on loopback
#   make test   the test suite
# Both create .venv when it is missing and skip pip when it is current.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.provision-installed
# The CPU build of torch that lies on this machine's disk; an unpinned torch pulls GBs of CUDA.
TORCH_PIN ?= torch==2.13.0

.PHONY: venv demo test test-vllm test-fast lint typecheck bench clean mutate mutate-report

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m provision.cli.demo

test: $(STAMP)
	$(PY) -m pytest -q

# the vLLM smoke tests alone (they need provision[vllm]; README "Judging with vLLM")
test-vllm: $(STAMP)
	$(PY) -m pytest -q -m vllm

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not interop and not netns and not parity"

lint: $(STAMP)
	$(VENV)/bin/ruff check provision tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) benchmarks/verify_hash.py

# Mutation testing of the core modules listed in pyproject.toml [tool.mutmut] (slow; not in CI).
# Starts from a fresh mutants/ copy; one child process so it leaves the other cores free.
# MUTANTS narrows it to one module, e.g. make mutate MUTANTS='provision.quant.*'
MUTANTS ?=
MUTATE_CHILDREN ?= 1
mutate: $(STAMP)
	$(PY) -c "import mutmut" 2>/dev/null || $(PY) -m pip install -q -e ".[test,mutate]"
	rm -rf mutants && mkdir mutants && ln -s provision/data/manifests mutants/manifests
	CI=true $(VENV)/bin/mutmut run --max-children $(MUTATE_CHILDREN) $(MUTANTS)
	$(PY) benchmarks/mutation_report.py

mutate-report:
	$(PY) benchmarks/mutation_report.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
