# The two commands of the README:
#   make demo   create .venv, install torch and vae_ext (with its build), run the demo
#   make test   the same setup, then the whole test suite
# Other targets: make bench (pytest-benchmark suite), make build (incremental in-place build), make clean,
#   make gpu-check (the one command for a lent GPU: tools/gpu_check.py; a dry run without one),
#   make emu-counters, make cuda-resources (reports of the CUDA kernels made without a GPU).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
DEPS := ninja numpy pytest pytest-benchmark scipy expecttest scikit-learn tqdm matplotlib
# Oracles of the integration tests (torchvision pinned to the build that matches TORCH_SPEC).
DEPS += diffusers transformers timm safetensors pillow torchvision==0.29.1
DEPS_STAMP := $(VENV)/.deps-stamp
BUILD_STAMP := $(VENV)/.build-stamp
SOURCES := $(shell find csrc -type f) setup.py pyproject.toml

.PHONY: demo test bench build clean gpu-check emu-counters cuda-resources

$(DEPS_STAMP): Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet $(DEPS)
	touch $@

# pip builds the extension (CPU kernels, plus CUDA kernels where torch has CUDA and nvcc is found).
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

demo: $(BUILD_STAMP)
	$(PY) -m vae_ext demo

test: $(BUILD_STAMP)
	$(PY) -m pytest tests

bench: $(BUILD_STAMP)
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-json=benchmarks/results/last-run.json

# Incremental rebuild for development (ninja recompiles only what changed).
build: $(DEPS_STAMP)
	$(PY) setup.py build_ext --inplace

# On the GPU machine: its own python3 (no venv, nothing installed); here: a dry run in the venv.
gpu-check:
	@if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
		python3 tools/gpu_check.py; \
	else \
		$(MAKE) --no-print-directory $(DEPS_STAMP) && $(PY) tools/gpu_check.py --dry-run; \
	fi

emu-counters: $(DEPS_STAMP)
	$(PY) tools/emu_counters.py

cuda-resources: $(DEPS_STAMP)
	$(PY) tools/cuda_resources.py

clean:
	rm -rf build vae_ext/_C*.so $(BUILD_STAMP)
