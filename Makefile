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

# Test files run in parallel processes, a file's tests in one of them (they share its
# module fixtures: a Ray, a cluster, a trained run); most tests wait on other processes.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-quick: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/assigners.py
	$(BIN)/python bench/inference.py
	$(BIN)/python bench/data_pipeline.py
	$(BIN)/python bench/train_overhead.py
	$(BIN)/python bench/export.py

# Hours, not minutes: every detector and both torchvision peers trained for 10 minutes of
# training time, 2 seeds each, on BCCD and on raccoon (about 4 hours a set here).
bench-accuracy: $(STAMP)
	$(BIN)/python bench/accuracy.py --data bccd --minutes 10 --seeds 2
	$(BIN)/python bench/accuracy.py --data raccoon --minutes 10 --seeds 2

clean:
	rm -rf $(VENV) workspace .pytest_cache
