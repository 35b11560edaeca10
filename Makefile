# The two set-up commands of the README: `make demo` (main job) and `make test` (tests).
# Both create .venv and install what they need; reruns only reinstall when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: install test test-ray test-fast demo bench bench-ray models clean-cache gpu-wheels gpu-check

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[cpu,export,dev,chat,server,hub,ray]' 2>&1 | grep -v '^WARNING: Location' || true
	$(BIN)/python -c "import onnxpipe, onnxpipe.export, pytest"
	rm -f $(VENV)/.installed-*
	touch $@

# pytest exits 5 when it collects no test: make fails on any non-zero exit, so "no tests" is not a pass.
# The Ray tests (two-node local cluster) run on their own, inside a network namespace with nothing but loopback:
# Ray binds every interface and probes outside addresses at start (tests/loopback_only.sh).
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not ray" $(PYTEST_ARGS)
	tests/loopback_only.sh $(BIN)/python -m pytest -q -m ray tests/test_ray.py

test-ray: $(STAMP)
	tests/loopback_only.sh $(BIN)/python -m pytest -q -m ray tests/test_ray.py $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not ray" $(PYTEST_ARGS)

# HF_HUB_OFFLINE: the demo shows the built-in defaults; tasks without one say so instead of asking the Hub
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m onnxpipe.demo

models: $(STAMP)
	$(BIN)/onnxpipe build

bench: $(STAMP)
	$(BIN)/python -m bench

# Ray Serve replicas, Ray's per-request cost and Ray Data actors (bench/ray_scale.py), in a loopback-only namespace
bench-ray: $(STAMP)
	tests/loopback_only.sh $(BIN)/python -m bench.ray_scale

clean-cache:
	rm -rf .cache

# The CUDA check (bench/gpu_check.py, issue 23) runs on a GPU machine with no network, whose Python 3.12 has CUDA torch
# and transformers 5.x: gpu-wheels (here, online) downloads onnxruntime-gpu (the newest not above this venv's onnxruntime,
# which exported the graphs: PyPI's onnxruntime-gpu can lag a release behind) and what
# gpu-check installs, for CPython 3.12 manylinux x86_64, into .cache/gpu-wheels, and exports the tiny fp16 models it
# tests into .cache/gpu-check (carry both). gpu-check uses that machine's python3, not .venv.
GPU_WHEELS := .cache/gpu-wheels
GPU_PYTHON ?= python3

gpu-wheels: $(STAMP)
	mkdir -p $(GPU_WHEELS)
	$(BIN)/python -m pip download -q --disable-pip-version-check -d $(GPU_WHEELS) --only-binary=:all: \
		--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 "onnxruntime-gpu<=$$($(BIN)/python -c 'import onnxruntime; print(onnxruntime.__version__)')" \
		pytest onnx numpy tokenizers jinja2 "setuptools>=68" wheel
	$(BIN)/python -m bench.gpu_check --prepare

gpu-check:
	$(GPU_PYTHON) -m bench.gpu_check
