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
# `make results`: janus, ar and cmlm fine-tuned on Multi30k en->de from scratch with one model
# size and step budget on CPU (~25 min on 2 cores), evaluated AR and NAR, compared.
RESULTS := docs/results
RESULTS_RUN := runs/results
RESULTS_STEPS ?= 600
RESULTS_CONFIG := model=tiny train.steps=$(RESULTS_STEPS) train.save_interval=200 \
	train.keep_checkpoints=3 train.log_interval=50 optim.warmup_steps=60 optim.lr=1e-3 \
	data.micro_batch_size=32

export OMP_NUM_THREADS ?= 1
export WANDB_MODE ?= offline

.PHONY: install test demo results clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_CPU)
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q tests

demo: install
	$(BIN)/janus-pretrain tokenizer train --input $(DATA)/pretrain/enwiki/train.txt \
		--max-sentences 20000 --vocab-size 8000 --output $(DEMO)/tokenizer.model
	$(BIN)/janus-pretrain data prepare --input $(DATA)/pretrain/enwiki/train.txt \
		--tokenizer $(DEMO)/tokenizer.model --output $(DEMO)/data --workers 2
	rm -rf $(DEMO)/train
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/deepspeed --num_gpus 2 --no_local_rank \
		--master_port $$($(BIN)/python -c 'from janus_pretrain.parallel.state import free_port; print(free_port())') \
		--module janus_pretrain.cli train --config configs/pretrain/demo.yaml

results: install
	start=$$(date +%s) && \
	$(BIN)/janus-finetune --data-root $(DATA) prepare --task multi30k_ende \
		--output $(RESULTS_RUN)/data --vocab-size 8000 && \
	for preset in janus ar cmlm; do \
		rm -rf $(RESULTS_RUN)/$$preset && \
		$(BIN)/janus-finetune --data-root $(DATA) train --task multi30k_ende \
			--data $(RESULTS_RUN)/data --config configs/finetune/$$preset.yaml \
			$(RESULTS_CONFIG) train.output_dir=$(RESULTS_RUN)/$$preset && \
		$(BIN)/janus-finetune --data-root $(DATA) evaluate --task multi30k_ende --name $$preset \
			--checkpoint $(RESULTS_RUN)/$$preset/checkpoints/best \
			--output $(RESULTS)/multi30k_ende.$$preset.json || exit 1; \
	done && \
	$(BIN)/janus-finetune compare --output-dir $(RESULTS) \
		--results $(RESULTS)/multi30k_ende.janus.json $(RESULTS)/multi30k_ende.ar.json \
		$(RESULTS)/multi30k_ende.cmlm.json \
		--note "command: make results (Makefile; configs/finetune/{janus,ar,cmlm}.yaml with: $(RESULTS_CONFIG))" \
		--note "from scratch, tokenizer: 8k sentencepiece on Multi30k train en+de; test: test_2016_flickr (1,000), best of the kept checkpoints by validation BLEU (200 val pairs, greedy)" \
		--note "wall time (prepare + 3 x train/select/evaluate): $$(( $$(date +%s) - start )) s, OMP_NUM_THREADS=$(OMP_NUM_THREADS), a 2-core machine shared with other jobs"

clean:
	rm -rf runs
