# Two commands do everything: `make demo` and `make test`. Both set up the virtual environment
# first (torch's CPU build pinned before the project, so pip never pulls a CUDA build).
#
# Where torch comes from (TORCH_INDEX):
#   auto (default)  a torch==2.13.0 wheel pip finds without an index (find-links, e.g. a local
#                   CPU wheel) is used as it is; otherwise PyTorch's CPU-only index, not PyPI's
#                   multi-GB CUDA build
#   URL             that index, e.g. make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
#   (empty)         pip's own configuration, e.g. a mirror: make install TORCH_INDEX=
PYTHON      ?= python3
VENV        := .venv
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.installed-stamp
TORCH       := torch==2.13.0
TORCH_CPU   := https://download.pytorch.org/whl/cpu
TORCH_INDEX ?= auto

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	index="$(TORCH_INDEX)"; \
	if [ "$$index" = auto ]; then \
	  if $(BIN)/python -m pip install --dry-run --no-deps --no-index --quiet $(TORCH) >/dev/null 2>&1; \
	  then index=""; else index="$(TORCH_CPU)"; fi; \
	fi; \
	$(BIN)/python -m pip install --quiet $${index:+--index-url "$$index"} $(TORCH)
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
