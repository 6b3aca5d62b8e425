# Two commands for a newcomer:
#   make demo   set everything up, then run the embedded offline demo
#   make test   set everything up for the tests, then run the whole suite (what CI runs)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test setup test-setup system-deps clean

demo: setup
	$(BIN)/python train_default_lora.py --demo

test: test-setup
	$(BIN)/python -m pytest

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
