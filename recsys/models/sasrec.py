"""SASRec: a causal transformer over a shopper's item sequence (Kang & McAuley, 2018).

Inputs follow ``recsys.data.vocabulary``: index 0 is padding, 1 the unknown product, products start at 2,
and sequences are LEFT-padded so the most recent item is always at the last position. The model returns
hidden states only; scores are ``encode(x) @ item_embeddings().T`` and losses live in the training code.

Everything below is written to export to ONNX with dynamic batch and sequence axes: masks and positions
come from ``torch.arange`` over the input's shape, with no data-dependent Python control flow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsys.data.vocabulary import PAD
from recsys.models.gaps import GapEmbedding, require_gaps


@dataclass
class SASRecConfig:
    """Hyper-parameters; ``dataclasses.asdict`` of it is what checkpoints store."""

    num_items: int  # vocabulary size incl. reserved ids (embedding rows)
    max_len: int = 50  # longest sequence the position table covers; callers keep the most recent items
    dim: int = 64
    num_layers: int = 2
    num_heads: int = 2
    dropout: float = 0.2
    time_gaps: bool = False  # basket-aware inputs: also take each row's gap (recsys.models.gaps)

    def __post_init__(self) -> None:
        if self.dim % self.num_heads != 0:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")

    def build(self) -> SASRec:
        """A freshly initialised model with this configuration."""
        return SASRec(self)


def init_weights(module: nn.Module) -> None:
    """GPT-2/BERT initialisation, applied with ``model.apply(init_weights)`` (shared by the models).

    Small normal weights keep initial logits near zero, zero biases add no offset; LayerNorm keeps its
    default (weight 1, bias 0).
    """
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.padding_idx is not None:
            # normal_ overwrote the zero row that padding_idx set up
            nn.init.zeros_(module.weight[module.padding_idx])


class SelfAttention(nn.Module):
    """Multi-head self-attention with an explicit boolean mask (True = may attend): causal for SASRec,
    bidirectional for BERT4Rec."""

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        """``x`` [B, L, d], ``allowed`` [B, 1, L, L] -> [B, L, d]."""
        q, k, v = self.qkv(x).split(x.shape[2], dim=2)  # [B, L, 3d] -> 3 x [B, L, d]
        return self._attend(q, k, v, allowed)

    def last(self, x: Tensor, allowed: Tensor) -> Tensor:
        """The output at the last position only: ``x`` [B, L, d], ``allowed`` [B, 1, L, L] -> [B, 1, d].

        Keys and values come from every position, the query from the last one alone: the same numbers as
        ``forward(x, allowed)[:, -1:]`` without the other positions' queries and attention rows.
        """
        d = x.shape[2]
        weight, bias = self.qkv.weight, self.qkv.bias  # rows: query, key, value
        q = F.linear(x[:, -1:], weight[:d], bias[:d])  # [B, 1, d]
        k, v = F.linear(x, weight[d:], bias[d:]).split(d, dim=2)  # 2 x [B, L, d]
        return self._attend(q, k, v, allowed[:, :, -1:])

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
        """Queries [B, Q, d], keys and values [B, L, d], ``allowed`` [B, 1, Q, L] -> [B, Q, d]."""
        B, Q, d = q.shape
        dh = d // self.num_heads
        # [B, ., d] -> [B, ., h, dh] -> [B, h, ., dh]
        q = q.view(B, Q, self.num_heads, dh).transpose(1, 2)
        k = k.view(B, k.shape[1], self.num_heads, dh).transpose(1, 2)
        v = v.view(B, v.shape[1], self.num_heads, dh).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(dh)  # [B, h, Q, L]
        # -inf is safe: ``allowed`` always holds the diagonal, so no row is fully masked and softmax
        # (and its backward) never sees an all -inf row, which is what would produce NaN.
        scores = scores.masked_fill(~allowed, float("-inf"))
        attn = self.attn_dropout(scores.softmax(dim=-1))
        y = attn @ v  # [B, h, Q, dh]
        y = y.transpose(1, 2).reshape(B, Q, d)  # [B, h, Q, dh] -> [B, Q, h, dh] -> [B, Q, d]
        return self.resid_dropout(self.proj(y))


class FeedForward(nn.Module):
    """Position-wise MLP. Width 4*d as in GPT/BERT: the original SASRec's d-wide layer is cheaper, but
    at d=64 the wider layer costs little and gives the blocks more capacity per item."""

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.dim, 4 * config.dim)
        self.proj = nn.Linear(4 * config.dim, config.dim)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """[B, L, d] -> [B, L, d]."""
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: normalising before each sub-layer keeps the residual stream an identity
    path, which trains stably without learning-rate warm-up."""

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.dim)
        self.attn = SelfAttention(config)
        self.ln_ffn = nn.LayerNorm(config.dim)
        self.ffn = FeedForward(config)

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        """``x`` [B, L, d], ``allowed`` [B, 1, L, L] -> [B, L, d]."""
        x = x + self.attn(self.ln_attn(x), allowed)
        return x + self.ffn(self.ln_ffn(x))

    def last(self, x: Tensor, allowed: Tensor) -> Tensor:
        """``forward(x, allowed)[:, -1:]`` without the other positions' queries, attention outputs and
        feed-forward: [B, L, d] -> [B, 1, d]."""
        x = x[:, -1:] + self.attn.last(self.ln_attn(x), allowed)
        return x + self.ffn(self.ln_ffn(x))


def last_state(blocks: nn.ModuleList, x: Tensor, allowed: Tensor) -> Tensor:
    """The blocks' output at the last position, [B, L, d] -> [B, d], computing only what it needs.

    Every block but the last runs over all positions, since the last block's keys and values read them;
    the last block computes its query, attention output and feed-forward for the last position alone.
    Equal to running every block in full and keeping the last position (``encode`` of SASRec, BERT4Rec).
    """
    if len(blocks) == 0:
        return x[:, -1]
    for block in blocks[:-1]:
        x = block(x, allowed)
    return blocks[-1].last(x, allowed)[:, -1]


class SASRec(nn.Module):
    """Causal transformer encoder of left-padded item sequences, with tied input/output item embeddings.

    Sequences may be shorter than ``config.max_len`` but never longer (the position lookup then goes out of
    range and raises); callers keep the most recent ``max_len`` items.
    """

    objective = "causal"  # trained by NextItemModule's next-item objective

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        # Not scaled by sqrt(d): the table is also the output embedding, so scaling the input would make
        # the two roles disagree on magnitude, and pre-LN normalises each block's input anyway. With both
        # tables initialised at std 0.02, item and position start on an equal footing.
        self.item_emb = nn.Embedding(config.num_items, config.dim, padding_idx=PAD)
        self.pos_emb = nn.Embedding(config.max_len, config.dim)
        self.gap_emb = GapEmbedding(config.dim) if config.time_gaps else None
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_final = nn.LayerNorm(config.dim)
        self.apply(init_weights)

    def forward(self, item_ids: Tensor, gaps: Tensor | None = None) -> Tensor:
        """Hidden state after every position: [B, L] int64 (and gaps [B, L] with ``time_gaps``) -> [B, L, d].

        Position t only sees items at positions <= t, so output t is trained to predict item t + 1.
        Outputs at padding positions are finite but meaningless. ``gaps`` are ignored without ``time_gaps``.
        """
        x, allowed = self._inputs(item_ids, gaps)
        for block in self.blocks:
            x = block(x, allowed)
        return self.ln_final(x)

    def _inputs(self, item_ids: Tensor, gaps: Tensor | None) -> tuple[Tensor, Tensor]:
        """The first block's input [B, L, d] and the attention mask [B, 1, L, L] (True = may attend)."""
        L = item_ids.shape[1]
        steps = torch.arange(L, device=item_ids.device)  # [L]
        # Right-aligned positions: the most recent item is always position max_len - 1, so the same
        # history gets the same positions however much left padding the batch added.
        x = self.item_emb(item_ids) + self.pos_emb(steps + (self.config.max_len - L))  # [B, L, d]
        if self.gap_emb is not None:
            x = x + self.gap_emb(item_ids, require_gaps(item_ids, gaps))
        x = self.emb_dropout(x)

        # Query t may attend key s if s <= t (causal) and s is an item; always to itself, so that leading
        # padding positions (which have no earlier item) do not get a fully masked row -> NaN.
        causal = steps[None, :] <= steps[:, None]  # [L, L] (query, key)
        diagonal = steps[None, :] == steps[:, None]  # [L, L]
        is_item = (item_ids != PAD)[:, None, None, :]  # [B, 1, 1, L] (broadcast over heads, queries)
        allowed = (causal & is_item) | diagonal  # [B, 1, L, L]
        return x, allowed

    def encode(self, item_ids: Tensor, gaps: Tensor | None = None) -> Tensor:
        """Shopper embedding, the hidden state at the last (most recent) position: [B, L] -> [B, d].

        Equal to ``forward(item_ids, gaps)[:, -1]``, computing only what that position needs
        (:func:`last_state`).
        """
        x, allowed = self._inputs(item_ids, gaps)
        return self.ln_final(last_state(self.blocks, x, allowed))

    def item_embeddings(self) -> Tensor:
        """Output item embeddings [V, d], row i = vocabulary index i, tied with the input table.

        Row 0 (padding) is returned as zeros built outside the table: ``padding_idx`` only blocks the input
        lookup's gradient, so without this a full-softmax loss would train the padding row through scoring.
        """
        weight = self.item_emb.weight  # [V, d]
        return torch.cat([weight.new_zeros(1, weight.shape[1]), weight[1:]])  # [V, d], row 0 zero
