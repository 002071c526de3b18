"""Two-tower model: an item tower over product ids and features, a shopper tower pooling the history.

Inputs follow ``recsys.data.vocabulary`` (0 padding, 1 unknown, products from 2, LEFT-padded sequences).

- Item tower: id embedding + one embedding per product feature (``recsys.data.features`` codes, 0 =
  missing -> zero vector), summed, then a residual MLP. The codes of every vocabulary index live in the
  persistent buffer ``item_codes`` [V, F], so checkpoints carry them and ONNX export bakes them in. During
  training a share of item ids (``id_dropout``) is replaced by a learned "unknown id" vector, so the
  features alone must carry meaning: ``embed_features`` embeds products outside the vocabulary that way.
- Shopper tower: the state after position t is a recency-weighted mean of the item-tower embeddings of
  the items at positions <= t, weight ``exp(-rate * age)`` with one learned rate per recency scale
  (``num_decays``), padding weight 0. A product bought twice counts twice (frequency). The scales are
  concatenated and mapped to ``dim`` by a residual MLP. Weights depend only on an item's age, so extra
  left padding changes nothing. Age is counted in positions, or with ``time_gaps`` (basket-aware) in days
  between the purchases (summed ``gaps``, ``recsys.models.gaps``): a basket's products then weigh alike,
  and a month without shopping ages a history by a month, not by nothing.

Scores are ``encode(x) @ item_embeddings().T``, as for every model here; ``forward`` returns the causal
prefix states [B, L, d] that ``training.module.NextItemModule`` trains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsys.data.features import MISSING, ProductFeatures
from recsys.data.vocabulary import PAD
from recsys.models.gaps import require_gaps
from recsys.models.sasrec import init_weights


@dataclass
class TwoTowerConfig:
    """Hyper-parameters; ``dataclasses.asdict`` of it is what checkpoints store."""

    num_items: int  # vocabulary size incl. reserved ids (embedding rows)
    max_len: int = 50  # longest history callers pass (the towers themselves take any length)
    dim: int = 64
    feature_cardinalities: list[int] = field(default_factory=list)  # codes per feature, 0 included
    # ``ProductFeatures.to_dict()``: how product attributes map to codes. The model does not use it; it
    # travels with the config so a checkpoint can encode products outside its vocabulary.
    features: dict[str, Any] | None = None
    num_decays: int = 2  # recency scales of the shopper tower (half-lives 2, 8, 32, ... items at init)
    time_gaps: bool = False  # age in days from the purchase gaps (half-lives 14, 56, ... days at init)
    id_dropout: float = 0.25  # share of item ids replaced by the unknown-id vector in training
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.num_decays < 1:
            raise ValueError(f"num_decays must be >= 1, got {self.num_decays}")
        if not 0 <= self.id_dropout < 1:
            raise ValueError(f"id_dropout must be in [0, 1), got {self.id_dropout}")
        if self.features is not None:
            expected = ProductFeatures.from_dict(self.features).cardinalities
            if list(self.feature_cardinalities) != expected:
                raise ValueError(
                    f"feature_cardinalities {list(self.feature_cardinalities)} do not match the feature "
                    f"mappings' {expected}"
                )

    def build(self) -> TwoTower:
        """A freshly initialised model with this configuration (item feature codes all missing)."""
        return TwoTower(self)


class MLP(nn.Module):
    """Linear -> GELU -> dropout -> linear, from ``in_dim`` to ``out_dim`` through ``4 * out_dim``.

    Not SASRec's ``FeedForward`` (``dim`` -> ``dim``): the shopper tower maps ``S * dim`` to ``dim``.
    """

    def __init__(self, in_dim: int, out_dim: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, 4 * out_dim)
        self.proj = nn.Linear(4 * out_dim, out_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """[..., in_dim] -> [..., out_dim]."""
        return self.proj(self.dropout(F.gelu(self.fc(x))))


class TwoTower(nn.Module):
    """Item tower (ids + product features) and a recency/frequency-pooling shopper tower."""

    item_codes: Tensor  # [V, F] int64 buffer

    def __init__(self, config: TwoTowerConfig) -> None:
        super().__init__()
        self.config = config
        d = config.dim
        self.item_emb = nn.Embedding(config.num_items, d, padding_idx=PAD)
        self.feature_embs = nn.ModuleList(
            nn.Embedding(cardinality, d, padding_idx=MISSING) for cardinality in config.feature_cardinalities
        )
        self.unknown_id_emb = nn.Parameter(torch.empty(d))
        self.item_ln = nn.LayerNorm(d)
        self.item_mlp = MLP(d, d, config.dropout)
        # persistent: the codes are part of the model, so a weights_only checkpoint restores them
        self.register_buffer(
            "item_codes", torch.full((config.num_items, len(config.feature_cardinalities)), MISSING)
        )
        self.decay = nn.Parameter(torch.empty(config.num_decays))  # softplus -> decay rate per step
        self.shopper_ln = nn.LayerNorm(config.num_decays * d)
        self.shopper_mlp = MLP(config.num_decays * d, d, config.dropout)
        self.apply(init_weights)
        nn.init.normal_(self.unknown_id_emb, mean=0.0, std=0.02)
        with torch.no_grad():
            first = 14.0 if config.time_gaps else 2.0  # days or positions
            half_lives = first * 4.0 ** torch.arange(config.num_decays, dtype=torch.float32)
            self.decay.copy_(torch.log(torch.expm1(math.log(2.0) / half_lives)))  # softplus^-1(rate)

    def set_item_codes(self, codes: Tensor) -> None:
        """Copy the feature codes of every vocabulary index, [V, F] int64, into ``item_codes``."""
        if codes.shape != self.item_codes.shape:
            expected = tuple(self.item_codes.shape)
            raise ValueError(f"item codes have shape {tuple(codes.shape)}, expected {expected}")
        limits = torch.as_tensor(self.config.feature_cardinalities, dtype=torch.int64)  # [F]
        if ((codes < 0) | (codes >= limits)).any():
            raise ValueError(f"item codes out of range for feature cardinalities {limits.tolist()}")
        self.item_codes.copy_(codes)

    def _item_tower(self, id_part: Tensor, codes: Tensor) -> Tensor:
        """Id part [..., d] + feature codes [..., F] -> item embeddings [..., d]."""
        x = id_part
        for f, embedding in enumerate(self.feature_embs):
            x = x + embedding(codes[..., f])
        return x + self.item_mlp(self.item_ln(x))

    def _embed_items(self, item_ids: Tensor) -> Tensor:
        """Item-tower embeddings of vocabulary indices [...] -> [..., d]; padding gives zeros."""
        id_part = self.item_emb(item_ids)
        if self.training and self.config.id_dropout > 0:
            dropped = torch.rand(item_ids.shape, device=item_ids.device) < self.config.id_dropout
            id_part = torch.where(dropped[..., None], self.unknown_id_emb, id_part)
        embedded = self._item_tower(id_part, self.item_codes[item_ids])
        return embedded * (item_ids != PAD)[..., None]

    def embed_features(self, codes: Tensor) -> Tensor:
        """Embeddings of products from their feature codes alone, [N, F] int64 -> [N, d].

        For products outside the vocabulary (cold start): the id part is the learned unknown-id vector,
        as for the items whose id was dropped in training.
        """
        id_part = self.unknown_id_emb.expand(*codes.shape[:-1], -1)
        return self._item_tower(id_part, codes)

    def item_embeddings(self) -> Tensor:
        """Item-tower embeddings [V, d], row i = vocabulary index i; row 0 (padding) is zero."""
        return self._embed_items(torch.arange(self.config.num_items, device=self.item_codes.device))

    def forward(self, item_ids: Tensor, gaps: Tensor | None = None) -> Tensor:
        """Shopper state after every position: [B, L] int64 (and gaps [B, L] with ``time_gaps``) -> [B, L, d].

        State t pools the items at positions <= t, so output t is trained to predict item t + 1. States
        at leading padding positions pool nothing (zero vectors through the MLP): finite, meaningless.
        """
        return self._states(item_ids, gaps, slice(None))

    def _states(self, item_ids: Tensor, gaps: Tensor | None, states: slice) -> Tensor:
        """Shopper states after the positions ``states`` selects (all, or the last): [B, L] -> [B, T, d]."""
        L = item_ids.shape[1]
        items = self._embed_items(item_ids)  # [B, L, d]
        steps = torch.arange(L, device=item_ids.device)
        at = steps[states]  # [T] the positions whose state is computed
        before = (at[:, None] >= steps[None, :]).float()  # [T, L] (state t, item s): s at or before t
        if self.config.time_gaps:
            # days from the window's first row: gaps summed, the first row's (unknown span) counted 0
            days = (require_gaps(item_ids, gaps).clamp(min=0) * (item_ids != PAD)).cumsum(dim=1)  # [B, L]
            age = (days[:, states, None] - days[:, None, :])[:, None]  # [B, 1, T, L] days from item s to t
        else:
            age = (at[:, None] - steps[None, :]).float()  # [T, L] positions from item s to t
        rates = F.softplus(self.decay)[:, None, None]  # [S, 1, 1]
        weights = torch.exp(-rates * age.clamp(min=0)) * before  # [S, T, L] or [B, S, T, L]
        weights = weights * (item_ids != PAD)[:, None, None, :]  # [B, S, T, L]: padding weight 0
        pooled = weights @ items[:, None]  # [B, S, T, L] @ [B, 1, L, d] -> [B, S, T, d]
        # Weighted mean. An item's own weight is exp(0) = 1, so the total is >= 1 wherever there is an
        # item and 0 only for states that pool nothing: clamping at 1 changes nothing else.
        pooled = pooled / weights.sum(dim=-1, keepdim=True).clamp(min=1.0)
        scales = pooled.transpose(1, 2)  # [B, S, T, d] -> [B, T, S, d]
        mixed = self.shopper_mlp(self.shopper_ln(scales.flatten(2)))  # [B, T, S * d] -> [B, T, d]
        # the mean over scales is a direct path: repeats of history items score high from the start
        return scales.mean(dim=2) + mixed

    def encode(self, item_ids: Tensor, gaps: Tensor | None = None) -> Tensor:
        """Shopper embedding, the state after the last (most recent) position: [B, L] -> [B, d].

        Equal to ``forward(item_ids, gaps)[:, -1]``, pooling and mixing for that state alone.
        """
        return self._states(item_ids, gaps, slice(-1, None))[:, -1]
