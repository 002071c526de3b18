"""BERT4Rec: a bidirectional transformer trained to fill in masked items (Sun et al., 2019).

The transformer blocks are SASRec's (``recsys.models.sasrec``); what differs is the attention mask (every
item sees every other item, before and after it) and an extra MASK token. Training replaces some items by
MASK and predicts them (``training.module``'s masked objective); ``encode`` appends MASK after the most
recent item and reads its output state, which is the model's guess of the next item.

Inputs follow ``recsys.data.vocabulary`` (0 padding, 1 unknown, products from 2, LEFT-padded) and, like
SASRec, everything exports to ONNX with dynamic batch and sequence axes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from recsys.data.vocabulary import PAD
from recsys.models.gaps import GapEmbedding, require_gaps
from recsys.models.sasrec import Block, SASRecConfig, init_weights, last_state


@dataclass
class BERT4RecConfig(SASRecConfig):
    """SASRec's hyper-parameters (the same transformer); ``num_items`` excludes the MASK row."""

    def build(self) -> BERT4Rec:  # type: ignore[override]
        """A freshly initialised model with this configuration."""
        return BERT4Rec(self)


class BERT4Rec(nn.Module):
    """Bidirectional transformer encoder of left-padded item sequences, tied input/output item embeddings.

    The input table has one row more than the vocabulary: row ``mask_token`` (= ``config.num_items``) is the
    MASK token, never a product, so ``item_embeddings`` leaves it out and it can never be recommended.
    """

    objective: ClassVar[str] = "masked"  # the training objective this model needs (training.module)

    def __init__(self, config: BERT4RecConfig) -> None:
        super().__init__()
        self.config = config
        self.mask_token = config.num_items
        self.item_emb = nn.Embedding(config.num_items + 1, config.dim, padding_idx=PAD)  # + the MASK row
        # max_len history items + the MASK appended by encode; training windows are max_len + 1 items too
        self.pos_emb = nn.Embedding(config.max_len + 1, config.dim)
        self.gap_emb = GapEmbedding(config.dim) if config.time_gaps else None
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_final = nn.LayerNorm(config.dim)
        self.apply(init_weights)

    def forward(self, item_ids: Tensor, gaps: Tensor | None = None) -> Tensor:
        """Hidden state at every position: [B, L] int64 (L <= max_len + 1, MASK allowed) -> [B, L, d].

        Every position attends to every non-padding position, so the output at a MASK sees the items on
        both sides of it. Outputs at padding positions are finite but meaningless. With ``time_gaps``,
        ``gaps`` [B, L] come too; a MASK's gap is never read (its time is what is hidden with it).
        """
        x, allowed = self._inputs(item_ids, gaps)
        for block in self.blocks:
            x = block(x, allowed)
        return self.ln_final(x)

    def _inputs(self, item_ids: Tensor, gaps: Tensor | None) -> tuple[Tensor, Tensor]:
        """The first block's input [B, L, d] and the attention mask [B, 1, L, L] (True = may attend)."""
        L = item_ids.shape[1]
        steps = torch.arange(L, device=item_ids.device)  # [L]
        # Right-aligned positions, as in SASRec: left padding does not shift them.
        x = self.item_emb(item_ids) + self.pos_emb(steps + (self.config.max_len + 1 - L))  # [B, L, d]
        if self.gap_emb is not None:
            masked = item_ids == self.mask_token
            x = x + self.gap_emb(item_ids, require_gaps(item_ids, gaps), unknown=masked)
        x = self.emb_dropout(x)

        # Key s is visible if it is an item (or MASK); each position always sees itself, so leading
        # padding positions do not get a fully masked row -> NaN.
        diagonal = steps[None, :] == steps[:, None]  # [L, L] (query, key)
        is_item = (item_ids != PAD)[:, None, None, :]  # [B, 1, 1, L] (broadcast over heads, queries)
        allowed = is_item | diagonal  # [B, 1, L, L]
        return x, allowed

    def encode(self, item_ids: Tensor, gaps: Tensor | None = None) -> Tensor:
        """Shopper embedding: the output at a MASK appended after the most recent item, [B, L] -> [B, d].

        ``L <= max_len``: the appended MASK takes the position table's last row. Equal to ``forward`` of
        the appended sequence at its last position, computing only what that position needs
        (:func:`recsys.models.sasrec.last_state`: the last block's query, attention output and
        feed-forward at the MASK alone).
        """
        mask = torch.full_like(item_ids[:, :1], self.mask_token)  # [B, 1]
        if gaps is not None:
            gaps = torch.cat([gaps, torch.zeros_like(gaps[:, :1])], dim=1)  # the MASK's gap, never read
        x, allowed = self._inputs(torch.cat([item_ids, mask], dim=1), gaps)  # [B, L + 1, d]
        return self.ln_final(last_state(self.blocks, x, allowed))  # [B, d]

    def item_embeddings(self) -> Tensor:
        """Output item embeddings [num_items, d] tied with the input table, without the MASK row.

        Row 0 (padding) is zeros built outside the table, as in ``SASRec.item_embeddings``.
        """
        weight = self.item_emb.weight[: self.mask_token]  # [V, d], the MASK row dropped
        return torch.cat([weight.new_zeros(1, weight.shape[1]), weight[1:]])  # [V, d], row 0 zero
