"""Hydra + Lightning training entry point.

python -m training.train experiment=demo
python -m training.train model.net.dim=128 trainer=gpu
python -m training.train -m model.lr=3e-4,1e-3,3e-3   # a sweep; each job returns its metric
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from recsys.io import write_json
from training.datamodule import ReceiptsDataModule
from training.module import NextItemModule

log = logging.getLogger(__name__)


def instantiate_all(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a group of named objects (callbacks, loggers)."""
    return [hydra.utils.instantiate(entry) for entry in (group or {}).values() if "_target_" in entry]


def train(cfg: DictConfig) -> float:
    """Fit the configured model, test the best checkpoint, and return ``cfg.optimized_metric``."""
    pl.seed_everything(cfg.seed, workers=True)
    datamodule: ReceiptsDataModule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")

    net = OmegaConf.to_container(cfg.model.net, resolve=True) | {"num_items": datamodule.vocab.size}
    module: NextItemModule = hydra.utils.instantiate(
        cfg.model,
        net=net,
        vocab=datamodule.vocab.to_dict(),
        data=datamodule.describe(),
        _recursive_=False,
        _convert_="all",
    )
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=instantiate_all(cfg.get("callbacks")),
        logger=instantiate_all(cfg.get("logger")),
    )
    log.info(
        "vocabulary %d products, %d training windows", datamodule.vocab.num_products, len(datamodule.windows)
    )
    trainer.fit(module, datamodule=datamodule)

    checkpoint = trainer.checkpoint_callback
    best_path = checkpoint.best_model_path if checkpoint is not None else ""
    score = trainer.callback_metrics.get(cfg.optimized_metric)
    if checkpoint is not None and checkpoint.best_model_score is not None:
        score = checkpoint.best_model_score
    if score is None:
        raise RuntimeError(
            f"metric {cfg.optimized_metric!r} was never logged; is validation on (data.val_days > 0)?"
        )
    results: dict[str, Any] = {cfg.optimized_metric: float(score), "best_checkpoint": best_path}
    if cfg.get("test"):
        tested = trainer.test(module, datamodule=datamodule, ckpt_path=best_path or None, verbose=False)
        results |= {name: float(value) for name, value in tested[0].items()}
    write_json(Path(cfg.paths.output_dir) / "metrics.json", results)
    log.info("results: %s", json.dumps(results, indent=2, sort_keys=True))
    return float(score)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return train(cfg)


if __name__ == "__main__":
    main()
