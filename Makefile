# Targets named in README.md. `make train` and `make test` set up what they need themselves: the
# venv when it is missing or older than the dependency files, and Debian's data packages when
# missing (installed when root with apt, otherwise one line naming the command).
# VENV and TORCH can be overridden, e.g. on a CUDA cluster:
#   make setup TORCH="torch==2.13.0+cu128" PIP_EXTRA="--extra-index-url <your torch index>"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PIP_EXTRA ?=
PY := $(VENV)/bin/python
DATA_PACKAGES := python3.11-doc dataset-fashion-mnist
TEST_PACKAGES := slurmctld slurmd slurm-client munge

.PHONY: setup system-deps data-deps test test-fast lint train train-vit tokenizer data clean

setup: $(VENV)/.installed  ## .venv with torch, DeepSpeed and the rest, and moge_ds installed editable

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_EXTRA) "$(TORCH)"
	$(PY) -m pip install -q $(PIP_EXTRA) -r requirements.txt
	touch $@

system-deps:  ## Debian packages: the default data; Slurm + munge for the launcher tests (needs root)
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DATA_PACKAGES) $(TEST_PACKAGES)

data-deps:  ## the default corpus and images (Debian packages), installed if missing and possible
	@if [ ! -d /usr/share/doc/python3.11/html/_sources ] || [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then $(MAKE) --no-print-directory system-deps; \
	  else echo "missing Debian data packages: run 'sudo make system-deps' (or apt-get install $(DATA_PACKAGES))" >&2; \
	    exit 2; fi; fi

test: setup data-deps lint  ## the whole suite, 2-rank launches included
	$(PY) -m pytest -q --durations=25 tests

test-fast: setup  ## unit tests only
	$(PY) -m pytest -q -m "not slow" tests

lint: setup  ## ruff: pyflakes + pycodestyle
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache

DS_CONFIG ?= ds_configs/cpu.json
NPROC ?= 2
ARGS ?=

tokenizer: tokenizers/pydoc8k.model  ## sentencepiece model on the Python docs (default corpus)
tokenizers/pydoc8k.model: | setup data-deps
	$(PY) -m moge_ds.data.tokenizer train --model-prefix tokenizers/pydoc8k --vocab-size 8000

data: data/pydoc.idx  ## the default corpus as a megatron-core indexed dataset
data/pydoc.idx: tokenizers/pydoc8k.model
	$(PY) -m moge_ds.data.preprocess --tokenizer tokenizers/pydoc8k.model --output-prefix data/pydoc

train: setup data-deps data  ## the main job: GPT-MoGE on the Python docs, NPROC ranks
	launch/train.sh --nproc $(NPROC) --preset gpt_tiny --ds-config $(DS_CONFIG) -- $(ARGS)

train-vit: setup data-deps  ## ViT-MoGE on Fashion-MNIST, NPROC ranks
	launch/train.sh --nproc $(NPROC) --preset vit_fmnist --ds-config $(DS_CONFIG) -- $(ARGS)

train-hf: setup data-deps data  ## a tiny Hugging Face Mixtral with MoGE under AutoEP + ZeRO-3, 2 ranks
	launch/train.sh --nproc 2 --preset mixtral_tiny --ds-config ds_configs/autoep_zero3_cpu.json -- $(ARGS)
