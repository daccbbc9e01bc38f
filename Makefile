# Two commands for a newcomer: `make demo` and `make test`.
# Both create (or reuse) the virtualenv in $(VENV) and install what they need.
# TORCH_SPEC pins the CPU wheel that lies on this kind of machine's disk, so that pip does not
# pull a multi-GB CUDA build; on a GPU node, `make TORCH_SPEC=torch ...` or install torch first.

VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vsad-installed
DEMO_DIR ?= runs/demo

.PHONY: demo test lint format install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,faiss]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m vsad_lightning.cli.demo --out $(DEMO_DIR)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
