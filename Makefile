# Two commands for a newcomer:
#   make demo   set everything up, then run the embedded offline demo
#   make test   set everything up for the tests, then run the whole suite (what CI runs)
# On a GPU:
#   make gpu-check              Jittor against transformers + PEFT on the GPU (runs/gpu_check_cuda.json + .md)
#   make gpu-check DEVICE=cpu   the same script with a tiny model on the CPU (the suite runs it too)
#   make gpu-bundle             .gpu/ for a GPU machine without internet: then `bash tools/gpu_machine.sh run` there
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEVICE ?= cuda

.PHONY: demo test setup test-setup system-deps clean gpu-check gpu-bundle

demo: setup
	$(BIN)/python train_default_lora.py --demo

test: test-setup
	$(BIN)/python -m pytest

gpu-check: test-setup
	$(BIN)/python gpu_check.py --device $(DEVICE) --out runs/gpu_check_$(DEVICE).json

gpu-bundle: test-setup
	bash tools/gpu_machine.sh bundle

setup: system-deps $(VENV)/.runtime-installed
test-setup: system-deps $(VENV)/.test-installed

# Debian packages: oneDNN, as Jittor's own oneDNN download is unreachable offline (see
# backend/jittor_env.py), and OpenMPI (mpirun, and mpicc, with which Jittor compiles its MPI
# operators) for training in several processes (README: MPI). Without root or apt,
# Jittor still works, on slower matmul kernels and in one process, and says so.
system-deps:
	@missing=""; \
	[ -e /usr/include/dnnl.h ] || missing="$$missing libdnnl-dev"; \
	{ command -v mpirun && command -v mpicc; } >/dev/null || missing="$$missing openmpi-bin libopenmpi-dev"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing (oneDNN for Jittor's CPU matmuls, OpenMPI for mpirun)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "warning: missing$$missing (not root, or no apt-get): run 'sudo apt-get install$$missing'" \
	         "(oneDNN: fast CPU matmuls; OpenMPI: training in several processes and its tests)"; \
	  fi; \
	fi

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# the ranges of requirements*.txt, at the exact versions the suite passes with (constraints.txt)
$(VENV)/.runtime-installed: requirements.txt constraints.txt | $(VENV)/bin/python
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt -c constraints.txt
	touch $@

$(VENV)/.test-installed: requirements.txt requirements-test.txt constraints.txt | $(VENV)/bin/python
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-test.txt -c constraints.txt
	touch $@ $(VENV)/.runtime-installed

clean:
	rm -rf $(VENV) .pytest_cache

# --- Jittor on CUDA without a GPU (docs/gpu.md). Not part of `make test`: the first run downloads
# CUDA 13.0's compiler, headers, cuBLAS and cuRAND from the package index (about 525 MB, cached in
# .gpu-rehearsal/, ignored by git), installs Jittor 1.3.11 there, applies tools/jittor_cuda_fix.py
# and compiles Jittor's core, its cuBLAS / cuRAND / cub operators and its softmax kernels with nvcc.
.PHONY: gpu-rehearsal gpu-rehearsal-cu12 gpu-rehearsal-stock
gpu-rehearsal: test-setup
	$(BIN)/python tools/gpu_rehearsal.py --cuda 13
gpu-rehearsal-stock: test-setup   # stock Jittor with CUDA 13: where it fails
	$(BIN)/python tools/gpu_rehearsal.py --cuda 13 --no-fix
gpu-rehearsal-cu12: test-setup    # CUDA 12.9's wheels: headers only (the index has no CUDA 12 nvcc)
	$(BIN)/python tools/gpu_rehearsal.py --cuda 12
