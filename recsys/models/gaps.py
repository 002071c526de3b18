"""Basket-aware inputs: an embedding of the time gap before each purchase row.

Receipts are baskets, sets of products bought at one time, not a strict order. A sequence model that sees
only item ids cannot tell "bought together" from "bought a month apart". With ``time_gaps`` on, a model
also takes ``gaps`` [B, L] float32 (``recsys.data.sequences.purchase_gaps``: days since the previous row,
0 inside a basket, ``FIRST_PURCHASE`` for a history's first row) and adds the embedding of its bucket to
each position's input. Zero gaps mark the basket boundaries; the log-scale buckets carry the rhythm
(daily top-ups vs. fortnightly shops). Gaps only look back, so a causal model stays causal, and a gap does
not depend on when the history is read, so serving needs no clock.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from recsys.data.vocabulary import PAD

# bucket 0: padding (a zero row); 1: a history's first row; 2: same basket (gap 0); 3: unknown (BERT4Rec's
# MASK, whose time is not an input); then floor(log2(1 + 4 * days)) from 0 (under 6 hours) to 11 (> 1 year)
PADDING, FIRST, SAME_BASKET, UNKNOWN, LOG_START = 0, 1, 2, 3, 4
NUM_LOG_BUCKETS = 12
NUM_BUCKETS = LOG_START + NUM_LOG_BUCKETS


def gap_buckets(item_ids: Tensor, gaps: Tensor) -> Tensor:
    """Bucket [B, L] int64 of each position's gap (``gaps`` [B, L] in days); padding gets ``PADDING``."""
    log_bucket = torch.floor(torch.log2(1.0 + 4.0 * gaps.clamp(min=0.0))).clamp(max=NUM_LOG_BUCKETS - 1)
    buckets = torch.where(gaps > 0, LOG_START + log_bucket.long(), SAME_BASKET)
    buckets = torch.where(gaps < 0, FIRST, buckets)
    return torch.where(item_ids == PAD, PADDING, buckets)


class GapEmbedding(nn.Module):
    """Gaps [B, L] -> [B, L, d] embeddings of their buckets, exactly zero at padding positions."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.table = nn.Embedding(NUM_BUCKETS, dim, padding_idx=PADDING)

    def forward(self, item_ids: Tensor, gaps: Tensor, unknown: Tensor | None = None) -> Tensor:
        """``unknown`` [B, L] bool marks positions whose gap is not an input (they get ``UNKNOWN``)."""
        buckets = gap_buckets(item_ids, gaps)
        if unknown is not None:
            buckets = torch.where(unknown, UNKNOWN, buckets)
        return self.table(buckets)


def require_gaps(item_ids: Tensor, gaps: Tensor | None) -> Tensor:
    """``gaps``, checked to be given and shaped like ``item_ids``, for models built with ``time_gaps``."""
    if gaps is None:
        raise ValueError("this model was built with time_gaps=True: pass gaps (days since the previous row)")
    if gaps.shape != item_ids.shape:
        raise ValueError(f"gaps have shape {tuple(gaps.shape)}, item_ids {tuple(item_ids.shape)}")
    return gaps
