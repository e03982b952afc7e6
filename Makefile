# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The library alone: all the demo needs.
$(VENV)/.installed-base: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	touch $@

# With the test extras: pytest, the interop clients, the fuzzer, mypy, ruff.
$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

install: $(VENV)/.installed-test

# The chat server on embedded defaults with three scripted clients on loopback.
demo: $(VENV)/.installed-base
	$(BIN)/python examples/demo.py

lint: $(VENV)/.installed-test
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

# The suite runs twice: once on the per-datagram fast path (direct OpenSSL
# calls), once on pyOpenSSL's public calls, its fallback: both must pass alike.
test: lint
	$(BIN)/pytest
	TRIO_DTLS_SERVER_FAST_PATH=0 $(BIN)/pytest -q

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
