# Two commands: `make demo` (set-up + the main job) and `make test` (set-up + the test suite).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: setup demo test
setup: $(VENV)/.installed

# torch's CPU wheel and triton come from this machine's pip configuration (see README: Installation).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: setup
	bash launch/pretrain.sh +experiment=cpu_demo

test: setup
	$(PY) -m pytest -q tests
