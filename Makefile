# Warmstart: `make run` and `make test` do all set-up on a fresh machine with Python 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

CHROMIUM := /usr/bin/chromium

.PHONY: run test lint format check bench venv browser

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

run: venv
	$(BIN)/python -m config.launcher

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: venv lint browser
	$(BIN)/python -m pytest

bench: venv
	$(BIN)/python -m benchmarks --quick --json
