# The two commands of the README. Both set up .venv themselves on a fresh machine.
#   make run    install, then run the main job on the embedded default model
#   make test   install test tools, then lint, type-check and run every test (slow ones too)
VENV := .venv/bin
MODEL ?= embedded:qwen2.5-coder-0.5b-instruct
LAYER ?= 8
RUN ?= runs/default

.PHONY: install install-test run test lint bench

install:
	bash scripts/install.sh

install-test:
	bash scripts/install.sh --test

SOURCES := --source benign --source harmbench --source jailbreak-wild --limit 64

run: install
	$(VENV)/steerlex info $(MODEL)
	$(VENV)/steerlex harvest --model $(MODEL) --layer $(LAYER) $(SOURCES) --split train --out $(RUN)/acts-train
	$(VENV)/steerlex harvest --model $(MODEL) --layer $(LAYER) $(SOURCES) --split heldout --out $(RUN)/acts-heldout
	$(VENV)/steerlex train-sae --activations $(RUN)/acts-train --out $(RUN)/sae --d-sae 2048 --k 32 \
		--tokens 131072 --lr 2e-3 --warmup-steps 25
	$(VENV)/steerlex eval-sae --sae $(RUN)/sae --activations $(RUN)/acts-heldout --max-lm-texts 16

lint:
	$(VENV)/ruff check src tests benchmarks
	$(VENV)/ruff format --check src tests benchmarks
	$(VENV)/mypy

test: install-test lint
	$(VENV)/pytest -q -m "slow or not slow"

bench: install
	$(VENV)/python benchmarks/harvest_throughput.py
