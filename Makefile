# Two commands do everything: `make demo` and `make test`. Both set up the virtual environment
# first (torch's CPU build pinned before the project, so pip never pulls a CUDA build).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
TORCH  := torch==2.13.0

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/python -m training.demo

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check ranker training service tests bench
	$(BIN)/ruff format --check ranker training service tests bench

clean:
	rm -rf $(VENV) data artifacts runs .pytest_cache
