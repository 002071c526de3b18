"""Every experiment composes from the real configs and every object in it instantiates."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import hydra
import numpy as np
import pytest
from omegaconf import DictConfig, OmegaConf

from recsys.data.vocabulary import Vocabulary
from training.datamodule import ReceiptsDataModule
from training.module import NextItemModule
from training.train import instantiate_all

EXPERIMENTS = sorted(
    p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "experiment").glob("*.yaml")
)


def test_there_are_experiments() -> None:
    assert {"demo", "cj_sasrec", "synthetic_sasrec"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(
    experiment: str, compose_config: Callable[..., DictConfig]
) -> None:
    cfg = compose_config("train", [f"experiment={experiment}"])
    OmegaConf.resolve(cfg)  # every interpolation resolves
    datamodule = hydra.utils.instantiate(cfg.data)
    assert isinstance(datamodule, ReceiptsDataModule)
    assert callable(datamodule.load_receipts)  # receipts load lazily, in setup()

    vocab = Vocabulary(np.arange(100, 130, dtype=np.int64), np.arange(30, 0, -1, dtype=np.int64))
    net = OmegaConf.to_container(cfg.model.net) | {"num_items": vocab.size}
    module = hydra.utils.instantiate(
        cfg.model, net=net, vocab=vocab.to_dict(), _recursive_=False, _convert_="all"
    )
    assert isinstance(module, NextItemModule)
    assert module.model.item_embeddings().shape[0] == vocab.size

    callbacks = instantiate_all(cfg.get("callbacks"))
    loggers = instantiate_all(cfg.get("logger"))
    if cfg.trainer.accelerator == "gpu":
        return  # the Trainer itself needs a GPU to instantiate; the config above composed
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    assert trainer.max_epochs == cfg.trainer.max_epochs


def test_evaluate_config_composes(compose_config: Callable[..., DictConfig]) -> None:
    cfg = compose_config("evaluate", ["checkpoints=[a.ckpt]", "data.cutoff=2017-11-01"])
    OmegaConf.resolve(cfg)
    assert cfg.checkpoints == ["a.ckpt"]
    assert isinstance(hydra.utils.instantiate(cfg.data), ReceiptsDataModule)


def test_parquet_data_requires_a_source(compose_config: Callable[..., DictConfig]) -> None:
    cfg = compose_config("train", ["data=parquet", "data.cutoff=2024-01-01"])
    datamodule = hydra.utils.instantiate(cfg.data)
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'source'"):
        datamodule.setup()
