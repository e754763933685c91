# Two entry points: `make demo` and `make test`. Both create and reuse .venv.
# TORCH pins the torch build installed first; on this CPU-only machine kind
# torch==2.13.0 resolves to a local CPU wheel, elsewhere pip picks the usual build.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.visionlora-installed

.PHONY: setup demo test lint typecheck docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)" -e ".[dev]"
# trackeval (HOTA, in the tracking test) without its declared opencv-python, a second build of the
# cv2 that opencv-python-headless gives; what the metrics import needs is numpy, scipy and tabulate
	$(BIN)/python -m pip install --quiet --no-deps "trackeval==1.3.0"
	touch $(STAMP)

demo: setup
	$(BIN)/visionlora demo

# pytest-xdist: one worker per core (at most 8), each module's tests on one worker
test: setup
	$(BIN)/python -m pytest -n auto --maxprocesses 8 --dist loadscope

lint: setup
	$(BIN)/ruff check .
	$(MAKE) --no-print-directory typecheck

# mypy over src/visionlora (settings in pyproject.toml)
typecheck: setup
	$(BIN)/mypy

# the documentation site, with broken links, missing pages and unresolved references as errors
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) runs site .pytest_cache .mypy_cache
