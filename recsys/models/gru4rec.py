"""GRU4Rec: a gated recurrent unit over a shopper's item sequence (Hidasi et al., 2016).

Inputs follow ``recsys.data.vocabulary``: index 0 is padding, 1 the unknown product, products start at 2,
and sequences are LEFT-padded so the most recent item is always at the last position. The model returns
hidden states only; scores are ``encode(x) @ item_embeddings().T`` and losses live in the training code
(``training.module``'s causal objective replaces the paper's session-parallel mini-batches and TOP1/BPR
losses: every position of a window predicts the item after it).

Left padding is invisible by construction: the padding embedding is zero, dropout keeps zeros zero, and
the GRU has no biases and starts from a zero state, so through leading padding every gate sees exactly 0
and the state stays 0 (``n = tanh(0) = 0``, ``h' = (1 - z) * n + z * h = 0``). The first item therefore
meets the same zero state however many padding columns precede it.

``nn.GRU`` exports through ``export/onnx.py``'s dynamo exporter as the ONNX ``GRU`` operator (one per
layer, ``linear_before_reset=1`` as in torch), whose sequence axis stays dynamic; torch 2.13 pins that axis
on a second GRU export in one process (``tests/test_gru4rec.py`` has the workaround).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from recsys.data.vocabulary import PAD
from recsys.models.gaps import PADDING, GapEmbedding, require_gaps
from recsys.models.sasrec import SASRec


@dataclass
class GRU4RecConfig:
    """Hyper-parameters; ``dataclasses.asdict`` of it is what checkpoints store."""

    num_items: int  # vocabulary size incl. reserved ids (embedding rows)
    max_len: int = 50  # longest history callers pass (the recurrence itself takes any length)
    dim: int = 64  # item embedding and GRU state width
    num_layers: int = 1
    dropout: float = 0.2  # on item embeddings, between GRU layers and on the output states
    time_gaps: bool = False  # basket-aware inputs: also take each row's gap (recsys.models.gaps)

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")

    def build(self) -> GRU4Rec:
        """A freshly initialised model with this configuration."""
        return GRU4Rec(self)


class GRU4Rec(nn.Module):
    """Bias-free multi-layer GRU encoder of left-padded item sequences, tied input/output item embeddings.

    Tied, like the reference implementation's ``constrained_embedding``: one table instead of two halves
    the parameters on a large catalogue, and a rare product learns from being bought (input) as well as
    from being predicted (output). The output projection maps the tanh-bounded GRU state into the item
    space, so the table need not serve both roles at one scale; its bias adds an item-dependent score
    ``bias @ item``, a learned popularity prior.
    """

    def __init__(self, config: GRU4RecConfig) -> None:
        super().__init__()
        self.config = config
        d = config.dim
        self.item_emb = nn.Embedding(config.num_items, d, padding_idx=PAD)
        self.gap_emb = GapEmbedding(d) if config.time_gaps else None
        self.emb_dropout = nn.Dropout(config.dropout)
        # nn.GRU's own dropout acts between layers only (it warns when there is one layer)
        inter_layer_dropout = config.dropout if config.num_layers > 1 else 0.0
        # bias=False is what keeps the state exactly zero through leading padding (module docstring)
        self.gru = nn.GRU(d, d, config.num_layers, bias=False, batch_first=True, dropout=inter_layer_dropout)
        self.out_dropout = nn.Dropout(config.dropout)
        self.proj = nn.Linear(d, d)
        # Unit-norm item vectors (std d^-1/2 per component): the GRU's gates see inputs of order 1, where
        # sigmoid and tanh are neither flat nor saturated (SASRec's std 0.02 left synthetic recall@10 at
        # 0.16 instead of 0.26 after 3 epochs). The GRU keeps torch's uniform(+-d^-1/2) init.
        nn.init.normal_(self.item_emb.weight, mean=0.0, std=d**-0.5)
        nn.init.zeros_(self.item_emb.weight[PAD])  # normal_ overwrote the zero row padding_idx set up
        if self.gap_emb is not None:  # the same scale for the gap part of the input
            nn.init.normal_(self.gap_emb.table.weight, mean=0.0, std=d**-0.5)
            nn.init.zeros_(self.gap_emb.table.weight[PADDING])
        nn.init.normal_(self.proj.weight, mean=0.0, std=0.02)  # small initial logits
        nn.init.zeros_(self.proj.bias)

    def forward(self, item_ids: Tensor, gaps: Tensor | None = None) -> Tensor:
        """Hidden state after every position: [B, L] int64 (and gaps [B, L] with ``time_gaps``) -> [B, L, d].

        A recurrence only looks back, so output t depends on items at positions <= t and is trained to
        predict item t + 1. Outputs at leading padding positions are ``proj``'s bias (the state is zero).
        """
        return self.proj(self.out_dropout(self._states(item_ids, gaps)))

    def _states(self, item_ids: Tensor, gaps: Tensor | None) -> Tensor:
        """The last GRU layer's state after every position, [B, L] -> [B, L, d]."""
        x = self.item_emb(item_ids)  # [B, L, d], exactly zero at padding, as is the gap embedding
        if self.gap_emb is not None:
            x = x + self.gap_emb(item_ids, require_gaps(item_ids, gaps))
        x = self.emb_dropout(x)
        states, _ = self.gru(x)  # [B, L, d], from a zero initial state
        return states

    def encode(self, item_ids: Tensor, gaps: Tensor | None = None) -> Tensor:
        """Shopper embedding, the output at the last (most recent) position: [B, L] -> [B, d].

        Equal to ``forward(item_ids, gaps)[:, -1]``; the recurrence needs every state, the output
        projection only the last one's.
        """
        return self.proj(self.out_dropout(self._states(item_ids, gaps)[:, -1]))

    # Output item embeddings [V, d]: SASRec's tied table with row 0 (padding) returned as zeros built
    # outside it. It reads only ``self.item_emb``, which both models name alike.
    item_embeddings = SASRec.item_embeddings
