# kvlab: `make test` and `make report` set everything up on a fresh machine (venv, dependencies, model and data).
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

.PHONY: setup fetch test report clean-reports

setup: $(STAMP) fetch

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(ENV_DIR)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

fetch: $(STAMP)
	$(PY) -m kvlab.cli fetch

test: setup
	$(PY) -m pytest -q

report: setup
	$(PY) -m kvlab.cli report $(if $(QUICK),--quick,) $(if $(JOBS),--jobs $(JOBS),)

clean-reports:
	rm -rf reports
