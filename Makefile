# postbote — the two commands a user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install services test-tools demo test test-ha lint typecheck schemas bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@bash .ci/services --python
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

services:
	@bash .ci/services

test-tools:
	@bash .ci/services --test-tools

demo: install services
	$(VENV)/bin/postbote demo

test: install services test-tools
	$(PY) -m pytest -m "not ha"

# Clusters of their own (three RabbitMQ nodes, PostgreSQL primary + standby): slower, separate.
test-ha: install services
	$(PY) -m pytest -m ha tests/test_ha_*.py

lint: install
	$(VENV)/bin/ruff check schemas producer worker tests bench
	$(VENV)/bin/ruff format --check schemas producer worker tests bench

typecheck: install
	$(VENV)/bin/mypy

schemas: install
	$(PY) -m schemas.export

bench: install services
	@bash .ci/services --bench-tools
	$(PY) bench/series.py
	$(PY) bench/throughput.py
	$(PY) bench/consumer.py
	$(PY) bench/stages.py
	$(PY) bench/ledger_sql.py
	$(PY) bench/dkim_sign.py
	$(PY) bench/events_lag.py
	$(PY) bench/fairness.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
