# `make demo` trains a demo run (launch/demo.sh says which) and `make test` runs the suite; both create .venv
# when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint clean gpu-check

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash launch/demo.sh

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -n 2 --dist loadfile -q --durations=15

lint: $(VENV)/.installed
	$(PY) -m ruff check .

# One-GPU acceptance check (no network, no venv: the machine's python3 with torch; tests/gpu_check/).
gpu-check:
	PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" "$(PYTHON)" -m tests.gpu_check

clean:
	rm -rf runs/demo runs/try .pytest_cache .ruff_cache
