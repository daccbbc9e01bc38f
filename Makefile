# Two commands for a newcomer: `make demo` and `make test`.
# Both create (or reuse) the virtualenv in $(VENV) and install what they need.
# torch is installed first, the build that fits the machine (README "Install"):
# - TORCH_SPEC: the version the test suite is run with.
# - TORCH_INDEX: where pip looks for it. Where `nvidia-smi` runs, empty: PyPI, whose Linux wheel
#   is the CUDA build. Elsewhere PyTorch's CPU-only index: a ~190 MB wheel instead of PyPI's
#   CUDA build (~550 MB plus several GB of nvidia-* packages). Override either, e.g.
#   `make TORCH_INDEX=https://download.pytorch.org/whl/cu126 demo` for a given CUDA version.
#   pip's own configuration (find-links, extra indexes) still applies, so a wheel on local disk
#   that matches TORCH_SPEC is used as well. --no-deps: torch's own dependencies come with the
#   project's install from the usual index (one look-up of TORCH_INDEX, not one per package).
#   A torch already in the virtualenv is kept.

VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
CPU_TORCH_INDEX := https://download.pytorch.org/whl/cpu
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,$(CPU_TORCH_INDEX))
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vsad-installed
DEMO_DIR ?= runs/demo
# Two pytest workers (pytest-xdist), one test file each at a time: most tests wait on console
# scripts that start in ~10 s of imports, so two workers halve the suite on 2 cores (measured
# 22 min 41 s serial, 12 min 27 s with these). Whole files keep each file's fitted-run fixtures
# and the SLURM cluster in one worker. `make test PYTEST_WORKERS=` runs serially.
PYTEST_WORKERS ?= -n 2 --dist loadfile

.PHONY: demo test lint format install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || \
		$(PY) -m pip install -q --no-deps "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
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
	$(PY) -m pytest -q $(PYTEST_WORKERS) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
