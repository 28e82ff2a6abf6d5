# kvlab: `make test` and `make report` set everything up on a fresh machine (venv, dependencies, model and data).
# `make lab` starts JupyterLab in notebooks/ with the `kvlab` kernel (PORT=8888 by default; a busy port is replaced).
# With an active conda env made from environment.yml (CONDA_PREFIX set, not "base"), that env is used instead of .venv.

ifneq ($(filter-out ,$(CONDA_PREFIX)),)
ifneq ($(CONDA_DEFAULT_ENV),base)
ENV_DIR := $(CONDA_PREFIX)
endif
endif
ENV_DIR ?= .venv
PY := $(ENV_DIR)/bin/python
STAMP := $(ENV_DIR)/.kvlab-installed
QUICK ?=
JOBS ?=
PORT ?= 8888

.PHONY: setup lab-setup fetch test report lab clean-reports

setup: $(STAMP) lab-setup fetch

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(ENV_DIR)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

# the `kvlab` kernel (this env's python) and the repo's JupyterLab defaults (jupyter/overrides.d/kvlab.json)
lab-setup: $(STAMP)
	@$(PY) -m kvlab.lab check 2>/dev/null || $(PY) -m kvlab.lab setup

fetch: $(STAMP)
	$(PY) -m kvlab.cli fetch

test: setup
	$(PY) -m pytest -q

report: setup
	$(PY) -m kvlab.cli report $(if $(QUICK),--quick,) $(if $(JOBS),--jobs $(JOBS),)

lab: setup
	$(PY) -m kvlab.cli lab --port $(PORT)

clean-reports:
	rm -rf reports
