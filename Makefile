# QEEPS-D2: every target creates or reuses the virtual environment .venv by itself.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.qeeps-installed
# the test extras (pytest, onnx/onnxruntime, PyAV, ...): only `make test` needs them
TEST_STAMP := $(VENV)/.qeeps-test-installed
TORCH  ?= torch==2.14.1 torchvision==0.29.1
# Detectron2's own run-time dependencies (needed when it comes from the sal-detectron2 wheel,
# which is installed without dependency resolution).
D2_DEPS := "fvcore<0.1.6" "iopath<0.1.10" termcolor yacs tabulate cloudpickle tqdm tensorboard \
           "omegaconf<2.4" hydra-core pycocotools matplotlib
PYTEST_ARGS ?=

.PHONY: venv test demo bench clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PIP) install -q $(TORCH)
	@# Detectron2: keep an importable one (e.g. a user's source build), else the sal-detectron2
	@# wheel (upstream source, pure-Python mode on 3.11; see README "Installation").
	$(PY) -c "import detectron2" 2>/dev/null || { \
	  $(PIP) install -q --no-deps --only-binary=:all: --python-version 3.10 --implementation cp \
	    --target "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
	    sal-detectron2==0.7.2 && $(PIP) install -q $(D2_DEPS); }
	$(PIP) install -q -e .
	$(PY) -c "import detectron2, qeeps_d2" 
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PIP) install -q -e ".[test]"
	touch $(TEST_STAMP)

test: $(TEST_STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

demo: $(STAMP)
	$(PY) -m qeeps_d2.demo

bench: $(STAMP)
	$(PY) benchmarks/run.py

clean-venv:
	rm -rf $(VENV)
