# Two commands do all set-up (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
# The PyTorch build to install; on a CUDA machine the same pin gets the CUDA wheel from PyPI.
TORCH  ?= torch==2.13.0

.PHONY: setup demo test lint bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q "$(TORCH)"
	$(VENV)/bin/python -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/gpt2-dutch demo

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q

# The development corpus beside a checkout, when there is one (the product itself never looks for it).
BENCH_TEXT ?= $(wildcard ../shared/data/dutch/train.jsonl.gz)

bench: $(VENV)/.installed
	$(VENV)/bin/gpt2-dutch bench $(if $(BENCH_TEXT),--data-files $(BENCH_TEXT))

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests
