# cryptfs — the two commands: `make demo` and `make test` (both do all set-up themselves).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: test demo demo-stop install system-deps lint clean bench

system-deps:
	@if command -v apt-get >/dev/null 2>&1; then \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    fuse3 libfuse3-dev pkg-config rsync gcc python3-dev systemd >/dev/null; \
	else echo "non-Debian system: install fuse3, libfuse3-dev, pkg-config, rsync yourself"; fi

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# the official AWS S3 Encryption Client, the tests' oracle for its objects, pins an older
# cryptography than cryptfs runs on: it gets a venv of its own (tests/s3ec_oracle.py)
ORACLE  ?= .venv-oracle
$(ORACLE)/.installed:
	$(PY) -m venv $(ORACLE)
	$(ORACLE)/bin/pip install -q 'amazon-s3-encryption-client-python>=4.0'
	touch $@

install: system-deps $(BIN)/python $(ORACLE)/.installed
	$(BIN)/pip install -q -e '.[test]'

lint: install
	$(BIN)/ruff check cryptfs tests
	$(BIN)/ruff format --check cryptfs tests
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -p no:cacheprovider tests

bench: install
	@if ! command -v rclone >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rclone >/dev/null; fi
	@if ! command -v s3fs >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq s3fs >/dev/null; fi
	$(BIN)/python benchmarks/bench.py

demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh start

demo-stop:
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh stop

clean:
	rm -rf $(VENV) $(ORACLE) .demo *.egg-info
