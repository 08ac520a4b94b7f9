# Constellation. `make run` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages: bubblewrap sandboxes research code; chromium runs the browser tests;
# postgresql gives the store's tests a real server (they start their own; none is started here).
APT_PACKAGES := bubblewrap chromium postgresql
# The tests' volunteer nodes run as volunteers do: as an unprivileged user, from a venv of
# the system's Python of the head's minor version (python3.X and python3.X-venv).
PY_MINOR := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')

.PHONY: run test test-fast install system-deps bench bench-smoke bench-scaling clean

run: install
	$(BIN)/python -m engine serve

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

install: system-deps $(STAMP)

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	touch $(STAMP)

system-deps:
	@missing=""; \
	command -v bwrap >/dev/null || missing="$$missing bubblewrap"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	/usr/bin/python$(PY_MINOR) -c 'import ensurepip' >/dev/null 2>&1 || missing="$$missing python$(PY_MINOR) python$(PY_MINOR)-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

# The full benchmark (several minutes); writes bench/results/latest.json and latest.png.
bench: install
	$(BIN)/python -m bench

# A tiny run (under 60 s) that only checks the benchmark works; `make test` runs it too.
bench-smoke: install
	$(BIN)/python -m bench --smoke --output test-artifacts/bench

# How many volunteer cores one head can feed: store ingestion (SQLite, PostgreSQL) and the
# dispatcher's cost per batch (a few minutes); writes bench/results/scaling.json.
bench-scaling: install
	$(BIN)/python -m bench.scaling

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts
