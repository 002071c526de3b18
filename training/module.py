"""LightningModule for next-item sequence models: objective, loss, optimiser, schedule, protocol metrics.

Two objectives turn a window of items into (hidden state, target) pairs: ``causal`` (SASRec: the output
at position t predicts item t + 1) and ``masked`` (BERT4Rec: items replaced by the model's MASK token are
predicted from both sides). A model needing the masked objective says so with ``objective = "masked"``;
a model that declares nothing is causal. Either objective works with every loss of ``recsys.losses``.

Hyperparameters are plain values only (model config, vocabulary, data description), so a checkpoint
is self-describing and loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import get_class
from torch import Tensor, nn

from recsys.data.sequences import build_sequences
from recsys.data.vocabulary import NUM_RESERVED, PAD, UNK, Vocabulary
from recsys.losses import (
    full_softmax,
    gbce,
    in_batch_softmax,
    mixed_softmax,
    popularity_log_q,
    sampled_softmax,
    uniform_negatives,
)

LOSSES = ("softmax", "sampled_softmax", "gbce", "in_batch", "mixed")
OBJECTIVES = ("causal", "masked")


def build_model(net: dict[str, Any]) -> nn.Module:
    """A model from its plain config: ``{"_target_": "<config dataclass>", **fields}``."""
    fields = {k: v for k, v in net.items() if k != "_target_"}
    return get_class(net["_target_"])(**fields).build()


def mask_items(
    tokens: Tensor, mask_token: int, mask_prob: float, mask_last_prob: float
) -> tuple[Tensor, Tensor]:
    """Masked-objective inputs for windows ``tokens`` [B, T]: (inputs [B, T], masked [B, T] bool).

    Each product (index > UNK; padding and unknown are never targets) is masked with probability
    ``mask_prob``; a ``mask_last_prob`` share of the windows masks only the most recent item instead, which
    is exactly how ``encode`` queries the model. A window left without any mask gets one at a random
    product. ``inputs`` is ``tokens`` with masked positions replaced by ``mask_token``.
    """
    is_product = tokens > UNK
    noise = torch.rand(tokens.shape, device=tokens.device)  # [B, T]
    masked = (noise < mask_prob) & is_product
    last_only = torch.rand(len(tokens), 1, device=tokens.device) < mask_last_prob  # [B, 1]
    last = torch.zeros_like(masked)
    last[:, -1] = True  # windows are left-padded: the last column is the most recent item
    masked = torch.where(last_only, last & is_product, masked)
    # the largest noise among a row's products is at a uniformly random product (iid noise)
    pick = noise.masked_fill(~is_product, -1.0).argmax(dim=1)  # [B]
    fallback = F.one_hot(pick, tokens.shape[1]).bool() & is_product & ~masked.any(dim=1, keepdim=True)
    masked = masked | fallback
    return tokens.masked_fill(masked, mask_token), masked


class NextItemModule(pl.LightningModule):
    """Trains a model exposing ``forward`` [B, L, d], ``encode`` [B, d] and ``item_embeddings`` [V, d]."""

    def __init__(
        self,
        net: dict[str, Any],
        vocab: dict[str, Any],
        data: dict[str, Any] | None = None,
        loss: str = "softmax",
        num_negatives: int = 2048,
        gbce_t: float = 0.75,
        objective: str = "causal",
        mask_prob: float = 0.2,
        mask_last_prob: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 200,
        ks: tuple[int, ...] = (10, 20),
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
        if not (0 < mask_prob <= 1 and 0 <= mask_last_prob <= 1):
            raise ValueError(
                f"need 0 < mask_prob <= 1 and 0 <= mask_last_prob <= 1; got {mask_prob}, {mask_last_prob}"
            )
        self.save_hyperparameters()
        self.model = build_model(net)
        required = getattr(self.model, "objective", "causal")
        if objective != required:
            raise ValueError(
                f"{type(self.model).__name__} trains with the {required!r} objective, not {objective!r}; "
                f"set model.objective={required}"
            )
        self.vocab = Vocabulary.from_dict(vocab)
        self.ks = tuple(ks)
        popularity = torch.as_tensor(self.vocab.popularity)
        # sampled_softmax's proposal (flattened popularity), and each item's frequency as a target, which
        # is how often it turns up as an in-batch negative
        self.register_buffer("log_q", popularity_log_q(popularity), persistent=False)
        self.register_buffer("log_p", popularity_log_q(popularity, alpha=1.0), persistent=False)
        self._ranked: list[Tensor] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        tokens, gaps = batch  # [B, L + 1] items and their gaps (models without time_gaps ignore these)
        if self.hparams.objective == "masked":
            # the whole window [B, L + 1] goes in: the model's positions cover max_len + 1
            inputs, masked = mask_items(
                tokens, self.model.mask_token, self.hparams.mask_prob, self.hparams.mask_last_prob
            )
            hidden, targets = self.model(inputs, gaps)[masked], tokens[masked]  # [N, d], [N]
        else:
            inputs, targets = tokens[:, :-1], tokens[:, 1:]  # [B, L] each: predict the next item
            hidden = self.model(inputs, gaps[:, :-1])  # [B, L, d]
            # no loss where there is nothing to predict (padding) or the input is padding (no context)
            valid = (targets > UNK) & (inputs != PAD)
            hidden, targets = hidden[valid], targets[valid]  # [N, d], [N]
        loss = self.compute_loss(hidden, targets)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(targets))
        return loss

    def compute_loss(self, hidden: Tensor, targets: Tensor) -> Tensor:
        """The configured loss of hidden states ``hidden`` [N, d] predicting products ``targets`` [N]."""
        items = self.model.item_embeddings()
        name, num_negatives = self.hparams.loss, self.hparams.num_negatives
        if name == "softmax":
            return full_softmax(hidden, targets, items)
        if name == "sampled_softmax":
            return sampled_softmax(hidden, targets, items, self.log_q, num_negatives)
        if name == "in_batch":
            return in_batch_softmax(hidden, targets, items, self.log_p)
        if name == "gbce":
            negatives = uniform_negatives(len(items), (len(targets), num_negatives), device=items.device)
            return gbce(hidden, targets, items, negatives, self.hparams.gbce_t)
        negatives = uniform_negatives(len(items), num_negatives, device=items.device)
        return mixed_softmax(hidden, targets, items, self.log_p, negatives)

    @torch.no_grad()
    def top_k(self, item_ids: Tensor, k: int, gaps: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Top-``k`` vocabulary indices [B, k] and their scores (inner products) for histories
        ``item_ids`` [B, L] (with their ``gaps`` [B, L] for ``time_gaps`` models); reserved ids never."""
        scores = self.model.encode(item_ids, gaps) @ self.model.item_embeddings().T  # [B, V]
        scores[:, :NUM_RESERVED] = float("-inf")
        top = scores.float().topk(min(k, scores.shape[1] - NUM_RESERVED), dim=1)
        return top.indices, top.values

    def rank(self, item_ids: Tensor, k: int, gaps: Tensor | None = None) -> Tensor:
        """Top-``k`` vocabulary indices [B, k] for histories ``item_ids`` [B, L] (reserved ids never)."""
        return self.top_k(item_ids, k, gaps)[0]

    def _eval_step(self, batch: tuple[Tensor, Tensor]) -> None:
        item_ids, gaps = batch
        self._ranked.append(self.rank(item_ids, max(self.ks), gaps).cpu())

    def _eval_epoch_end(self, stage: str) -> None:
        ranked = torch.cat(self._ranked).numpy().astype(np.int64)
        self._ranked.clear()
        if self.trainer.sanity_checking:
            return
        metrics = self.trainer.datamodule.evaluate(stage, ranked, self.ks)
        self.log_dict({f"{stage}/{name}": float(value) for name, value in metrics.items()})

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

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


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's dictionary on the CPU, read with ``weights_only=True`` (no pickled code)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def module_from_checkpoint(checkpoint: dict[str, Any]) -> NextItemModule:
    """The trained module of a checkpoint dictionary (:func:`read_checkpoint`), in eval mode."""
    module = NextItemModule(**checkpoint["hyper_parameters"])
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()


def load_module(path: str | Path) -> NextItemModule:
    """A trained module from the checkpoint file at ``path``."""
    return module_from_checkpoint(read_checkpoint(path))


@torch.no_grad()
def recommend(
    module: NextItemModule, train: pa.Table, shopper_ids: np.ndarray, k: int, batch_size: int = 1024
) -> np.ndarray:
    """Top-``k`` product ids [n, k] for ``shopper_ids`` given their ``train`` receipts.

    Histories are encoded with the module's own vocabulary, so any receipts can be ranked.
    """
    sequences = build_sequences(train, module.vocab).select(shopper_ids)
    histories, gaps = sequences.model_inputs(module.model.config.max_len)
    ranked = [
        module.rank(
            torch.from_numpy(histories[i : i + batch_size]), k, torch.from_numpy(gaps[i : i + batch_size])
        )
        for i in range(0, len(histories), batch_size)
    ]
    return module.vocab.decode(torch.cat(ranked).numpy())
