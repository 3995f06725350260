# Thin wrappers over scripts/; the scripts are the source of truth.
.PHONY: setup check test demo

VENV := .venv/bin

setup:
	bash scripts/setup

check: setup
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .
	$(VENV)/mypy
	$(VENV)/lint-imports

test:
	bash scripts/test $(PYTEST_ARGS)

demo:
	bash scripts/demo
