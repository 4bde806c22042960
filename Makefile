# cliplab: two commands.  `make demo` runs the main job; `make test` passes the tests.
# Both set everything up first (a .venv, the pinned packages, the emoji font) and are idempotent.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.cliplab-installed
FONT   := /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
UNICODE := /usr/share/unicode/emoji/emoji-test.txt
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MLFLOW_TELEMETRY_DISABLED := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup demo demo-quick test test-fast lint clean

setup: $(STAMP) $(FONT) $(UNICODE)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# the emoji font (images) and Unicode's emoji-test.txt (the group/subgroup hierarchy)
$(FONT) $(UNICODE):
	$(SUDO) apt-get update -q
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q fonts-noto-color-emoji unicode-data

demo: setup
	$(BIN)/cliplab demo

demo-quick: setup
	$(BIN)/cliplab demo --quick

test: setup
	$(BIN)/ruff check platform tests bench sweeps
	$(BIN)/pytest

test-fast: setup
	$(BIN)/pytest -m "not slow"

lint: setup
	$(BIN)/ruff check platform tests bench sweeps

clean:
	rm -rf .cliplab .pytest_cache
