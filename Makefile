# Two commands set everything up on a fresh machine:
#   make demo   - local virtualenv + the main job on embedded chDB (no servers)
#   make test   - test needs (Kafka from Maven Central included) + the whole suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Re-install only when the dependency list changes (idempotent, uses pip's cache).
STAMP := $(VENV)/.meterline-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test install kafka prometheus stripe-mock chromium docker-compose wrk lint bench bench-e2e bench-rollups bench-state bench-export clean

# The compiled column builder (native/, Rust): rebuilt when a file of it changes.
NATIVE_STAMP := $(VENV)/.native-$(shell cat native/Cargo.toml native/pyproject.toml native/src/*.rs | cksum | cut -d' ' -f1)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.meterline-* && touch $@

$(NATIVE_STAMP): $(STAMP) native/Cargo.toml native/pyproject.toml $(wildcard native/src/*.rs)
	bash tools/native/build.sh $(BIN)/python
	rm -f $(VENV)/.native-* && touch $@

install: $(STAMP) $(NATIVE_STAMP)

demo: $(STAMP) $(NATIVE_STAMP)
	$(BIN)/meterline demo

kafka:
	bash tools/kafka/fetch.sh

# promtool + prometheus from Debian for the dashboard/alert tests (skips when present).
prometheus:
	bash tools/prometheus/install.sh

# stripe-mock (Go module, `go install`) for the Stripe export tests (skips when built).
stripe-mock:
	bash tools/stripe-mock/install.sh

# headless Chromium from Debian for the usage page test (skips when present).
chromium:
	bash tools/chromium/install.sh

# docker-compose from Debian: `docker-compose config` validates docker-compose.yml with no
# Docker daemon (tests/test_docker.py; skips when present).
docker-compose:
	bash tools/docker-compose/install.sh

# wrk (C HTTP load generator) from Debian for `benchmarks/server_ingest.py --client wrk`
# and its smoke test (skips when present).
wrk:
	bash tools/wrk/install.sh

test: $(STAMP) $(NATIVE_STAMP) kafka prometheus stripe-mock chromium docker-compose wrk
	$(BIN)/python -m pytest -p no:cacheprovider

lint: $(STAMP) $(NATIVE_STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy meterline sdk ingest sinks aggregators

bench: $(STAMP) $(NATIVE_STAMP) kafka
	$(BIN)/python -m pytest benchmarks -p no:cacheprovider --benchmark-only

bench-e2e: $(STAMP) kafka
	$(BIN)/python benchmarks/e2e_sdk_kafka.py

bench-rollups: $(STAMP) $(NATIVE_STAMP) kafka
	$(BIN)/python benchmarks/e2e_rollups.py

bench-state: $(STAMP) $(NATIVE_STAMP)
	$(BIN)/python benchmarks/checkpoint_state.py

# invoicing export (issue 10): items/s to the local signed-webhook receiver (docs/export.md)
bench-export: $(STAMP) $(NATIVE_STAMP)
	$(BIN)/python benchmarks/export_throughput.py

clean:
	rm -rf $(VENV) .cache var .meterline-spool
