# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# The CPU build of torch is installed first so the project's `torch>=…` range is already satisfied
# (a plain `pip install` would fetch a multi-GB CUDA build). GPU users: make TORCH=torch install
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
DEMO := artifacts/demo

.PHONY: install demo sweep-demo test test-all lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Train SASRec on Complete Journey (CPU-sized), compare it with the baselines, export the bundle
# (ONNX + FAISS), print candidates for a few households through the torch-free serving library, and
# write candidates for every household with the CPU batch job (ONNX + FAISS), then the audience of one of
# Complete Journey's coupon campaigns (batch.audience: calibrated, thresholded, 10% exploration).
demo: $(STAMP)
	rm -rf $(DEMO)
	$(PY) -m training.train experiment=demo hydra.run.dir=$(DEMO)/train
	$(PY) -m export.export checkpoint=$(DEMO)/train/checkpoints/best.ckpt output=$(DEMO)/bundle \
		hydra.run.dir=$(DEMO)/export
	$(PY) -m training.evaluate 'checkpoints=[$(DEMO)/train/checkpoints/best.ckpt]' \
		'bundles=[$(DEMO)/bundle]' hydra.run.dir=$(DEMO)/evaluate
	$(PY) -m training.preview --bundle $(DEMO)/bundle --households 3 --k 10
	$(PY) -c "from recsys.data.completejourney import load_complete_journey as load; \
		import pyarrow.parquet as pq; pq.write_table(load(), '$(DEMO)/receipts.parquet')"
	$(PY) -m batch.candidates receipts=$(DEMO)/receipts.parquet bundle=$(DEMO)/bundle \
		output=$(DEMO)/candidates k=50 progress=false hydra.run.dir=$(DEMO)/candidates_run
	$(PY) -c "import yaml; from recsys.data.completejourney import load_campaign_tables as load; \
		c = load()['coupons']; ids = sorted(set(c.filter(c['campaign_id'].to_numpy() == 22)['product_id'].to_pylist())); \
		yaml.safe_dump({'campaign_id': 22, 'name': 'Complete Journey campaign 22, its coupon products', \
		'products': ids, 'horizon_days': 28, 'objective': 'redeem', 'audience': 250, \
		'min_probability': 0.01, 'exploration': 0.1, 'exclude': {'bought_within_days': 7}}, \
		open('$(DEMO)/campaign_22.yaml', 'w'))"
	$(PY) -m batch.audience campaign=$(DEMO)/campaign_22.yaml bundle=$(DEMO)/bundle \
		receipts=$(DEMO)/receipts.parquet output=$(DEMO)/audience as_of=2017-12-01 \
		timezone=America/New_York progress=false hydra.run.dir=$(DEMO)/audience_run

# An Optuna TPE search (6 trials) over SASRec on Complete Journey, CPU-sized (one short epoch per trial): its
# study, best trial as an experiment, trials.csv and search.png land in $(SWEEP_DEMO) (README, "Sweeps and clusters")
SWEEP_DEMO := artifacts/sweep-demo
sweep-demo: $(STAMP)
	rm -rf $(SWEEP_DEMO)
	$(PY) -m training.train -m hparams_search=sasrec experiment=demo hydra.sweep.dir=$(SWEEP_DEMO) \
		hydra.sweeper.n_trials=6 hydra.sweeper.sampler.n_startup_trials=3 trainer.max_epochs=1 \
		+trainer.limit_train_batches=40 test=false trainer.enable_progress_bar=false \
		'model.loss=choice(sampled_softmax, in_batch)' model.num_negatives=1024 'model.net.dim=choice(32, 64)' \
		'model.net.num_layers=range(1, 2)' 'data.batch_size=choice(128, 256)'

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --durations=15

test-all: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(DEMO) $(SWEEP_DEMO) outputs multirun
