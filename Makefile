# Two commands do all set-up (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
# The PyTorch build to install; on a CUDA machine the same pin gets the CUDA wheel from PyPI.
TORCH  ?= torch==2.13.0

.PHONY: setup demo test lint bench gpu-wheels

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q "$(TORCH)"
	$(VENV)/bin/python -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/gpt2-dutch demo

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q  # on both cores: pyproject's addopts has -n 2 (pytest-xdist)

# The development corpus beside a checkout, when there is one (the product itself never looks for it).
BENCH_TEXT ?= $(wildcard ../shared/data/dutch/train.jsonl.gz)

bench: $(VENV)/.installed
	$(VENV)/bin/gpt2-dutch bench $(if $(BENCH_TEXT),--data-files $(BENCH_TEXT))

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests

# The wheels scripts/gpu_check.sh installs on a GPU machine that has no package index (docs/bench.md, "GPU check"):
# exactly the dependencies its image lacks (torch, transformers, pandas, ... are there), pinned to the versions
# installed here, for each Python in PYTHON_VERSION, in wheels/cpXY/; the development corpus beside it when the
# checkout has one. The device takes them with `carry: ["wheels"]` (64 MiB at most with the working tree).
PYTHON_VERSION ?= 3.11 3.12
GPU_WHEELS ?= datasets dill multiprocess fastapi starlette pydantic pydantic-core typing-inspection annotated-types \
	typing-extensions opentelemetry-api uvicorn prometheus-client liger-kernel

gpu-wheels: $(VENV)/.installed
	@for v in $(PYTHON_VERSION); do \
	  tag=cp$$(echo $$v | tr -d .); rm -rf wheels/$$tag; \
	  $(VENV)/bin/python -m pip download -q --no-deps --only-binary=:all: --disable-pip-version-check \
	    --python-version $$v --implementation cp --abi $$tag --abi abi3 --abi none \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    --platform any -d wheels/$$tag $$($(VENV)/bin/python scripts/gpu_check.py --pins $(GPU_WHEELS)) || exit 1; \
	done
	$(if $(BENCH_TEXT),cp $(BENCH_TEXT) wheels/corpus.jsonl.gz)
	@du -sh wheels; du -sh wheels/*
