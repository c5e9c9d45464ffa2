# The two commands a newcomer needs are `make demo` and `make test`; both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= train,serve,cpu,store,dev,s3,ray
# torch alone first, with pyproject's pin: resolving the whole extras set, pip 26 takes PyPI's CUDA build
# (4.6 GB more, which once filled a CI disk) over the local CPU build of the same version; the second install
# keeps the torch already there.
TORCH_REQ = $(shell $(PYTHON) -c 'import tomllib; print(*[r for r in tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["train"] if r.startswith("torch")])')

.PHONY: demo test test-slow test-gpu lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(findstring train,$(EXTRAS)),$(BIN)/python -m pip install --quiet '$(TORCH_REQ)')
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	$(if $(findstring train,$(EXTRAS)),$(BIN)/python -c 'import torch; print("torch", torch.__version__)')
	touch $@

demo: $(BIN)/.installed  ## the main job end to end on synthetic frames
	$(BIN)/edgecase demo

test: $(BIN)/.installed  ## lint, types (mypy --strict on contract/ and service/) + the fast test suite
	@scripts/install-test-tools
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

test-slow: $(BIN)/.installed  ## the slow end-to-end tests
	$(BIN)/python -m pytest -m slow

test-gpu: $(BIN)/.installed  ## CUDA provider checks; on a GPU machine: make test-gpu EXTRAS=train,serve,gpu,store,dev,s3,ray
	$(BIN)/python -m pytest -m gpu

lint: $(BIN)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) runs/ .pytest_cache
