# retro_kernels from a fresh clone, in two commands (Python 3.10+ and a C++ compiler):
#
#   make demo    set up if needed, then the main job: python -m models demo
#   make test    set up if needed, then the whole test suite
#
# Set-up (tools/setup_env.py) makes a virtual environment in .venv with the CPU
# build of torch (torch==2.13.0+cpu; PyPI's CUDA build where nvidia-smi sees a
# GPU), installs retro_kernels editable with its [dev] extras and builds the
# native kernels. A stamp keyed on pyproject.toml, setup.py and csrc/ makes the
# next run skip all that (editing csrc/ rebuilds only the native kernels).
#
#   make test PYTHON=/path/to/python   no venv: that interpreter, keeping its torch
#                                      (a CUDA build stays; installs are pinned to it)
#   make test PYTHON=... NO_DEPS=1     ... installing nothing but retro_kernels (no package index)
#   make test PYTEST_ARGS="-x -k cpu"  arguments for pytest
#   make demo DEMO_ARGS=--quick        the same demo, small (a smoke run)
#   make info                          python -m retro_kernels: backends, and why not
#   make wheel                         dist/retro_kernels-*.whl, with the native kernels
#   make setup                         only the set-up

PYTHON ?=
BOOTSTRAP_PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= dev
PYTEST_ARGS ?=
DEMO_OUT ?= runs/demo
DEMO_ARGS ?=
NO_DEPS ?=
SETUP_FLAGS := --extras "$(EXTRAS)" $(if $(filter 1,$(NO_DEPS)),--no-deps)

ifeq ($(strip $(PYTHON)),)
PY := $(VENV)/bin/python
SETUP := $(BOOTSTRAP_PYTHON) tools/setup_env.py --venv $(VENV) $(SETUP_FLAGS)
# as if activated: the venv's tools (ninja, torchrun) come first
export PATH := $(abspath $(VENV))/bin:$(PATH)
else
PY := $(PYTHON)
SETUP := $(PYTHON) tools/setup_env.py --python $(PYTHON) $(SETUP_FLAGS)
endif

.PHONY: setup test demo info wheel

setup:
	@$(SETUP)

test: setup
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

demo: setup
	$(PY) -m models demo --out $(DEMO_OUT) $(DEMO_ARGS)

info: setup
	$(PY) -m retro_kernels

wheel: setup
	PATH="$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$$PATH" \
	  $(PY) -m build --wheel --no-isolation --outdir dist
