# The commands a newcomer needs:
#   make run        install into .venv and start the node with embedded defaults
#   make test       install system peers and Python deps, then run the whole test suite
#   make test-fast  the quick tests: nothing marked e2e, production, slow or ohif (< 2 minutes)
#   make lint       ruff, formatting, mypy and the import contracts (scripts/check.sh)

VENV ?= .venv
PYTHON ?= python3
FAST_TESTS ?= not e2e and not production and not slow and not ohif

.PHONY: run test test-fast install system-deps lint bench

run: install
	$(VENV)/bin/curia-node run

test: system-deps install
	$(VENV)/bin/python -m pytest

test-fast: system-deps install
	$(VENV)/bin/python -m pytest -m "$(FAST_TESTS)"

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml scripts/bootstrap.sh
	PYTHON=$(PYTHON) VENV=$(VENV) scripts/bootstrap.sh
	touch $@

system-deps:
	scripts/system-deps.sh

lint: install
	VENV=$(VENV) scripts/check.sh
