# The README's two set-up commands: `make quickstart` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: quickstart test test-quick bench bench-accuracy clean

# (Re)install only when the project's dependencies changed; safe to re-run.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/anchorless quickstart

test: $(STAMP)
	$(BIN)/python -m pytest

test-quick: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/assigners.py
	$(BIN)/python bench/inference.py
	$(BIN)/python bench/data_pipeline.py
	$(BIN)/python bench/train_overhead.py
	$(BIN)/python bench/export.py

# Hours, not minutes: three detectors trained on BCCD for 30 minutes each.
bench-accuracy: $(STAMP)
	$(BIN)/python bench/bccd_accuracy.py --minutes 30

clean:
	rm -rf $(VENV) workspace .pytest_cache
