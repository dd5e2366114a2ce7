# The two commands the README documents: `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: deps demo demo-api test lint bench

deps:
	@bash scripts/install-deps.sh

demo: deps
	$(PY) -m harness.demo

demo-api: deps
	$(PY) -m harness.demo_api

lint: deps
	$(VENV)/bin/ruff check pushlib pushsandbox kemi tests bench harness
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest -q

bench: deps
	$(PY) bench/push_bench.py --rounds 3
	$(PY) bench/wake_bench.py --calls 200
	$(PY) bench/capacity.py --step-seconds 10
	$(PY) bench/parked_bench.py
	$(PY) bench/reregister_bench.py
	$(PY) bench/message_bench.py
	$(PY) bench/chaos.py
	$(PY) bench/cluster_bench.py
	$(PY) bench/cluster_failover.py
