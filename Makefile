# Daily entry points. `make serve` and `make test` are the README's two set-up commands.
#
# Every target runs in the checkout's own virtual environment, .venv: created on first use from
# SYSTEM_PYTHON (without its site-packages), filled from the lock requirements-dev.txt, and reused
# while the lock is unchanged. Nothing is installed into the system interpreter.
SYSTEM_PYTHON ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
LOCK := requirements-dev.txt
# Named after the lock's checksum: a target whose lock is unchanged installs nothing, and a
# changed lock (a pull, a branch switch, `make lock`) installs again on the next target.
STAMP := $(VENV)/.installed-$(firstword $(shell cksum < $(LOCK)))
# The venv's console scripts (cfn-lint, pip-compile, ...) come first for the recipes below.
export PATH := $(abspath $(VENV))/bin:$(PATH)
export VIRTUAL_ENV := $(abspath $(VENV))

# Loopback unless HOST says otherwise: auth is off by default, so the whole network is opt-in.
HOST ?= 127.0.0.1
PORT ?= 8000
MODELS_DIR ?= models

.PHONY: setup lock serve build-model check lint typecheck cfn-lint test test-fast test-image bench bench-smoke clean

setup: $(STAMP)

# --no-deps: the lock is the whole closure (pip-compile), so pip resolves nothing and installs
# only what it pins; pip check then proves the set consistent. torch==2.13.0+cpu comes from
# wherever pip is configured to find it (PyTorch's CPU index, or a local wheel).
$(STAMP):
	@test -x $(PYTHON) || { echo "creating $(VENV) with $$($(SYSTEM_PYTHON) --version)"; \
	  $(SYSTEM_PYTHON) -m venv $(VENV); }
	$(PYTHON) -m pip install -q --disable-pip-version-check --no-deps -r $(LOCK)
	$(PYTHON) -m pip check
	@rm -f $(VENV)/.installed-*
	@touch $@

# Re-resolve pyproject.toml into the three pinned files: the dev lock (this venv), then the
# runtime image's and the model build's sets as subsets of it (same versions everywhere).
# Existing pins are kept; LOCK_ARGS=--upgrade (or --upgrade-package NAME) moves them.
PIP_COMPILE = $(VENV)/bin/pip-compile --quiet --strip-extras --allow-unsafe --no-emit-index-url \
  --no-emit-find-links $(LOCK_ARGS)
lock: $(STAMP)
	$(PIP_COMPILE) --extra build --extra dev --output-file requirements-dev.txt pyproject.toml
	$(PIP_COMPILE) --constraint requirements-dev.txt --output-file requirements.txt pyproject.toml
	$(PIP_COMPILE) --constraint requirements-dev.txt --extra build \
	  --output-file requirements-build.txt pyproject.toml

# Build a model (MODEL_SOURCE, else BGE-M3 from the hub, else the offline demo model) and serve it.
serve: $(STAMP)
	MODEL_PATH="$$($(PYTHON) -m model_build.quickstart --models-dir $(MODELS_DIR))" && \
	  echo "serving MODEL_PATH=$$MODEL_PATH on http://$(HOST):$(PORT) (HOST=$(HOST))" && \
	  MODEL_PATH="$$MODEL_PATH" HOST=$(HOST) PORT=$(PORT) exec $(PYTHON) -m handler.main

# BGE-M3 int8 from the hub at the pinned revision (override SOURCE / RECIPE / PRECISION / OUT).
SOURCE ?= BAAI/bge-m3
RECIPE ?= bge-m3
PRECISION ?= int8
OUT ?= $(MODELS_DIR)/bge-m3-$(PRECISION)
build-model: $(STAMP)
	$(PYTHON) -m model_build --source $(SOURCE) --recipe $(RECIPE) --precision $(PRECISION) --out $(OUT)

lint: $(STAMP)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

typecheck: $(STAMP)
	$(PYTHON) -m mypy

# cfn-lint 1.x has no __main__ module; its runner is the console script's entry point.
cfn-lint: $(STAMP)
	$(PYTHON) -c "from cfnlint.runner import main; main()" template.yaml

check: lint typecheck cfn-lint

test-fast: $(STAMP)
	$(PYTHON) -m pytest -m "not docker"

test: $(STAMP) check
	$(PYTHON) -m pytest -m "not docker"
	$(MAKE) test-image

# The host side of the image test (pip download of requirements.txt's wheels, the fixture model
# build) runs in this venv too.
test-image: $(STAMP)
	PYTHON=$(abspath $(PYTHON)) bash infra/scripts/ci_image_test.sh

bench: $(STAMP)
	$(PYTHON) -m bench

bench-smoke: $(STAMP)
	$(PYTHON) -m bench --smoke

clean:
	rm -rf .mypy_cache .ruff_cache .pytest_cache build
