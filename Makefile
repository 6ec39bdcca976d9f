# The two commands of the README. Both set up .venv themselves on a fresh machine.
#   make run    install, then run the main job on the embedded default model
#   make test   install test tools, then lint, type-check and run every test (slow ones too)
VENV := .venv/bin
# runs/<name>/report.html is the result (name: the profile's, default or quick, unless
# NAME=... is given); PROFILE=quick runs the small model in minutes.
NAME ?=
PROFILE ?= default

.PHONY: install install-test run test lint bench

install:
	bash scripts/install.sh

install-test:
	bash scripts/install.sh --test

run: install
	$(VENV)/steerlex run --profile $(PROFILE) $(if $(NAME),--name $(NAME))

lint:
	$(VENV)/ruff check src tests benchmarks
	$(VENV)/ruff format --check src tests benchmarks
	$(VENV)/mypy

test: install-test lint
	$(VENV)/pytest -q -m "slow or not slow"

bench: install
	$(VENV)/python benchmarks/harvest_throughput.py
