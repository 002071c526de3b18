"""Every experiment composes from the real configs and every object in it instantiates."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
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


MODELS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "model").glob("*.yaml"))


@pytest.mark.parametrize("model", MODELS)
def test_model_config_gives_adamw_with_linear_warmup_then_cosine_to_a_tenth(
    model: str, compose_config: Callable[..., DictConfig]
) -> None:
    lr, warmup, total = 2e-3, 20, 400
    cfg = compose_config("train", [f"model={model}", f"model.lr={lr}", f"model.warmup_steps={warmup}"])
    vocab = Vocabulary(np.arange(100, 130, dtype=np.int64), np.arange(30, 0, -1, dtype=np.int64))
    net = OmegaConf.to_container(cfg.model.net, resolve=True) | {"num_items": vocab.size}
    module = hydra.utils.instantiate(
        cfg.model, net=net, vocab=vocab.to_dict(), _recursive_=False, _convert_="all"
    )
    # the optimizer and scheduler configs are plain values in the hyperparameters, as a checkpoint keeps them
    buffer = io.BytesIO()
    torch.save(dict(module.hparams), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["optimizer"]["lr"] == lr and saved["scheduler"]["warmup_steps"] == warmup

    optimizer, scheduler = module.optimizer_and_scheduler(total)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert isinstance(scheduler, torch.optim.lr_scheduler.SequentialLR)
    assert tuple(optimizer.defaults["betas"]) == (0.9, 0.98)
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert [g["weight_decay"] for g in optimizer.param_groups] == [cfg.model.weight_decay, 0.0]
    for name, parameter in module.named_parameters():  # no decay on embeddings, norms and biases
        assert (id(parameter) in decayed) == (parameter.ndim >= 2 and "emb" not in name), name

    lrs = []  # the lr each optimizer step t = 0 .. total runs at
    for _ in range(total + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    steps = np.arange(total + 1)
    cosine = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * (steps - warmup) / (total - warmup)))
    expected = lr * np.where(steps < warmup, (steps + 1) / warmup, cosine)
    np.testing.assert_allclose(lrs, expected, rtol=1e-9)
    assert lrs[0] == pytest.approx(lr / warmup)  # linear warmup from lr / warmup_steps ...
    assert lrs[warmup - 1] == pytest.approx(lr) == lrs[warmup]  # ... to the peak ...
    assert max(lrs) == pytest.approx(lr)
    assert lrs[total] == pytest.approx(0.1 * lr)  # ... then cosine down to 10% of it at the last step
