# Two commands for a fresh CPU machine: `make demo` and `make test` (see README.md).
# Both create .venv if needed and install the project into it. On CPU, torch is pinned to the
# 2.13.0 CPU wheel; on a GPU cluster install your CUDA torch first (README, "Installing").

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CPU ?= torch==2.13.0
DATA ?= ../shared/data
DEMO := runs/demo
STAMP := $(VENV)/.installed
# Experiments are data (experiments/*.yaml, run by `janus-finetune experiment run NAME`; every
# step leaves a done-file under runs/, so rerunning continues; docs/experiments.md).
FINETUNE := $(BIN)/janus-finetune --data-root $(DATA)
EXPERIMENT := $(FINETUNE) experiment run

export OMP_NUM_THREADS ?= 1
export WANDB_MODE ?= offline

.PHONY: install test demo results ablations ablations-protocol research glge-results gpu-wheels clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_CPU)
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q --durations=15 tests

demo: install
	mkdir -p $(DEMO)
	cp $(DATA)/nmt/multi30k/train.en $(DEMO)/captions.txt
	$(BIN)/janus-pretrain tokenizer train --input $(DEMO)/captions.txt --vocab-size 2000 \
		--output $(DEMO)/tokenizer.model
	$(BIN)/janus-pretrain data prepare --input $(DEMO)/captions.txt \
		--tokenizer $(DEMO)/tokenizer.model --output $(DEMO)/data --workers 2
	rm -rf $(DEMO)/train
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/deepspeed --num_gpus 2 --no_local_rank \
		--master_port $$($(BIN)/python -c 'from janus_pretrain.parallel.state import free_port; print(free_port())') \
		--module janus_pretrain.cli train --config configs/pretrain/captions_demo.yaml
	$(BIN)/python -m janus_pretrain.showcase --checkpoint $(DEMO)/train \
		--input $(DATA)/nmt/multi30k/val.en --count 6

results: install
	$(EXPERIMENT) multi30k

ablations: install
	$(EXPERIMENT) multi30k_ablations

ablations-protocol: install
	$(EXPERIMENT) multi30k_protocol

research: install
	$(EXPERIMENT) multi30k_from_ar && $(EXPERIMENT) multi30k_3k

glge-results: install
	$(EXPERIMENT) glge

# What the one-GPU run carries (.whl/, .gpu_data/; docs/gpu.md).
gpu-wheels:
	bash slurm/gpu_wheels.sh $(DATA)

clean:
	rm -rf runs
