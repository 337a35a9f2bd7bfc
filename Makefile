# The two commands a newcomer needs:
#   make run    install into .venv and start the node with embedded defaults
#   make test   install system peers and Python deps, then run the whole test suite

VENV ?= .venv
PYTHON ?= python3

.PHONY: run test install system-deps lint bench

run: install
	$(VENV)/bin/curia-node run

test: system-deps install
	$(VENV)/bin/python -m pytest

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml scripts/bootstrap.sh
	PYTHON=$(PYTHON) VENV=$(VENV) scripts/bootstrap.sh
	touch $@

system-deps:
	scripts/system-deps.sh

lint: install
	$(VENV)/bin/ruff check node pipelines tests benchmarks
