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

setup: $(VENV)/.runtime-installed
test-setup: $(VENV)/.test-installed

# Debian's oneDNN: Jittor's own oneDNN download is unreachable offline (see jittor_env.py).
# Without root or apt, Jittor still works, on slower matmul kernels, and says so.
system-deps:
	@if [ ! -e /usr/include/dnnl.h ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing libdnnl-dev (oneDNN for Jittor's CPU matmuls)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libdnnl-dev >/dev/null; \
	  else \
	    echo "warning: oneDNN missing and apt-get unavailable: run 'sudo apt-get install libdnnl-dev' for fast CPU matmuls"; \
	  fi; \
	fi

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime-installed: requirements.txt | $(VENV)/bin/python
	@$(MAKE) --no-print-directory system-deps
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.test-installed: requirements.txt requirements-test.txt | $(VENV)/bin/python
	@$(MAKE) --no-print-directory system-deps
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-test.txt
	touch $@ $(VENV)/.runtime-installed

clean:
	rm -rf $(VENV) .pytest_cache
