# Fresh machine: `make demo` runs the demo, `make test` runs the tests. Each sets itself up:
# a .venv, torch==2.13.0 first when no torch is importable (pinned, so no second torch is pulled
# in), then the package (the demo: its runtime dependencies only; the tests: plus the test
# extras), building pllava_fast._C.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
BASE := $(VENV)/.pllava-fast-base
TESTS := $(VENV)/.pllava-fast-test
PYTEST_ARGS ?=

.PHONY: setup demo test bench check-cuda check-cuda-glue gpu-check clean

$(BASE): setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*.cuh csrc/*.cu)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install "setuptools>=64" wheel ninja
	$(PIP) install --no-build-isolation -e .
	touch $(BASE)

$(TESTS): $(BASE)
	$(PIP) install --no-build-isolation -e ".[test]"
	touch $(TESTS)

setup: $(TESTS)

demo: $(BASE)
	$(VENV)/bin/pllava-fast demo

test: $(TESTS)
	$(PY) -m pytest -n 2 -q $(PYTEST_ARGS) tests

bench: $(TESTS)
	$(PY) -m pytest benchmarks --benchmark-only -q

# Compile-check the CUDA kernel translation unit (no torch headers in it) on machines without a GPU.
check-cuda:
	@if command -v nvcc >/dev/null 2>&1 && ls csrc/*_kernel.cu >/dev/null 2>&1; then \
	  for f in csrc/*_kernel.cu; do \
	    nvcc -std=c++17 -Icsrc -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
	      -c $$f -o /tmp/$$(basename $$f).o || exit 1; echo "nvcc ok: $$f (sm_80, sm_90)"; \
	  done; \
	else echo "check-cuda: no nvcc or no csrc/*_kernel.cu; skipped"; fi

# Syntax-check the torch side of the CUDA build (g++ -fsyntax-only with PLLAVA_FAST_WITH_CUDA).
check-cuda-glue: $(BASE)
	bash .ci/check-cuda-glue.sh $(PY)

# On one H100/H200: build the CUDA extension, run the cuda-marked tests and every benchmark with
# --device cuda at reduced repeats; results JSON named with the device (benchmarks/gpu_check.sh).
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info pllava_fast/_C*.so
