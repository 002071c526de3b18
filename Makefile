# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# The CPU build of torch is installed first so the project's `torch>=…` range is already satisfied
# (a plain `pip install` would fetch a multi-GB CUDA build). GPU users: make TORCH=torch install
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
DEMO := artifacts/demo

.PHONY: install demo test test-all lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Train SASRec on Complete Journey (CPU-sized), then compare it with the baselines.
demo: $(STAMP)
	WANDB_SILENT=true $(PY) -m training.train experiment=demo hydra.run.dir=$(DEMO)/train
	$(PY) -m training.evaluate 'checkpoints=[$(DEMO)/train/checkpoints/best.ckpt]' hydra.run.dir=$(DEMO)/evaluate

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(DEMO) outputs multirun
