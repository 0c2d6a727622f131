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
# number of updates of 1024-token batches (~56 pairs) with in-loop validation (checkpoints/best by validation
# BLEU only), then evaluated on test_2016_flickr and compared (docs/results/multi30k_ende.*).
# Systems: ar, cmlm (no KD), cmlm_kd (on training targets distilled by the ar run), janus, and
# janus_selfkd (the janus run continued on targets its own AR manner distilled).
# `make results` starts from scratch; `make results-resume` continues an interrupted build.
RESULTS := docs/results
RESULTS_RUN := runs/results
# At this scale updates teach more than tokens: 600 updates of 4096 tokens left ar at 9.5 BLEU,
# so the budget is 2,000 updates of 1024 tokens (fewer padded cells in all), at the presets'
# lr 5e-4 (square-root scaling of the 1e-3 used for 4096-token batches).
RESULTS_UPDATES ?= 2000
RESULTS_TOKENS ?= 1024
RESULTS_SELFKD_UPDATES ?= 500
RESULTS_EVAL_INTERVAL ?= 250
# A smoke run of the whole pipeline: RESULTS_LIMIT=N distills and evaluates the first N pairs only.
RESULTS_LIMIT ?=
RESULTS_CONFIG := model=tiny data.max_tokens=$(RESULTS_TOKENS) train.steps=$(RESULTS_UPDATES) \
	train.save_interval=$(RESULTS_EVAL_INTERVAL) train.eval_interval=$(RESULTS_EVAL_INTERVAL) \
	train.keep_checkpoints=2 train.log_interval=50 optim.warmup_steps=200 optim.lr=5e-4
SELFKD_CONFIG := model=tiny data.max_tokens=$(RESULTS_TOKENS) train.steps=$(RESULTS_SELFKD_UPDATES) \
	train.save_interval=$(RESULTS_EVAL_INTERVAL) train.eval_interval=$(RESULTS_EVAL_INTERVAL) \
	train.keep_checkpoints=2 train.log_interval=50 optim.warmup_steps=50
LIMIT_PAIRS := $(if $(RESULTS_LIMIT),--max-pairs $(RESULTS_LIMIT))
FINETUNE := $(BIN)/janus-finetune --data-root $(DATA)
M30K := --task multi30k_ende
R := $(RESULTS_RUN)
# One run at a time, 2 threads each: two 1-thread runs side by side were 3x slower per step on the
# 2-core machine. The order puts the ar-versus-janus comparison first.
SYSTEMS := ar janus cmlm cmlm_kd janus_selfkd
# `make ablations` (after `make results`): janus without the KL(AR, .) terms, janus with a linear
# KL warm-up over a quarter of the updates (ours, not the authors'), and janus with the exact-ratio
# mask sampler instead of the authors'; same budget, added to the same report.
# `make ablations-protocol`: the authors' training protocol where ours differs, one change at a
# time: janus and ar without gradient clipping (their fairseq runs set no --clip-norm; janus's
# gradient norm, 2-4, is clipped to 1 harder than ar's, 1-2), and janus with twice the updates
# (they trained JANUS for 200k updates against their AR baseline's 100k).
ABLATIONS := janus_no_ar_kl janus_kl_warmup janus_exact_mask
PROTOCOL := janus_no_clip ar_no_clip janus_2x
ABLATION_janus_no_ar_kl := objective.weights.kl_ar_nar=0 objective.weights.kl_ar_aux=0
RESULTS_KL_WARMUP ?= 500
ABLATION_janus_kl_warmup := objective.kl_warmup_steps=$(RESULTS_KL_WARMUP)
ABLATION_janus_exact_mask := objective.mask_sampler=exact
ABLATION_janus_no_clip := optim.clip_grad=0
ABLATION_ar_no_clip := optim.clip_grad=0
PRESET_ar_no_clip := ar
# `=`: the shell does the doubling only when a janus_2x rule expands it, not at every make call
ABLATION_janus_2x = train.steps=$(shell echo $$(( 2 * $(RESULTS_UPDATES) )))
# Each step appends "<name> <seconds>" here, beside the results it timed; the report sums them.
TIMES := $(RESULTS)/multi30k_ende.seconds.txt
timed = start=$$(date +%s) && $(1) && echo "$(2) $$(( $$(date +%s) - start ))" >> $(or $(3),$(TIMES))

export OMP_NUM_THREADS ?= 1
export WANDB_MODE ?= offline

.PHONY: install test demo results results-resume ablations ablations-protocol report glge-results clean

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

# the systems' results may come from an earlier session (docs/results is committed): ablations only
# need the prepared data, which `prepare` rebuilds with the same pieces and token ids
ablations: install $(ABLATIONS:%=$(RESULTS)/multi30k_ende.%.json)
	$(MAKE) report

ablations-protocol: install $(PROTOCOL:%=$(RESULTS)/multi30k_ende.%.json)
	$(MAKE) report

# the report over every system evaluated so far (the ablations' rows once they exist)
NOT_MEASURED = $(foreach s,$(SYSTEMS) $(ABLATIONS) $(PROTOCOL),$(if $(wildcard $(RESULTS)/multi30k_ende.$(s).json),,$(s)))
report:
	$(FINETUNE) compare --output-dir $(RESULTS) \
		--results $(wildcard $(patsubst %,$(RESULTS)/multi30k_ende.%.json,$(SYSTEMS) $(ABLATIONS) $(PROTOCOL))) \
		--note "command: make results (Makefile): every system the tiny model, $(RESULTS_UPDATES) updates of data.max_tokens=$(RESULTS_TOKENS) (janus_selfkd: the janus run + $(RESULTS_SELFKD_UPDATES) updates on self-distilled targets), configs/finetune/<system>.yaml with: $(RESULTS_CONFIG)" \
		--note "budget: $(RESULTS_UPDATES) updates of $(RESULTS_TOKENS)-token batches (an epoch of the 29,000 pairs is 518 batches of 1024 tokens, ~56 pairs each), chosen for make results' 100-minute target on 2 cores; no run has converged (see the validation curves); the wall times below are per make target, on a machine that other jobs sometimes shared" \
		$(if $(strip $(NOT_MEASURED)),--note "not measured in this build yet: $(strip $(NOT_MEASURED))") \
		--note "from scratch, tokenizer: 8k sentencepiece on Multi30k train en+de; the checkpoint of each run is the best by in-loop validation BLEU (first 200 val pairs; AR greedy where the system trains AR, else NAR T=4), never by test; test: test_2016_flickr (1,000)" \
		--note "distillation: AR beam 5 of the ar run (cmlm_kd) and of the janus run (janus_selfkd) over the 29,000 training sources; janus_selfkd's validation curve counts its own $(RESULTS_SELFKD_UPDATES) updates, which follow the janus run's $(RESULTS_UPDATES)" \
		--note "ablations (make ablations and make ablations-protocol, same budget unless stated, configs/finetune/<preset>.yaml with): $(foreach a,$(ABLATIONS) $(PROTOCOL),$(a): $(or $(PRESET_$(a)),janus) $(ABLATION_$(a));)" \
		--note "wall time: $$(awk '{s += $$2} END {print s}' $(TIMES)) s in all ($$(tr '\n' ' ' < $(TIMES))), OMP_NUM_THREADS=$(OMP_NUM_THREADS), a 2-core machine shared with other jobs"

$(R)/data/pairs.json:
	mkdir -p $(R) $(RESULTS)
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
$(foreach a,$(ABLATIONS) $(PROTOCOL),$(eval $(call train_rule,$(a),$(or $(PRESET_$(a)),janus),data,$(ABLATION_$(a)))))

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

# `make glge-results`: pretrain -> fine-tune at small scale. The tiny model is pretrained on the
# enwiki text for the same number of updates with JANUS (configs/pretrain/demo.yaml), BANG (N = 4,
# bang_demo.yaml) and AR-only denoising (ar_demo.yaml); each, and a from-scratch model, is then
# fine-tuned on squadqg_dev and aeslc for the same number of 2048-token updates, selected on
# validation, and evaluated on test in the manners its objective trained (docs/results/<task>.*).
# Fine-tuning runs -> (preset, pretraining, system name): BANG is fine-tuned twice, AR (main +
# one predicting stream) and NAR (one pass), both reported as system `bang`. Every step leaves a
# file behind: rerunning continues; `rm -rf runs/glge` starts afresh.
GLGE := runs/glge
GLGE_TASKS := squadqg_dev aeslc
GLGE_RUNS := janus bang_ar bang_nar ar scratch
# Sized to fit about 120 minutes on 2 cores at the step costs measured here (2 threads; JANUS
# pretraining 1.1-1.3 s/update of 8 x 128 packed tokens, BANG N = 4 about twice that): 600
# pretraining updates each; fine-tuning in 1024-token batches, since at this budget updates teach
# more than tokens (200 updates of 2048 tokens left JANUS's squadqg_dev outputs empty).
GLGE_PRETRAIN_UPDATES ?= 600
GLGE_FINETUNE_UPDATES ?= 600
GLGE_EVAL_INTERVAL ?= 200
# squadqg_dev's test split is 1,000 pairs; aeslc's first 500 of 1,960 keep its evaluations in budget
GLGE_TEST_PAIRS_squadqg_dev ?= 1000
GLGE_TEST_PAIRS_aeslc ?= 500
# A smoke run: GLGE_LIMIT=N keeps N pretraining paragraphs and evaluates the first N test pairs.
GLGE_LIMIT ?=
GLGE_PRESET_janus := demo
GLGE_PRESET_bang := bang_demo
GLGE_PRESET_ar := ar_demo
GLGE_PRETRAIN := data.train=$(GLGE)/data data.tokenizer=$(GLGE)/tokenizer.model \
	train.steps=$(GLGE_PRETRAIN_UPDATES) train.save_interval=$(GLGE_PRETRAIN_UPDATES) \
	parallel.deepspeed_config=configs/deepspeed/zero0.json
# aeslc's emails are cut at the tiny model's 256 positions
GLGE_FINETUNE = model=tiny data.max_tokens=1024 data.max_source_len=256 \
	train.steps=$(GLGE_FINETUNE_UPDATES) train.save_interval=$(GLGE_EVAL_INTERVAL) \
	train.eval_interval=$(GLGE_EVAL_INTERVAL) train.keep_checkpoints=2 train.log_interval=50 \
	optim.warmup_steps=60 optim.lr=1e-3
GLGE_TIMES := $(GLGE)/seconds.txt

glge-results: install $(foreach t,$(GLGE_TASKS),$(GLGE_RUNS:%=$(RESULTS)/$(t).%.json))
	$(foreach t,$(GLGE_TASKS),$(FINETUNE) compare --output-dir $(RESULTS) \
		--results $(GLGE_RUNS:%=$(RESULTS)/$(t).%.json) \
		--note "command: make glge-results (Makefile): the tiny model pretrained on enwiki (8k sentencepiece; 1,024-token packed batches) for $(GLGE_PRETRAIN_UPDATES) updates with JANUS, BANG (N = 4) or AR-only denoising (system janus, bang, ar), or not at all (scratch, fine-tuned with the JANUS loss); then $(GLGE_FINETUNE_UPDATES) fine-tuning updates with: $(GLGE_FINETUNE); test: the first $(or $(GLGE_LIMIT),$(GLGE_TEST_PAIRS_$(t))) pairs of the task's test split" \
		--note "fine-tuning presets: configs/finetune/janus.yaml (janus, scratch), bang_ar.yaml and bang_nar.yaml (bang, two fine-tunings), ar.yaml (ar); the checkpoint of each run is the best by in-loop validation (first 200 valid pairs), never by test" \
		--note "wall time: $$(awk '{s += $$2} END {print s}' $(GLGE_TIMES)) s in all ($$(tr '\n' ' ' < $(GLGE_TIMES))), OMP_NUM_THREADS=$(OMP_NUM_THREADS)" && ) true

$(GLGE)/tokenizer.model:
	mkdir -p $(GLGE)
	$(BIN)/janus-pretrain tokenizer train --input $(DATA)/pretrain/enwiki/train.txt \
		--max-sentences 20000 --vocab-size 8000 --output $@

$(GLGE)/data/meta.json: $(GLGE)/tokenizer.model
	$(BIN)/janus-pretrain data prepare --input $(DATA)/pretrain/enwiki/train.txt \
		--tokenizer $< --output $(GLGE)/data --workers 2 $(if $(GLGE_LIMIT),--max-docs $(GLGE_LIMIT))

$(GLGE)/pretrain/%/done: $(GLGE)/data/meta.json
	rm -rf $(GLGE)/pretrain/$*
	$(call timed,$(BIN)/janus-pretrain train --config configs/pretrain/$(GLGE_PRESET_$*).yaml \
		$(GLGE_PRETRAIN) train.output_dir=$(GLGE)/pretrain/$* train.wandb_name=glge-pretrain-$*,pretrain_$*,$(GLGE_TIMES))
	touch $@

$(GLGE)/%/data/pairs.json: $(GLGE)/tokenizer.model
	$(FINETUNE) prepare --task $* --tokenizer $< --output $(GLGE)/$*/data

# <task> <run> <preset> <pretraining or empty> <system>
define glge_rule
$(GLGE)/$(1)/$(2)/done: $(GLGE)/$(1)/data/pairs.json $(if $(4),$(GLGE)/pretrain/$(4)/done)
	rm -rf $(GLGE)/$(1)/$(2)
	$$(call timed,$(FINETUNE) train --task $(1) --data $(GLGE)/$(1)/data \
		--config configs/finetune/$(3).yaml $(if $(4),--init-from $(GLGE)/pretrain/$(4)) \
		$(GLGE_FINETUNE) train.output_dir=$(GLGE)/$(1)/$(2) train.wandb_name=glge-$(1)-$(2),$(1)_$(2),$(GLGE_TIMES))
	touch $$@
$(RESULTS)/$(1).$(2).json: $(GLGE)/$(1)/$(2)/done
	$$(call timed,$(FINETUNE) evaluate --task $(1) --name $(5) \
		--checkpoint $(GLGE)/$(1)/$(2)/checkpoints/best --output $$@ \
		--limit $(or $(GLGE_LIMIT),$(GLGE_TEST_PAIRS_$(1))),evaluate_$(1)_$(2),$(GLGE_TIMES))
endef
$(foreach t,$(GLGE_TASKS),\
	$(eval $(call glge_rule,$(t),janus,janus,janus,janus))\
	$(eval $(call glge_rule,$(t),bang_ar,bang_ar,bang,bang))\
	$(eval $(call glge_rule,$(t),bang_nar,bang_nar,bang,bang))\
	$(eval $(call glge_rule,$(t),ar,ar,ar,ar))\
	$(eval $(call glge_rule,$(t),scratch,janus,,scratch)))

clean:
	rm -rf runs
