# Two entry points: `make demo` and `make test`. Both create and reuse .venv.
# TORCH pins the torch build installed first; on this CPU-only machine kind
# torch==2.13.0 resolves to a local CPU wheel, elsewhere pip picks the usual build.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.visionlora-installed

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)" -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/visionlora demo

# pytest-xdist: one worker per core (at most 8), each module's tests on one worker
test: setup
	$(BIN)/python -m pytest -n auto --maxprocesses 8 --dist loadscope

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
