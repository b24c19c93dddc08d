# The two commands of the project: `make demo` and `make test` (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: setup test test-all lint demo checkpoints clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e '.[test]'
	touch $@

test: setup
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest

test-all: setup
	$(VENV)/bin/pytest -m 'not gpu'

lint: setup
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/lint-imports

demo: setup
	$(VENV)/bin/avlink demo

# Trains everything the embedded default ships, from scratch on SyncBench, into checkpoints/tiny/.
checkpoints: setup
	$(VENV)/bin/avlink recipe --out checkpoints/tiny --work runs/recipe

clean:
	rm -rf $(VENV) outputs
