# The two commands of the README:  `make repro` (default pipeline)  and  `make test` (test suite).
# Each creates its own virtual environment in .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: repro test install clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet '.[test]'
	touch $(STAMP)

repro: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc repro

test: $(STAMP)
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
