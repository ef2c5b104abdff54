# mcc: train -> export -> serve. `make demo` and `make test` set up .venv themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch build pip takes on this project's machines (a local wheel); override for yours, e.g. TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= runs/demo

.PHONY: install demo test test-fast bench accuracy accuracy-quick lint clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH_SPEC)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	# KServe's SDK for its API types only (tests/serve/test_deploy.py): without its model server's dependencies
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps kserve==0.21.0
	touch $@

install: $(BIN)/.installed

demo: install
	bash scripts/demo.sh $(DEMO_DIR)

test: install
	$(BIN)/python -m pytest -q --durations=15

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python benchmarks/train_overhead.py
	$(BIN)/python benchmarks/export_parity.py
	$(BIN)/python benchmarks/serve_load.py
	$(BIN)/python benchmarks/int8.py
	$(BIN)/python benchmarks/ray_serve.py

accuracy: install
	$(BIN)/python benchmarks/accuracy.py

accuracy-quick: install
	$(BIN)/python benchmarks/accuracy.py --quick

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache
