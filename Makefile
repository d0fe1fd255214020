# One command sets everything up and runs the demo (`make demo`); one runs the tests (`make test`).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.selfsup-setup
# Measured in bench/threads.py: OpenMP's busy-waiting threads cost more than they give on small ops.
export OMP_WAIT_POLICY ?= PASSIVE
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test bench clean

setup: $(STAMP)

# torch is installed first and pinned: 2.13.0 is a CPU build on local disk; anything unpinned pulls
# a 5.5 GB CUDA build. The stamp makes `make setup` a no-op once done (redone if pyproject changes).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: setup
	$(BIN)/selfsup demo --overwrite

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/pip install --quiet -e '.[bench]'
	mkdir -p runs
	$(BIN)/python bench/threads.py | tee runs/bench.jsonl
	$(BIN)/python bench/augment.py | tee -a runs/bench.jsonl
	$(BIN)/python bench/vision.py | tee -a runs/bench.jsonl

clean:
	rm -rf $(VENV) runs .pytest_cache
