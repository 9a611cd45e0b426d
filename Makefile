# adapterctl: `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.install-stamp
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

.PHONY: help install test test-all lint bench

help: ## List the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-14s %s\n", $$1, $$2}'

install: $(STAMP) ## Create .venv (when missing) and install adapterctl with its dev and export extras

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,export]'
	@touch $(STAMP)

test: install ## The fast test suite (what CI runs)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: install ## Every test, the slow ones (distributed runs, training to a target) too
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install ## ruff
	$(VENV)/bin/ruff check adapterctl tests

bench: install ## ViT-Adapter-T vs plain ViT-T at 512x512 (forward, forward+backward, ratio, GFLOP/s)
	$(VENV)/bin/adapterctl bench --size t --input 512
