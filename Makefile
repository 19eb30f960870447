# `make up` runs the whole system in the foreground; `make test` is what CI runs.
# Both create .venv and install the project (with the dev extras) when it is missing or when
# pyproject.toml changed since the last install.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install up test lint soak

help:
	@echo "make up     run every service (embedded PostgreSQL and NATS unless PIPELINES_*_URL are set)"
	@echo "make test   lint, type-check, import rules, test suite"
	@echo "make lint   ruff, mypy and the import rules only"
	@echo "make soak   the long suites (tests marked soak)"

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

up: $(STAMP)
	$(BIN)/pipelines up

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python tools/check_imports.py

test: lint
	$(BIN)/pytest -q -m "not soak"

soak: $(STAMP)
	$(BIN)/pytest -q -m soak --timeout=1800; status=$$?; [ $$status -eq 0 ] || [ $$status -eq 5 ]
