# PaySentry: `make run` starts the sidecar on its embedded defaults; `make test` runs the whole suite.
# Both create the virtualenv and install what they need on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint fmt clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/paysentry serve --config deploy/dev.yaml --demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check proxy adapters tests bench
	$(BIN)/ruff format --check proxy adapters tests bench

fmt: $(STAMP)
	$(BIN)/ruff format proxy adapters tests bench
	$(BIN)/ruff check --fix proxy adapters tests bench

clean:
	rm -rf $(VENV) var .pytest_cache

bench: $(STAMP)
	$(BIN)/python -m bench.decision
