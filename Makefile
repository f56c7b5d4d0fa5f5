# PaySentry: `make run` starts the sidecar on its embedded defaults; `make test` runs the whole suite.
# Both create the virtualenv and install what they need on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test lint fmt clean bench chaos profile services wrk lock browser screenshots

# The runtime dependencies are installed at exactly the versions requirements.lock pins (the image's).
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[test]'
	touch $(STAMP)

# The x402 demo (a paid resource on :4021 and an offline facilitator on :4022) runs beside the sidecar.
run: $(STAMP)
	$(BIN)/python -m proxy x402-demo & trap 'kill $$!' EXIT; \
	$(BIN)/paysentry --config deploy/dev.yaml serve --demo

# The store tests start real PostgreSQL and Redis servers: install the Debian packages when missing.
services:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ! command -v redis-server >/dev/null; then \
		echo "installing postgresql and redis-server (Debian packages) for the store tests"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq postgresql redis-server >/dev/null; \
	fi

# The load benchmark (and its smoke test) drives the servers with wrk (Debian package).
wrk:
	@command -v wrk >/dev/null || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq wrk >/dev/null; }

# The console's browser test drives Debian's chromium through its chromedriver (Debian packages; no
# browser download): install them when missing.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		echo "installing chromium and chromium-driver (Debian packages) for the console's browser test"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi

test: $(STAMP) services wrk browser
	$(BIN)/python -m pytest -q -p no:cacheprovider

# The image installs exactly these versions (deploy/Dockerfile); tests/deploy/test_manifests.py checks it.
lock:  # after a change to pyproject.toml's dependencies: resolve them afresh (not from the old pins), pin
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m tests.deploy.lock > requirements.lock.new && mv requirements.lock.new requirements.lock
	touch $(STAMP)

# A screenshot of each console page (signed in as an approver, then the owner) into var/screenshots/.
screenshots: $(STAMP) browser
	PAYSENTRY_SCREENSHOTS=$(CURDIR)/var/screenshots $(BIN)/python -m pytest -q -p no:cacheprovider \
		tests/e2e/test_console.py -k two_approvers
	@ls var/screenshots

lint: $(STAMP)
	$(BIN)/ruff check proxy adapters tests bench
	$(BIN)/ruff format --check proxy adapters tests bench
	$(BIN)/mypy proxy adapters

fmt: $(STAMP)
	$(BIN)/ruff format proxy adapters tests bench
	$(BIN)/ruff check --fix proxy adapters tests bench

clean:
	rm -rf $(VENV) var .pytest_cache

bench: $(STAMP) services wrk
	$(BIN)/python -m bench.decision
	$(BIN)/python -m bench.growth
	$(BIN)/python -m bench.store
	$(BIN)/python -m bench.load
	$(BIN)/python -m bench.cards

# The money invariant under kill -9 and a database crash, across a fleet (about 4 minutes).
chaos: $(STAMP) services
	$(BIN)/python -m bench.chaos

# Where an allowed payment's time goes (py-spy samples the sidecar under wrk; needs root or CAP_SYS_PTRACE).
profile: $(STAMP) wrk
	test -x $(BIN)/py-spy || $(BIN)/python -m pip install -q py-spy
	$(BIN)/python -m bench.profile
