# Two commands do the whole set-up on a fresh machine:
#   make train   creates .venv, installs resnetlab, gets Fashion-MNIST, runs the default (fast) recipe
#   make test    the same set-up, then the whole test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install data train train-d2l test lint format fuzz bench clean

# Re-install when the project's metadata changes. The constraints file pins torch to the CPU wheel.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[test,onnx,notebook]'
	touch $@

install: $(STAMP)

data: $(STAMP)
	@bash scripts/get-data.sh $(PY)

train: data
	$(PY) -m resnetlab train $(ARGS)

train-d2l: data
	$(PY) -m resnetlab train --recipe d2l $(ARGS)

test: data
	$(PY) -m pytest -q $(ARGS)

# ruff as linter and formatter (configured in pyproject.toml); CI runs `make lint` before `make test`.
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests
	$(VENV)/bin/ruff format src tests

# The fuzz tests with fresh random examples, many more of them (make test draws the same ones each run).
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=explore $(PY) -m pytest -q tests/test_data_bad.py -k fuzz $(ARGS)

bench: data
	$(PY) -m resnetlab bench train --model d2l_resnet18 --resize 96 $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
