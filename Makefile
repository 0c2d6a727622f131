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
# `make results`: Multi30k en->de from scratch, every system the tiny model trained for the same
# number of updates of 4096-token batches with in-loop validation (checkpoints/best by validation
# BLEU only), then evaluated on test_2016_flickr and compared (docs/results/multi30k_ende.*).
# Systems: ar, cmlm (no KD), cmlm_kd (on training targets distilled by the ar run), janus, and
# janus_selfkd (the janus run continued on targets its own AR manner distilled).
# `make results` starts from scratch; `make results-resume` continues an interrupted build.
RESULTS := docs/results
RESULTS_RUN := runs/results
RESULTS_UPDATES ?= 1200
RESULTS_SELFKD_UPDATES ?= 300
RESULTS_EVAL_INTERVAL ?= 100
# A smoke run of the whole pipeline: RESULTS_LIMIT=N distills and evaluates the first N pairs only.
RESULTS_LIMIT ?=
RESULTS_CONFIG := model=tiny data.max_tokens=4096 train.steps=$(RESULTS_UPDATES) \
	train.save_interval=$(RESULTS_EVAL_INTERVAL) train.eval_interval=$(RESULTS_EVAL_INTERVAL) \
	train.keep_checkpoints=2 train.log_interval=50 optim.warmup_steps=100 optim.lr=1e-3
SELFKD_CONFIG := model=tiny data.max_tokens=4096 train.steps=$(RESULTS_SELFKD_UPDATES) \
	train.save_interval=$(RESULTS_EVAL_INTERVAL) train.eval_interval=$(RESULTS_EVAL_INTERVAL) \
	train.keep_checkpoints=2 train.log_interval=50 optim.warmup_steps=30
LIMIT_PAIRS := $(if $(RESULTS_LIMIT),--max-pairs $(RESULTS_LIMIT))
FINETUNE := $(BIN)/janus-finetune --data-root $(DATA)
M30K := --task multi30k_ende
R := $(RESULTS_RUN)
SYSTEMS := ar cmlm cmlm_kd janus janus_selfkd
# `make ablations` (after `make results`): janus without the KL(AR, .) terms, janus with a linear
# KL warm-up over a quarter of the updates (ours, not the authors'), and janus with the exact-ratio
# mask sampler instead of the authors'; same budget, added to the same report.
ABLATIONS := janus_no_ar_kl janus_kl_warmup janus_exact_mask
ABLATION_janus_no_ar_kl := objective.weights.kl_ar_nar=0 objective.weights.kl_ar_aux=0
RESULTS_KL_WARMUP ?= 300
ABLATION_janus_kl_warmup := objective.kl_warmup_steps=$(RESULTS_KL_WARMUP)
ABLATION_janus_exact_mask := objective.mask_sampler=exact
# Each step appends "<name> <seconds>" here; the report sums them.
TIMES := $(R)/seconds.txt
timed = start=$$(date +%s) && $(1) && echo "$(2) $$(( $$(date +%s) - start ))" >> $(TIMES)

export OMP_NUM_THREADS ?= 1
export WANDB_MODE ?= offline

.PHONY: install test demo results results-resume ablations report clean

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
	$(BIN)/python -m janus_pretrain.generate.showcase --checkpoint $(DEMO)/train \
		--input $(DATA)/pretrain/enwiki/valid.txt --count 4

results: install
	rm -rf $(R) $(RESULTS)/multi30k_ende.*
	$(MAKE) results-resume

results-resume: install $(SYSTEMS:%=$(RESULTS)/multi30k_ende.%.json)
	$(MAKE) report

ablations: install $(SYSTEMS:%=$(RESULTS)/multi30k_ende.%.json) \
		$(ABLATIONS:%=$(RESULTS)/multi30k_ende.%.json)
	$(MAKE) report

# the report over every system evaluated so far (the ablations' rows once they exist)
report:
	$(FINETUNE) compare --output-dir $(RESULTS) \
		--results $(wildcard $(patsubst %,$(RESULTS)/multi30k_ende.%.json,$(SYSTEMS) $(ABLATIONS))) \
		--note "command: make results (Makefile): every system the tiny model, $(RESULTS_UPDATES) updates of data.max_tokens=4096 (janus_selfkd: the janus run + $(RESULTS_SELFKD_UPDATES) updates on self-distilled targets), configs/finetune/<system>.yaml with: $(RESULTS_CONFIG)" \
		--note "from scratch, tokenizer: 8k sentencepiece on Multi30k train en+de; the checkpoint of each run is the best by in-loop validation BLEU (first 200 val pairs; AR greedy where the system trains AR, else NAR T=4), never by test; test: test_2016_flickr (1,000)" \
		--note "distillation: AR beam 5 of the ar run (cmlm_kd) and of the janus run (janus_selfkd) over the 29,000 training sources" \
		--note "ablations (make ablations, same budget, configs/finetune/janus.yaml with): $(foreach a,$(ABLATIONS),$(a): $(ABLATION_$(a));)" \
		--note "wall time: $$(awk '{s += $$2} END {print s}' $(TIMES)) s in all ($$(tr '\n' ' ' < $(TIMES))), OMP_NUM_THREADS=$(OMP_NUM_THREADS), a 2-core machine shared with other jobs"

$(R)/data/pairs.json:
	mkdir -p $(R)
	$(call timed,$(FINETUNE) prepare $(M30K) --output $(R)/data --vocab-size 8000,prepare)

# from scratch: <system> trained with configs/finetune/<preset>.yaml on <data> [with overrides]
define train_rule
$(R)/$(1)/done: $(R)/$(3)/pairs.json
	rm -rf $(R)/$(1)
	$$(call timed,$(FINETUNE) train $(M30K) --data $(R)/$(3) --config configs/finetune/$(2).yaml \
		$(RESULTS_CONFIG) $(4) train.output_dir=$(R)/$(1) train.wandb_name=results-$(1),$(1))
	touch $$@
endef
$(eval $(call train_rule,ar,ar,data))
$(eval $(call train_rule,cmlm,cmlm,data))
$(eval $(call train_rule,janus,janus,data))
$(eval $(call train_rule,cmlm_kd,cmlm,data_kd_ar))
$(foreach a,$(ABLATIONS),$(eval $(call train_rule,$(a),janus,data,$(ABLATION_$(a)))))

# training targets distilled by <teacher>'s AR manner (beam 5), with the original tokenizer
$(R)/data_kd_%/pairs.json: $(R)/%/done
	rm -rf $(R)/data_kd_$*
	$(call timed,$(FINETUNE) distill $(M30K) --teacher $(R)/$*/checkpoints/best \
		--output $(R)/distill_$* $(LIMIT_PAIRS),distill_$*)
	$(FINETUNE) prepare $(M30K) --distilled $(R)/distill_$* --tokenizer $(R)/data/tokenizer.model \
		--output $(R)/data_kd_$* $(LIMIT_PAIRS)

$(R)/janus_selfkd/done: $(R)/data_kd_janus/pairs.json
	rm -rf $(R)/janus_selfkd
	$(call timed,$(FINETUNE) train $(M30K) --data $(R)/data_kd_janus \
		--config configs/finetune/janus_selfkd.yaml --init-from $(R)/janus/checkpoints/best \
		$(SELFKD_CONFIG) train.output_dir=$(R)/janus_selfkd train.wandb_name=results-janus_selfkd,janus_selfkd)
	touch $@

$(RESULTS)/multi30k_ende.%.json: $(R)/%/done
	$(call timed,$(FINETUNE) evaluate $(M30K) --name $* --checkpoint $(R)/$*/checkpoints/best \
		--output $@ $(if $(RESULTS_LIMIT),--limit $(RESULTS_LIMIT)),evaluate_$*)

clean:
	rm -rf runs
