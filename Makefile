# Targets named in README.md. VENV and TORCH can be overridden, e.g. on a CUDA cluster:
#   make setup TORCH="torch==2.13.0+cu128" PIP_EXTRA="--extra-index-url <your torch index>"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PIP_EXTRA ?=
PY := $(VENV)/bin/python

.PHONY: setup system-deps test test-fast train train-vit tokenizer data clean

system-deps:  ## Debian packages: default corpus and images; Slurm + munge for the launcher tests (needs root)
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11-doc dataset-fashion-mnist slurmctld slurmd slurm-client munge

setup:  ## .venv with torch, DeepSpeed and the rest, and moge_ds installed editable
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_EXTRA) "$(TORCH)"
	$(PY) -m pip install -q $(PIP_EXTRA) -r requirements.txt -e .

test:  ## the whole suite, 2-rank launches included
	$(PY) -m pytest -q tests

test-fast:  ## unit tests only
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf runs .pytest_cache

DS_CONFIG ?= ds_configs/cpu.json
NPROC ?= 2
ARGS ?=

tokenizer: tokenizers/pydoc8k.model  ## sentencepiece model on the Python docs (default corpus)
tokenizers/pydoc8k.model:
	$(PY) -m moge_ds.data.tokenizer train --model-prefix tokenizers/pydoc8k --vocab-size 8000

data: data/pydoc.idx  ## the default corpus as a megatron-core indexed dataset
data/pydoc.idx: tokenizers/pydoc8k.model
	$(PY) -m moge_ds.data.preprocess --tokenizer tokenizers/pydoc8k.model --output-prefix data/pydoc

train: data  ## the main job: GPT-MoGE on the Python docs, NPROC ranks
	$(VENV)/bin/deepspeed --num_gpus $(NPROC) --module moge_ds.train --config configs/gpt_tiny.yaml \
		--deepspeed_config $(DS_CONFIG) $(ARGS)

train-vit:  ## ViT-MoGE on Fashion-MNIST, NPROC ranks
	$(VENV)/bin/deepspeed --num_gpus $(NPROC) --module moge_ds.train --config configs/vit_fmnist.yaml \
		--deepspeed_config $(DS_CONFIG) $(ARGS)
