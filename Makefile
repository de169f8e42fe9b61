# pipemon: `make run` starts the stack with demo traffic, `make test` runs every test.
# Both install what they need first: Debian packages (as root or with sudo) and a virtualenv in .venv.

VENV        ?= .venv
PYTHON      ?= python3
BIN         := $(VENV)/bin
APT_PACKAGES := prometheus prometheus-alertmanager prometheus-pushgateway docker-compose wrk
# only for the tests and `make run-ha` (PostgreSQL, VictoriaMetrics): the Quick start's `make run` installs no database server
TEST_APT_PACKAGES := postgresql chromium chromium-driver victoria-metrics
SUDO        := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install system-packages test-packages tool-venvs run run-ha serve test test-quick lint bench render clean

install: system-packages $(VENV)/.installed

# $(call apt_install,packages): install the Debian packages of the list that are missing
define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
endef

system-packages:
	$(call apt_install,$(APT_PACKAGES))

test-packages:
	$(call apt_install,$(TEST_APT_PACKAGES))

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,fast]'
	touch $@

# Airflow, dbt and Dagster for tests/integrations, each in its own virtualenv cached outside the checkout
# (~/.cache/pipemon/venvs, keyed by a hash of tests/integrations/requirements/*.txt): cold ~1.5 min, then ~0 s.
tool-venvs: install
	$(BIN)/python tests/integrations/toolvenvs.py

run: install
	$(BIN)/pipemon stack --demo

run-ha: install test-packages
	$(BIN)/pipemon stack --ha --demo

serve: install
	$(BIN)/pipemon serve --registry pipelines.yaml --state-dir pipemon-state

lint: install
	$(BIN)/ruff check .

test: install test-packages lint tool-venvs
	$(BIN)/pytest -q -p no:cacheprovider

test-quick: install test-packages
	$(BIN)/pytest -q -m 'not slow and not fault and not integration'

bench: install
	$(BIN)/python bench/bench.py

render: install
	$(BIN)/pipemon render-rules
	$(BIN)/pipemon render-alertmanager
	$(BIN)/python grafana/generate.py

clean:
	rm -rf $(VENV) pipemon-state .pytest_cache
