"""Hydra + Lightning training entry point.

python -m training.train experiment=demo
python -m training.train model.net.dim=128 trainer=gpu
python -m training.train -m model.lr=3e-4,1e-3,3e-3   # a sweep; each job returns its metric
python -m training.train experiment=demo hydra.run.dir=RUN ckpt_path=last   # resume RUN where it stopped
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from recsys.io import write_json
from recsys.models import model_config
from training import checkpoint as checkpoints
from training import rank
from training.datamodule import ReceiptsDataModule
from training.module import NextItemModule, save_module

CUTOFF_CHECKPOINT = "cutoff_network.ckpt"  # the ranker's cutoff network, beside best.ckpt

log = logging.getLogger(__name__)


WANDB_LOGGER = "pytorch_lightning.loggers.WandbLogger"


def instantiate_all(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a group of named objects (callbacks, loggers); a wandb logger also gets
    this job's :func:`tracking` settings."""
    # a partial first: wandb's ``config`` argument would clash with instantiate's own first parameter
    return [
        hydra.utils.instantiate(entry, _partial_=True)(
            **(tracking() if entry["_target_"] == WANDB_LOGGER else {})
        )
        for entry in (group or {}).values()
        if "_target_" in entry
    ]


def tracking() -> dict[str, Any]:
    """wandb settings of the running Hydra job: its command-line overrides as the run's config, and in a
    multirun (a sweep, an Optuna search) the multirun's name as the run's group (the study name of a
    search, else the sweep dir's name), so a search's trials sit together. Empty outside a Hydra job."""
    if not HydraConfig.initialized():
        return {}
    job = HydraConfig.get()
    settings: dict[str, Any] = {"config": {"overrides": list(job.overrides.task)}}
    if job.mode == RunMode.MULTIRUN:
        settings["group"] = job.sweeper.get("study_name") or Path(job.sweep.dir).name
    return settings


def wants_features(net: dict[str, Any]) -> bool:
    """Whether the model config takes product features (its dataclass has ``feature_cardinalities``)."""
    return "feature_cardinalities" in {f.name for f in dataclasses.fields(model_config(net))}


def model_net(cfg: DictConfig, num_items: int, max_len: int) -> dict[str, Any]:
    """``cfg.model.net`` with what the data decides injected: ``num_items`` (the vocabulary's size) and
    ``max_len`` (``data.max_len``, its one source). A ``model.net.max_len`` that differs is an error:
    training would see shorter histories than export and serving feed the model."""
    net = OmegaConf.to_container(cfg.model.net, resolve=True)
    given = net.get("max_len")
    if given is not None and given != max_len:
        raise ValueError(
            f"model.net.max_len={given} conflicts with data.max_len={max_len}: the history length has one "
            "source, set data.max_len instead"
        )
    return net | {"num_items": num_items, "max_len": max_len}


def refuse_local_ddp_multirun(trainer: pl.Trainer) -> None:
    """A clear error for DDP inside a local Hydra multirun: Lightning starts the other processes by
    re-running this command line, ``-m`` and the sweep included, so each would start a sweep of its own.
    On SLURM (``hydra/launcher=slurm``) the processes are SLURM's tasks and nothing is re-run."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if trainer.world_size == 1 or environment is None or environment.creates_processes_externally:
        return
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ValueError(
            "trainer=ddp in a local multirun (-m) is not supported: Lightning would re-run the whole sweep "
            "in every process. Run the DDP jobs one at a time, or through hydra/launcher=slurm"
        )


def build_module(
    cfg: DictConfig, datamodule: ReceiptsDataModule, net: dict[str, Any], codes: np.ndarray | None
) -> NextItemModule:
    """The configured model over ``datamodule``'s vocabulary (``codes``: its item feature codes, if any)."""
    # a partial, then the vocabulary: it is an object, not config, and OmegaConf need not copy it
    module: NextItemModule = hydra.utils.instantiate(
        cfg.model, net=net, data=datamodule.describe(), _partial_=True, _recursive_=False, _convert_="all"
    )(vocab=datamodule.vocab)
    module.products = datamodule.product_metadata()
    if codes is not None:
        module.model.set_item_codes(torch.from_numpy(codes))
    return module


def fit_cutoff_network(
    cfg: DictConfig,
    datamodule: ReceiptsDataModule,
    net: dict[str, Any],
    codes: np.ndarray | None,
    best_path: str,
    before: datetime,
) -> str:
    """The ranker's cutoff network (``ranker.cutoff_network``): the configured model, on the same
    vocabulary, trained for as many epochs as the best checkpoint was on the receipts before ``before``
    (the earliest internal cutoff) alone, without validation; saved beside the best checkpoint."""
    epochs = int(checkpoints.read(best_path)["epoch"]) + 1
    earlier = datamodule.before(before)
    pl.seed_everything(cfg.seed, workers=True)
    module = build_module(cfg, earlier, net, codes)
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        max_epochs=epochs,
        callbacks=None,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    log.info("cutoff network: %d epochs on %d windows before %s", epochs, len(earlier.windows), before)
    trainer.fit(module, datamodule=earlier, weights_only=True)
    path = Path(best_path).with_name(CUTOFF_CHECKPOINT)
    save_module(module.cpu(), path)
    return str(path)


def train(cfg: DictConfig) -> float:
    """Fit the configured model, test the best checkpoint, and return ``cfg.optimized_metric``."""
    pl.seed_everything(cfg.seed, workers=True)
    datamodule: ReceiptsDataModule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")

    net = model_net(cfg, datamodule.vocab.size, datamodule.max_len)
    codes = None  # [V, F] item feature codes, for models with an item tower over product features
    if wants_features(net):
        features = datamodule.item_features()
        if features is None:
            log.warning("the model takes product features but data.products is null: ids only")
        else:
            mappings, codes = features
            net |= {"feature_cardinalities": mappings.cardinalities, "features": mappings.to_dict()}
            log.info("product features %s, cardinalities %s", mappings.names, mappings.cardinalities)
    module = build_module(cfg, datamodule, net, codes)
    fits_scorer = bool(cfg.get("test")) and datamodule.val_data is not None
    module.expects_scorer = fits_scorer
    ranker_config = rank.RankerConfig.from_config(cfg.get("ranker"))
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=instantiate_all(cfg.get("callbacks")),
        logger=instantiate_all(cfg.get("logger")),
    )
    refuse_local_ddp_multirun(trainer)
    if ranker_config.cutoff_network and trainer.world_size > 1:
        raise ValueError(
            "ranker.cutoff_network trains its second network in one process: train on one device "
            "(trainer.devices=1), or with ranker.cutoff_network=false"
        )
    log.info(
        "vocabulary %d products, %d training windows", datamodule.vocab.num_products, len(datamodule.windows)
    )
    start = time.perf_counter()
    # ckpt_path: null trains from scratch; "last" resumes the run dir's checkpoints/last.ckpt (optimizer,
    # scheduler, epoch, step, random state; from scratch if there is none yet), any other value is a path
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    fit_seconds = time.perf_counter() - start

    checkpoint = trainer.checkpoint_callback
    best_path = checkpoint.best_model_path if checkpoint is not None else ""
    score = trainer.callback_metrics.get(cfg.optimized_metric)
    if checkpoint is not None and checkpoint.best_model_score is not None:
        score = checkpoint.best_model_score
    if score is None:
        raise RuntimeError(
            f"metric {cfg.optimized_metric!r} was never logged; is validation on (data.val_days > 0)?"
        )
    results: dict[str, Any] = {
        cfg.optimized_metric: float(score),
        "best_checkpoint": best_path,
        "fit_seconds": round(fit_seconds, 1),
        "epochs": trainer.current_epoch,
        "device": str(trainer.strategy.root_device),
        "processes": trainer.world_size,
    }
    if cfg.get("test"):
        tested = trainer.test(module, datamodule=datamodule, ckpt_path=best_path or None, verbose=False)
        results |= {name: float(value) for name, value in tested[0].items()}
    if not trainer.is_global_zero:
        # distributed: the other processes' work ends with the test; one process (rank 0, which holds
        # every process's results after the gather) fits the scorer and writes the run's results
        return float(score)
    if cfg.get("test") and best_path and fits_scorer and datamodule.test_data is not None:
        # the ranker: fitted on internal cutoffs before validation, kept in the best checkpoint, tested here
        cutoff_checkpoint = None
        if ranker_config.cutoff_network:
            start = time.perf_counter()
            before = rank.first_internal_cutoff(datamodule.val_data.cutoff, ranker_config)
            cutoff_checkpoint = fit_cutoff_network(cfg, datamodule, net, codes, best_path, before)
            results["cutoff_network/fit_seconds"] = round(time.perf_counter() - start, 1)
        results |= rank.fit_and_test(
            best_path,
            datamodule.test_data,
            datamodule.val_data,
            tuple(cfg.model.ks),
            ranker_config,
            cutoff_checkpoint=cutoff_checkpoint,
        )
    write_json(Path(cfg.paths.output_dir) / "metrics.json", results)
    log.info("results: %s", json.dumps(results, indent=2, sort_keys=True))
    return float(score)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return train(cfg)


if __name__ == "__main__":
    main()
