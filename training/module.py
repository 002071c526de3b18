"""LightningModule for next-item sequence models: loss, optimiser, schedule, protocol metrics.

Hyperparameters are plain values only (model config, vocabulary, data description), so a checkpoint
is self-describing and loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pytorch_lightning as pl
import torch
from hydra.utils import get_class
from torch import Tensor, nn

from recsys.data.sequences import build_sequences
from recsys.data.vocabulary import NUM_RESERVED, PAD, UNK, Vocabulary
from recsys.losses import full_softmax, popularity_log_q, sampled_softmax

LOSSES = ("softmax", "sampled_softmax")


def build_model(net: dict[str, Any]) -> nn.Module:
    """A model from its plain config: ``{"_target_": "<config dataclass>", **fields}``."""
    fields = {k: v for k, v in net.items() if k != "_target_"}
    return get_class(net["_target_"])(**fields).build()


class NextItemModule(pl.LightningModule):
    """Trains a model exposing ``forward`` [B, L, d], ``encode`` [B, d] and ``item_embeddings`` [V, d]."""

    def __init__(
        self,
        net: dict[str, Any],
        vocab: dict[str, Any],
        data: dict[str, Any] | None = None,
        loss: str = "softmax",
        num_negatives: int = 2048,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 200,
        ks: tuple[int, ...] = (10, 20),
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")
        self.save_hyperparameters()
        self.model = build_model(net)
        self.vocab = Vocabulary.from_dict(vocab)
        self.ks = tuple(ks)
        self.register_buffer(
            "log_q", popularity_log_q(torch.as_tensor(self.vocab.popularity)), persistent=False
        )
        self._ranked: list[Tensor] = []

    def training_step(self, tokens: Tensor, batch_idx: int) -> Tensor:
        inputs, targets = tokens[:, :-1], tokens[:, 1:]  # [B, L] each: predict the next item
        hidden = self.model(inputs)  # [B, L, d]
        # no loss where there is nothing to predict (padding) or the input is padding (no context)
        valid = (targets > UNK) & (inputs != PAD)
        hidden, targets = hidden[valid], targets[valid]  # [N, d], [N]
        items = self.model.item_embeddings()
        if self.hparams.loss == "softmax":
            loss = full_softmax(hidden, targets, items)
        else:
            loss = sampled_softmax(hidden, targets, items, self.log_q, self.hparams.num_negatives)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(targets))
        return loss

    @torch.no_grad()
    def rank(self, item_ids: Tensor, k: int) -> Tensor:
        """Top-``k`` vocabulary indices [B, k] for histories ``item_ids`` [B, L] (reserved ids never)."""
        scores = self.model.encode(item_ids) @ self.model.item_embeddings().T  # [B, V]
        scores[:, :NUM_RESERVED] = float("-inf")
        return scores.float().topk(min(k, scores.shape[1] - NUM_RESERVED), dim=1).indices

    def _eval_step(self, item_ids: Tensor) -> None:
        self._ranked.append(self.rank(item_ids, max(self.ks)).cpu())

    def _eval_epoch_end(self, stage: str) -> None:
        ranked = torch.cat(self._ranked).numpy().astype(np.int64)
        self._ranked.clear()
        if self.trainer.sanity_checking:
            return
        metrics = self.trainer.datamodule.evaluate(stage, ranked, self.ks)
        self.log_dict({f"{stage}/{name}": float(value) for name, value in metrics.items()})

    def validation_step(self, item_ids: Tensor, batch_idx: int) -> None:
        self._eval_step(item_ids)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, item_ids: Tensor, batch_idx: int) -> None:
        self._eval_step(item_ids)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self) -> dict[str, Any]:
        # no weight decay on embeddings, norms and biases: decaying them only shrinks rare items
        decay = [p for n, p in self.named_parameters() if p.ndim >= 2 and "emb" not in n]
        no_decay = [p for n, p in self.named_parameters() if not (p.ndim >= 2 and "emb" not in n)]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hparams.lr,
            betas=(0.9, 0.98),
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(self.hparams.warmup_steps, total // 10 + 1)

        def schedule(step: int) -> float:  # linear warmup, then cosine decay to 10% of the peak
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def load_module(path: str, map_location: str = "cpu") -> NextItemModule:
    """A trained module from a checkpoint, read with ``weights_only=True`` (no pickled code)."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    module = NextItemModule(**checkpoint["hyper_parameters"])
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()


@torch.no_grad()
def recommend(
    module: NextItemModule, train: pa.Table, shopper_ids: np.ndarray, k: int, batch_size: int = 1024
) -> np.ndarray:
    """Top-``k`` product ids [n, k] for ``shopper_ids`` given their ``train`` receipts.

    Histories are encoded with the module's own vocabulary, so any receipts can be ranked.
    """
    max_len = module.model.config.max_len
    histories = build_sequences(train, module.vocab).select(shopper_ids).last(max_len)
    ranked = [
        module.rank(torch.from_numpy(histories[i : i + batch_size]), k)
        for i in range(0, len(histories), batch_size)
    ]
    return module.vocab.decode(torch.cat(ranked).numpy())
