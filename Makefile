# Two commands do all the set-up on a fresh Debian machine: `make demo` and `make test`.
# Each installs what it lacks: apt packages only when missing, a .venv, the project (editable).
SHELL := /bin/bash
# Always the real interpreter, never a shim on PATH (a pyenv shim costs 40 ms per start).
PYTHON ?= $(shell python3 -c 'import sys; print(sys.executable)')
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_PACKAGES := libcap-dev bubblewrap strace util-linux
UNPRIV_USER ?= nobody

.PHONY: all setup demo test test-root test-unpriv bench bench-quick doctor clean

all: test

setup: $(STAMP)

$(STAMP): pyproject.toml
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "apt: installing$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,http,examples]'
	@chmod -R a+rX $(VENV) . 2>/dev/null || true
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: test-root test-unpriv

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
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
