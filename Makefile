# Developer and CI entry points. `make test` is what .ci/run calls.
SHELL := /bin/bash
.DEFAULT_GOAL := test

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Reinstall only when a requirement file or the package metadata changes.
STAMP := $(VENV)/.requirements.stamp
REQUIREMENTS := requirements/base.txt requirements/test.txt requirements/lint.txt pyproject.toml
PIP := $(BIN)/python -m pip --disable-pip-version-check

PG_HOST ?= 127.0.0.1
REDIS_HOST ?= 127.0.0.1
REDIS_PORT ?= 6379
PYTEST_ARGS ?=
DEMO_ADDR ?= 127.0.0.1:8000

.PHONY: venv venv6 services postgres redis broker lint test test-django52 test-topologies test-django6 demo worker bench bench-peers clean fuzz

venv: $(STAMP)

$(STAMP): $(REQUIREMENTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements/test.txt
	$(PIP) install -q -e .
	touch $@

services: postgres redis

postgres:
	@pg_isready -q -h $(PG_HOST) || pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start || true
	@for _ in $$(seq 40); do pg_isready -q -h $(PG_HOST) && exit 0; sleep 0.5; done; \
	  echo "PostgreSQL is not answering on $(PG_HOST):5432 after 20s" >&2; exit 1
# pg_hba's "all" does not admit replication connections; tests/pg_replica.py streams a replica.
	@hba=$$(psql -h $(PG_HOST) -U postgres -XAtc 'SHOW hba_file') || exit 1; \
	  if grep -qsE '^host\s+replication\s+all\s+127\.0\.0\.1/32\s+trust\s*$$' "$$hba"; then :; \
	  elif [ -w "$$hba" ]; then echo 'host replication all 127.0.0.1/32 trust' >> "$$hba" && \
	    psql -h $(PG_HOST) -U postgres -XAtqc 'SELECT pg_reload_conf()' >/dev/null; \
	  else echo "Cannot edit $$hba: replication from 127.0.0.1 stays refused" >&2; fi

redis:
	@[ "$$(redis-cli -h $(REDIS_HOST) -p $(REDIS_PORT) ping 2>/dev/null)" = PONG ] || { \
	  mkdir -p /var/lib/redis /var/log/redis; \
	  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port $(REDIS_PORT) --save "" \
	    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log || true; }
	@for _ in $$(seq 40); do \
	  [ "$$(redis-cli -h $(REDIS_HOST) -p $(REDIS_PORT) ping 2>/dev/null)" = PONG ] && exit 0; sleep 0.5; \
	done; echo "Redis is not answering on $(REDIS_HOST):$(REDIS_PORT) after 20s" >&2; exit 1

# RabbitMQ boots slowly, hence its own target; tests/test_beat.py runs a worker on it.
broker:
	@rabbitmq-diagnostics -q ping >/dev/null 2>&1 || rabbitmq-server -detached || true
	@for _ in $$(seq 30); do rabbitmq-diagnostics -q ping >/dev/null 2>&1 && exit 0; sleep 2; done; \
	  echo "RabbitMQ is not answering after 60s" >&2; exit 1

# Django 6.x runs on Python 3.12+: a second virtualenv for it.
# The first interpreter that really runs and is 3.12+ (a pyenv shim may exist and refuse).
PYTHON6 ?= $(shell for p in $$(ls -d $(HOME)/.pyenv/versions/3.1[2-9]*/bin/python3 2>/dev/null) $$(command -v python3.13 python3.12 2>/dev/null); do \
  $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && { echo $$p; break; }; done)
VENV6 := .venv-django6
STAMP6 := $(VENV6)/.requirements.stamp

venv6: $(STAMP6)

$(STAMP6): $(REQUIREMENTS) requirements/django6.txt
	@test -n "$(PYTHON6)" || { echo "Python 3.12 is needed for the Django 6 run (pyenv install 3.12)" >&2; exit 1; }
	test -x $(VENV6)/bin/python || $(PYTHON6) -m venv $(VENV6)
	$(VENV6)/bin/python -m pip --disable-pip-version-check install -q -r requirements/test.txt
	$(VENV6)/bin/python -m pip --disable-pip-version-check install -q -r requirements/django6.txt
	$(VENV6)/bin/python -m pip --disable-pip-version-check install -q -e .
	touch $@

# Lint, formatting, the layers of .importlinter and mypy --strict (pyproject.toml), in the
# Django 5.2 virtualenv (django-stubs 5.2 describes Django 5.2).
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy

# Lint first, then the whole suite on Django 5.2 LTS (Python 3.11) and on Django 6.x
# (Python 3.12), then the wheel in a clean virtualenv (dist). pytest's own exit codes carry
# through: 5 (no tests collected) fails.
test: lint test-django52 test-topologies test-django6 dist

test-django52: venv services
	$(BIN)/pytest $(PYTEST_ARGS)

# The coherence, resilience, lost-state, read, write, derived, operations, command,
# inspection, trend and connection tests again with the cache on a Sentinel setup (1
# master, 1 replica, 3 sentinels) and on a Redis Cluster (3 masters, 3 replicas), each
# started by the run on spare ports (tests/topologies.py).
# The faults are injected into the topology (every node paused, killed, restarted empty,
# its addresses refusing, junk, FLUSHALL); tests marked single_server inject faults only one
# private redis-server has (a fake server on its address, NOAUTH, OOM, its memory settings).
# The topologies' own fault (a replica cut off, then promoted) is in tests/test_failover.py,
# which the main run has.
TOPOLOGY_TESTS := tests/test_coherence.py tests/test_resilience.py tests/test_lost_state.py \
  tests/test_reads.py tests/test_writes.py tests/test_derived.py tests/test_ops.py \
  tests/test_commands.py tests/test_inspection.py tests/test_trends.py tests/test_connections.py
test-topologies: venv services
	TC_TOPOLOGY=sentinel $(BIN)/pytest -m "not single_server" $(TOPOLOGY_TESTS)
	TC_TOPOLOGY=cluster $(BIN)/pytest -m "not single_server" $(TOPOLOGY_TESTS)

test-django6: venv6 services
	$(VENV6)/bin/pytest $(PYTEST_ARGS)

# The differential fuzzer (tests/fuzz_machine.py) for a time budget, random seeds; it prints
# how many examples and steps ran, and Hypothesis prints any shrunk counterexample.
FUZZ_MINUTES ?= 10
fuzz: venv services
	$(BIN)/python -m tests.test_fuzz --minutes $(FUZZ_MINUTES)

demo: venv redis
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py load_demo_data
	$(BIN)/python manage.py ensure_demo_admin
	$(BIN)/python manage.py runserver $(DEMO_ADDR)

# A worker with beat (CELERY_BEAT_SCHEDULE) on the demo's broker, Redis by default;
# CELERY_BROKER_URL=amqp://guest:guest@127.0.0.1:5672// uses RabbitMQ (make broker).
worker: venv redis
	$(BIN)/celery -A demo_project worker -B -l info -s $(VENV)/celerybeat-schedule

# Debian's Chromium for tests/test_browser.py; Playwright drives it and never downloads
# a browser of its own (no `playwright install`).
.PHONY: browser
browser:
	@test -x /usr/bin/chromium || apt-get install -y chromium \
	  || { apt-get update && apt-get install -y chromium; }
	@test -x /usr/bin/chromium || { echo "Chromium is not at /usr/bin/chromium" >&2; exit 1; }

test-django52 test-django6: browser
test-django52 test-django6: broker

# The benchmark (benchmarks/bench.py): it recreates and finally drops its own database
# (tiered_cache_bench) and Redis key prefix. BENCH_ARGS: --quick (smoke run), --json PATH,
# --profile (cProfile of the L1 and L2 hit paths instead of the table).
BENCH_ARGS ?=
bench: venv services
	$(BIN)/python -m benchmarks.bench $(BENCH_ARGS)

# django-cachalot and django-cacheops on the same models, database and Redis, each in a
# process of its own virtualenv, beside tiered_cache's hits (benchmarks/bench_peers.py).
VENV_PEERS := .venv-peers
STAMP_PEERS := $(VENV_PEERS)/.requirements.stamp
PEERS_ARGS ?=

$(STAMP_PEERS): $(REQUIREMENTS) requirements/peers.txt
	test -x $(VENV_PEERS)/bin/python || $(PYTHON) -m venv $(VENV_PEERS)
	$(VENV_PEERS)/bin/python -m pip --disable-pip-version-check install -q -r requirements/peers.txt
	$(VENV_PEERS)/bin/python -m pip --disable-pip-version-check install -q -e .
	touch $@

bench-peers: $(STAMP_PEERS) services
	$(VENV_PEERS)/bin/python -m benchmarks.bench_peers $(PEERS_ARGS)

# The load test (benchmarks/loadtest.py): the demo under gunicorn (4 workers x 4 threads) and
# uvicorn, driven by wrk, cached views against their plain ORM twins, then Redis killed at
# peak. It recreates and finally drops its own database (tiered_cache_load) and runs its own
# redis-server on a spare port. wrk comes from Debian's packages; gunicorn and uvicorn from
# requirements/loadtest.txt, into .venv (make test does not need them).
# LOADTEST_ARGS: --quick (smoke run), --duration S, --phase S, --json PATH.
LOADTEST_ARGS ?=
STAMP_LOADTEST := $(VENV)/.loadtest.stamp

$(STAMP_LOADTEST): $(STAMP) requirements/loadtest.txt
	$(PIP) install -q -r requirements/loadtest.txt
	touch $@

.PHONY: loadtest
loadtest: venv $(STAMP_LOADTEST) services
	@command -v wrk >/dev/null || apt-get install -y wrk || { apt-get update && apt-get install -y wrk; }
	@command -v wrk >/dev/null || { echo "wrk is not installed" >&2; exit 1; }
	$(BIN)/python -m benchmarks.loadtest $(LOADTEST_ARGS)

# The distributions (tests/dist_smoke.py): `python -m build` (sdist, then the wheel from it)
# into dist/, `twine check --strict`, the wheel's files checked against tiered_cache/, the
# wheel installed into a fresh virtualenv in a temporary directory (dependencies from pip's
# configured index, through its cache), and a generated Django project run there on it:
# migrate, cached reads, the admin's flush actions, manage.py tiered_cache. It creates and
# drops its own PostgreSQL database and uses its own Redis key prefix (DIST_REDIS_URL, db 12).
# DIST_ARGS: --keep (keep the temporary directory).
DIST_ARGS ?=
STAMP_DIST := $(VENV)/.dist.stamp

$(STAMP_DIST): $(STAMP) requirements/dist.txt
	$(PIP) install -q -r requirements/dist.txt
	touch $@

.PHONY: dist
dist: venv $(STAMP_DIST) services
	$(BIN)/python tests/dist_smoke.py $(DIST_ARGS)

clean:
	rm -rf $(VENV) $(VENV6) $(VENV_PEERS) .pytest_cache .ruff_cache .mypy_cache build dist *.egg-info db.sqlite3 celerybeat-schedule*
	find . -name __pycache__ -type d -prune -not -path './.git/*' -exec rm -rf {} +
