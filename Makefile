# The two commands that matter: `make demo` (main job) and `make test` (the test suite).
# Both set up everything on a fresh machine (Python 3.11, pip and gcc are enough).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo up test bench lint clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/lookalike demo

up: install
	$(VENV)/bin/lookalike up

test: install
	$(PY) -m pytest -ra

bench: install
	$(PY) -m bench --json

clean:
	rm -rf $(VENV) data test-output .pytest_cache
