# Two commands do all the set-up on a fresh Debian machine: `make demo` and `make test`.
# Each installs what it lacks: apt packages only when missing, a .venv, the project (editable).
SHELL := /bin/bash
# Always the real interpreter, never a shim on PATH (a pyenv shim costs 40 ms per start).
PYTHON ?= $(shell python3 -c 'import sys; print(sys.executable)')
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# libseccomp2: every policy is compiled with it; gcc + libcap-dev: python-prctl builds from source;
# redis-server: the broker of the Celery integration's test; the rest: tests and benchmarks.
APT_PACKAGES := libseccomp2 gcc libcap-dev bubblewrap strace util-linux redis-server
EXTRAS := test,http,examples,lint,metrics,celery,recipes,real-code
UNPRIV_USER ?= nobody

.PHONY: all setup demo test test-root test-unpriv lint bench bench-quick doctor clean

all: test

setup: $(STAMP)

$(STAMP): pyproject.toml
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "apt: installing$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[$(EXTRAS)]'
	@chmod -R a+rX $(VENV) . 2>/dev/null || true
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: test-root test-unpriv

lint: $(STAMP)
	$(VENV)/bin/ruff check sandbox tests benchmarks examples
	$(VENV)/bin/mypy sandbox

test-root: $(STAMP)
	$(PY) -m pytest

# The unprivileged mode: the same library, run by a user who is not root.
test-unpriv: $(STAMP)
	@if [ "$$(id -u)" = 0 ]; then \
	  UNPRIV_USER=$(UNPRIV_USER) $(PY) tests/unpriv_runner.py tests; \
	else echo "test-unpriv: already unprivileged, covered by test-root"; fi

bench: $(STAMP)
	$(PY) -m benchmarks --json bench-full.json

bench-quick: $(STAMP)
	$(PY) -m benchmarks --quick --json bench-quick.json

doctor: $(STAMP)
	$(PY) -m sandbox doctor

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis .mypy_cache .ruff_cache
