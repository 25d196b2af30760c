# Fresh machine: `make demo` runs the demo, `make test` runs the tests. Each sets itself up:
# a .venv, torch==2.13.0 first when no torch is importable (pinned, so no CUDA build is pulled in),
# then the package with its test extras, building pllava_fast._C.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.pllava-fast-installed
PYTEST_ARGS ?=

.PHONY: setup demo test bench check-cuda clean

$(STAMP): setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*.cuh)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install "setuptools>=64" wheel ninja
	$(PIP) install --no-build-isolation -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pllava-fast demo

test: $(STAMP)
	$(PY) -m pytest -n 2 -q $(PYTEST_ARGS) tests

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-only -q

# Compile-check the CUDA kernel translation unit (no torch headers in it) on machines without a GPU.
check-cuda:
	@if command -v nvcc >/dev/null 2>&1 && ls csrc/*_kernel.cu >/dev/null 2>&1; then \
	  for f in csrc/*_kernel.cu; do \
	    nvcc -std=c++17 -Icsrc -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
	      -c $$f -o /tmp/$$(basename $$f).o && echo "nvcc ok: $$f (sm_80, sm_90)"; \
	  done; \
	else echo "check-cuda: no nvcc or no csrc/*_kernel.cu; skipped"; fi

clean:
	rm -rf $(VENV) build *.egg-info pllava_fast/_C*.so
