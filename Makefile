# otelspans: build, install, test, benchmark and demo.
#
# Everything a fresh Debian bookworm machine needs is installed from here (as root):
# PostgreSQL 15 with its server headers, Debian's Python 3 (whose libpython the extension
# embeds) and a virtual environment readable by the postgres OS user.

VENV ?= /opt/otelspans/venv
PY := $(VENV)/bin/python
PG_CONFIG ?= /usr/lib/postgresql/15/bin/pg_config
SYSTEM_PYTHON := /usr/bin/python3
APT_PACKAGES := postgresql-15 postgresql-server-dev-15 python3-dev python3-venv libpython3.11-dev \
	gcc make libpostgresql-jdbc-java
# The JDBC test compiles a small Java program: any JDK will do, Debian's default if none.
JDK_PACKAGE := default-jdk-headless
PYTEST_ARGS ?=

.PHONY: all install deps venv python-package ext ext-install test lint bench demo demo-stop clean

all: ext

install: deps python-package ext-install

# apt only when something is missing, so that `make install` is cheap and idempotent.
deps:
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	command -v javac >/dev/null 2>&1 || missing="$$missing $(JDK_PACKAGE)"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(PY):
	$(SYSTEM_PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

venv: deps $(PY)

# A regular (not editable) install: the backend runs as postgres and must not depend on
# the checkout's location or permissions.
python-package: venv
	$(PY) -m pip install --quiet --upgrade '.[test]'
	chmod -R a+rX $(VENV)

ext: deps
	$(MAKE) -C ext PG_CONFIG=$(PG_CONFIG) OTELSPANS_VENV=$(VENV)

ext-install: ext
	$(MAKE) -C ext PG_CONFIG=$(PG_CONFIG) OTELSPANS_VENV=$(VENV) install

lint: venv
	$(PY) -m ruff check otelspans_fdw tests bench compat
	$(PY) -m ruff format --check otelspans_fdw tests bench compat

test: install lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) bench/run_all.py

clean:
	$(MAKE) -C ext clean

demo: install
	$(PY) -m otelspans_fdw.demo start

demo-stop:
	$(PY) -m otelspans_fdw.demo stop
