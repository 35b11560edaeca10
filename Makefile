# The two set-up commands of the README: `make demo` (main job) and `make test` (tests).
# Both create .venv and install what they need; reruns only reinstall when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: install test test-fast demo bench models clean-cache

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[cpu,export,dev,chat,server,hub]' 2>&1 | grep -v '^WARNING: Location' || true
	$(BIN)/python -c "import onnxpipe, onnxpipe.export, pytest"
	rm -f $(VENV)/.installed-*
	touch $@

# pytest exits 5 when it collects no test: make fails on any non-zero exit, so "no tests" is not a pass.
test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# HF_HUB_OFFLINE: the demo shows the built-in defaults; tasks without one say so instead of asking the Hub
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m onnxpipe.demo

models: $(STAMP)
	$(BIN)/onnxpipe build

bench: $(STAMP)
	$(BIN)/python -m bench

clean-cache:
	rm -rf .cache
