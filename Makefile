# One command sets everything up and runs the demo (`make demo`); one runs the tests (`make test`).
# bash with pipefail: a benchmark piped through tee must still fail the target when it fails.
SHELL := bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.selfsup-setup
# Measured in bench/threads.py: OpenMP's busy-waiting threads cost more than they give on small ops.
export OMP_WAIT_POLICY ?= PASSIVE
export TOKENIZERS_PARALLELISM ?= false

# Debian packages the "glyphs" built-in renders from (selfsup data prepare glyphs; shared/DATA.md).
DEB_PACKAGES := fonts-noto-core fonts-noto-color-emoji unicode-data manpages manpages-dev man-db bsdextrautils \
	klettres-data espeak-ng
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup system-packages demo test faults bench clean report-check gpu-check

setup: $(STAMP) | system-packages

# Installs the Debian packages only when dpkg says one is missing: where they are present it
# prints nothing and does nothing; without apt-get (not Debian) it only notes what glyphs needs.
system-packages:
	@if dpkg -s $(DEB_PACKAGES) >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		echo "installing $(DEB_PACKAGES) for the built-in datasets (glyphs, emoji, man pages, klettres, espeak)"; \
		$(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends $(DEB_PACKAGES); \
	else \
		echo "note: no apt-get here; the glyphs built-in needs the Noto fonts and Unicode Scripts.txt of $(DEB_PACKAGES)"; \
	fi

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

# The CUDA path on a GPU machine: every objective a few steps in bf16, resumed, timed (bench/gpu.py);
# with the peer environment, SimCLR/BYOL/DINO/MAE against lightly on the same GPU.
gpu-check: setup
	$(BIN)/python bench/gpu.py $(if $(wildcard $(BENCH_VENV)/bin/python),--peer-python $(BENCH_VENV)/bin/python)

# The fault-injection suite in full (tests/faults: kill -9 at random moments, corrupted checkpoints,
# a full disk, a killed DDP rank, SIGTERM at start-up and export, refused overwrites and resumes);
# `make test` runs its reduced set.
faults: setup
	SELFSUP_FAULTS=full $(BIN)/python -m pytest -q tests/faults

# The peers' own environment (bench/peers/): lightly needs torchvision, which does not install beside
# selfsup's torch 2.13, so it gets torch 2.14.1 + torchvision 0.29.1 (a ~5.5 GB CUDA build from local
# disk; it runs on the CPU) in .venv-bench, once. Never part of selfsup's dependencies.
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.stamp

BENCH_TORCH := torch==2.14.1 torchvision==0.29.1
OPEN_CLIP_STAMP := $(BENCH_VENV)/.stamp-open-clip

$(BENCH_STAMP):
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/pip install --quiet $(BENCH_TORCH) lightly==1.6.0
	touch $@

# open_clip (bench/clip.py's peer) needs torchvision and timm: into the same environment, its own stamp
# so that an environment built before it gets it too. Torch and torchvision are named with their pins
# in the same command so that pip can only keep them; the import check fails the target if it changed them.
$(OPEN_CLIP_STAMP): $(BENCH_STAMP)
	$(BENCH_VENV)/bin/pip install --quiet $(BENCH_TORCH) open-clip-torch==3.3.0 timm==1.0.29
	$(BENCH_VENV)/bin/python -c "import torch, torchvision, open_clip; \
		assert (torch.__version__.split('+')[0], torchvision.__version__.split('+')[0]) == ('2.14.1', '0.29.1'), \
		(torch.__version__, torchvision.__version__)"
	touch $@

bench: setup $(BENCH_STAMP) $(OPEN_CLIP_STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	mkdir -p runs
	$(BIN)/python bench/threads.py | tee runs/bench.jsonl
	$(BIN)/python bench/augment.py | tee -a runs/bench.jsonl
	$(BIN)/python bench/vision.py --peer-python $(BENCH_VENV)/bin/python | tee -a runs/bench.jsonl
	$(BIN)/python bench/text.py | tee -a runs/bench.jsonl
	$(BIN)/python bench/speech.py | tee -a runs/bench.jsonl
	$(BIN)/python bench/clip.py --peer-python $(BENCH_VENV)/bin/python | tee -a runs/bench.jsonl
	$(BIN)/python bench/objectives.py | tee -a runs/bench.jsonl

clean:
	rm -rf $(VENV) $(BENCH_VENV) runs .pytest_cache

# The report in a real browser (tests/report/test_browser.py, headless Chromium): installs the Debian
# package chromium only where dpkg says it is missing; without apt-get the browser tests skip, saying why.
report-check: setup
	@if dpkg -s chromium >/dev/null 2>&1 || [ -n "$$SELFSUP_CHROMIUM" ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium for the browser check of the HTML report"; \
		$(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends chromium; \
	else \
		echo "note: no apt-get here; install Chromium (or set SELFSUP_CHROMIUM to its binary) for the browser check"; \
	fi
	$(BIN)/python -m pytest -q tests/report/test_browser.py
