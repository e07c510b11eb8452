# Warmstart: `make run` and `make test` do all set-up on a fresh machine with Python 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

CHROMIUM := /usr/bin/chromium
PROMTOOL := /usr/bin/promtool

.PHONY: run test lint format check bench venv browser promtool

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# Browser tests drive the distribution's Chromium through Playwright (Playwright cannot download
# its own browsers here). Installed with apt when missing: as root, or through sudo.
browser:
	@test -x $(CHROMIUM) || { \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
		echo "Installing chromium for the browser tests (apt)"; \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium; \
	}

# The Prometheus tests check a live /metrics scrape and the shipped rules (docs/prometheus/) with
# promtool, from Debian's prometheus package. Installed with apt when missing, like Chromium.
# On a machine run by systemd the package also enables a Prometheus server on :9090
# (`systemctl disable --now prometheus` if you do not want it); in containers nothing starts.
promtool:
	@test -x $(PROMTOOL) || { \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
		echo "Installing prometheus for promtool (apt)"; \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends prometheus; \
	}

run: venv
	$(BIN)/python -m config.launcher

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: venv lint browser promtool
	$(BIN)/python -m pytest

bench: venv
	$(BIN)/python -m benchmarks --quick --json
