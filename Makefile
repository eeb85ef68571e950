# make run   set-up + CC on the embedded digits data set (a couple of minutes on a laptop CPU)
# make test  set-up + the test suite (slow tests: make test-slow)
# make lint  ruff check + ruff format --check (CI runs it before the tests)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

.PHONY: setup run test test-slow lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

run: $(STAMP)
	$(BIN)/clusterlab fit --config experiments/cc_digits.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

lint: $(STAMP)
	$(BIN)/ruff check clusterlab tests benchmarks
	$(BIN)/ruff format --check clusterlab tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
