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
	$(COMPILE)
	$(BIN)/anchorless quickstart

# Test files in parallel processes, a file's tests in one of them (they share its module
# fixtures: a Ray, a cluster, a trained run): one process per two cores, at most four. The
# end-to-end tests keep two cores busy each: two processes on two cores measured no faster
# than one (38 min either way), so a two-core machine runs them one after another.
TEST_WORKERS ?= $(shell n=$$(( $$(nproc) / 2 )); [ $$n -lt 1 ] && n=1; [ $$n -gt 4 ] && n=4; echo $$n)
PARALLEL := $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

# The project's bytecode, compiled once: a test run starts hundreds of Python processes
# (each Ray Train run about thirteen, the CLI in subprocesses) that import the package,
# and where the environment sets PYTHONDONTWRITEBYTECODE none of them keeps what it
# compiled (0.36 s of a training worker's import, measured).
COMPILE := $(BIN)/python -m compileall -q anchorless

test: $(STAMP)
	$(COMPILE)
	$(BIN)/python -m pytest $(PARALLEL)

test-quick: $(STAMP)
	$(COMPILE)
	$(BIN)/python -m pytest $(PARALLEL) -m "not slow"

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
