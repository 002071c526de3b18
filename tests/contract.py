"""Checks every sequence model must pass (the ``forward`` / ``encode`` / ``item_embeddings`` contract), the
inputs they are checked on, the exact-loss check of a training step, and a training run through the real
configs."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch import Tensor, nn

from recsys.data.sequences import build_sequences
from recsys.data.vocabulary import NUM_RESERVED, PAD
from recsys.inputs import Histories
from recsys.rules import Rules
from tests.conftest import CONF
from training.module import NextItemModule, recommend
from training.train import train


def network_ranking(
    module: NextItemModule, receipts: pa.Table, shopper_ids: np.ndarray, k: int
) -> np.ndarray:
    """Product ids [n, k] that ``module``'s network ranks first for ``shopper_ids`` given their
    ``receipts``, through the model-input front-end and the one scorer, as training's metrics rank."""
    sequences = build_sequences(receipts, module.vocab).select(shopper_ids)
    return recommend(module, Histories.from_sequences(sequences), Rules(k=k, repeat_aware=False))


def stage_metrics(module: NextItemModule, datamodule: Any, stage: str = "test", ks: tuple = (10, 20)) -> dict:
    """The protocol metrics training logs for ``stage``, recomputed from ``module`` on ``datamodule``'s
    loader (its searched rows and scores, then the data module's one scorer)."""
    loader = datamodule.test_dataloader() if stage == "test" else datamodule.val_dataloader()
    searched = [module.top_k(x, max(ks), gaps) for _, x, gaps in loader]
    rows = torch.cat([r for r, _ in searched]).numpy()
    scores = torch.cat([s for _, s in searched]).numpy()
    return datamodule.evaluate(stage, rows, scores, ks)


def top_indices(module: NextItemModule, item_ids: Tensor, k: int, gaps: Tensor | None = None) -> Tensor:
    """The module's top-``k`` vocabulary indices [B, k] for histories ``item_ids`` [B, L]."""
    return module.top_k(item_ids, k, gaps)[0] + NUM_RESERVED


def random_items(num_items: int, batch: int, length: int, seed: int = 0) -> Tensor:
    """[batch, length] random product indices of a ``num_items`` vocabulary (no padding, no MASK)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(NUM_RESERVED, num_items, (batch, length), generator=g)


def other_item(items: Tensor, num_items: int) -> Tensor:
    """Each product index replaced by the next product (wrapping), never a reserved index."""
    return (items + 1 - NUM_RESERVED) % (num_items - NUM_RESERVED) + NUM_RESERVED


def check_shapes(model: nn.Module, num_items: int, dim: int, max_len: int) -> None:
    """``forward`` is [B, L, d] and ``encode`` its last position for lengths 1, 5 and ``max_len``;
    ``item_embeddings`` is [V, d] with a zero padding row."""
    for length in (1, 5, max_len):
        x = random_items(num_items, 3, length)
        hidden = model(x)
        assert hidden.shape == (3, length, dim)
        # encode computes the last position's work alone (the models trim it): equal up to rounding
        torch.testing.assert_close(model.encode(x), hidden[:, -1], rtol=0, atol=1e-5)
    items = model.item_embeddings()
    assert items.shape == (num_items, dim)
    assert torch.equal(items[PAD], torch.zeros(dim))


def check_causal(
    model: nn.Module, x: Tensor, num_items: int, atol: float = 1e-6, gaps: Tensor | None = None
) -> None:
    """Changing item t of ``x`` [B, L] (left-padded item ids), or with ``gaps`` its gap, changes no earlier
    state of ``forward`` but visibly changes state t."""
    with torch.no_grad():
        states = model(x, gaps)
        for t in range(x.shape[1]):
            changed = x.clone()
            changed[:, t] = other_item(x[:, t], num_items)
            changes = [model(changed, gaps)]
            if gaps is not None and t > 0:  # (a history's first gap only marks it as the first)
                later = gaps.clone()
                later[:, t] += 40.0
                changes.append(model(x, later))
            for after in changes:
                torch.testing.assert_close(after[:, :t], states[:, :t], rtol=0, atol=atol)  # the past: same
                assert not torch.allclose(after[:, t], states[:, t])  # the change shows where it happens


def check_prefix_states(
    model: nn.Module, x: Tensor, num_items: int, atol: float = 1e-6, gaps: Tensor | None = None
) -> None:
    """For models without positions: state t of ``forward`` is ``encode`` of the prefix up to t, and the
    model is causal (:func:`check_causal`)."""
    with torch.no_grad():
        states = model(x, gaps)
        for t in range(x.shape[1]):
            prefix_gaps = None if gaps is None else gaps[:, : t + 1]
            prefix = model.encode(x[:, : t + 1], prefix_gaps)
            torch.testing.assert_close(states[:, t], prefix, rtol=0, atol=atol)
    check_causal(model, x, num_items, atol, gaps)


def check_finite_with_heavy_padding(
    model: nn.Module, x: Tensor, no_grad: frozenset[str] = frozenset(), gaps: Tensor | None = None
) -> None:
    """Outputs and the gradients of every parameter (but ``no_grad``) stay finite when one row of ``x`` is
    all padding and another holds one item."""
    x = x.clone()
    x[0] = PAD
    x[1, :-1] = PAD
    hidden = model(x, gaps)
    assert torch.isfinite(hidden).all()
    torch.logsumexp(hidden @ model.item_embeddings().T, dim=-1).sum().backward()
    for name, param in model.named_parameters():
        if name not in no_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name


def exact_loss_drop(
    module: NextItemModule, batch: tuple[Tensor, Tensor], steps: int, lr: float
) -> tuple[float, float]:
    """The exact (full softmax) loss of ``batch`` before and after ``steps`` Adam steps on it with the
    module's configured loss. Measured with the same seed each time, so a masked objective masks alike and
    dropout drops alike."""
    loss = module.hparams.loss

    def exact() -> float:
        module.hparams.loss = "softmax"
        torch.manual_seed(1)
        with torch.no_grad():
            value = module.training_step(batch, 0).item()
        module.hparams.loss = loss
        return value

    before = exact()
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        module.training_step(batch, 0).backward()
        optimizer.step()
    return before, exact()


@dataclass(frozen=True)
class Run:
    """A ``train(cfg)`` job run from the real configs."""

    cfg: DictConfig
    path: Path  # the run's output dir
    metrics: dict[str, Any]  # its metrics.json


def small_run(model: str, lr: float, *overrides: str) -> list[str]:
    """Overrides for a quick job through the real configs: ``model`` on a 600-shopper synthetic world,
    dim 32, 3 epochs at ``lr``, CSV logs (what :func:`training_losses` reads), plus ``overrides``."""
    return [
        "data=synthetic",
        f"model={model}",
        "trainer=cpu",
        "logger=csv",
        "data.receipts.config.num_shoppers=600",
        "data.receipts.config.num_products=300",
        "model.net.dim=32",
        f"model.lr={lr}",
        "model.warmup_steps=20",
        "trainer.max_epochs=3",
        "trainer.log_every_n_steps=5",
        "trainer.enable_progress_bar=false",
        *overrides,
    ]


def train_run(path: Path, overrides: list[str]) -> Run:
    """Compose ``conf/train.yaml`` with ``overrides``, train with outputs in ``path``, return the run."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={path}", *overrides])
    train(cfg)
    return Run(cfg, path, json.loads((path / "metrics.json").read_text()))


def training_losses(run: Run) -> list[float]:
    """The logged ``train/loss`` values of a run, in order (from its CSV logger)."""
    with open(next((run.path / "csv").glob("version_*/metrics.csv"))) as file:
        return [float(row["train/loss"]) for row in csv.DictReader(file) if row.get("train/loss")]
