# The README's two commands: `make demo` and `make test`. Both set up first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
export BENTOML_DO_NOT_TRACK := True

.PHONY: setup demo test test-all clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/deploykit compress models/resnet10t_fmnist.pth --int8 --data fashion-mnist --overwrite

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m "not gpu"

clean:
	rm -rf *.deploykit .pytest_cache
