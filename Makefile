# The two commands a newcomer needs are `make demo` and `make test`; both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= train,serve,cpu,store,dev,s3,ray

.PHONY: demo test test-slow test-gpu lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
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
