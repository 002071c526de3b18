"""Next-item losses over the catalogue; models produce hidden states, these turn them into a loss.

- ``full_softmax``: exact cross-entropy over every product. Best signal; costs ``N x V x d`` per step,
  fine on a GPU for catalogues up to a few hundred thousand products.
- ``sampled_softmax``: cross-entropy over the positive and ``M`` shared negatives drawn from a proposal
  ``q`` (popularity-smoothed), with the logQ correction of Yi et al. (2019) so the estimate is not
  biased towards unpopular products. Costs ``N x M x d``: use it on CPU or for very large catalogues.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from recsys.data.vocabulary import NUM_RESERVED


def full_softmax(hidden: Tensor, targets: Tensor, item_embeddings: Tensor) -> Tensor:
    """Mean cross-entropy of ``targets`` [N] given ``hidden`` [N, d] against all items [V, d]."""
    logits = hidden @ item_embeddings.T  # [N, V]
    logits[:, :NUM_RESERVED] = float("-inf")  # padding / unknown are never a valid next product
    return F.cross_entropy(logits.float(), targets)


def sampled_softmax(
    hidden: Tensor, targets: Tensor, item_embeddings: Tensor, log_q: Tensor, num_negatives: int
) -> Tensor:
    """Cross-entropy over the positive and ``num_negatives`` shared negatives, logQ-corrected.

    ``log_q`` [V] is the log proposal probability of each item (``-inf`` for reserved indices);
    negatives equal to a row's positive ("accidental hits") are masked out of that row.
    """
    negatives = torch.multinomial(log_q.exp(), num_negatives, replacement=True)  # [M]
    positive = (hidden * item_embeddings[targets]).sum(-1) - log_q[targets]  # [N]
    negative = hidden @ item_embeddings[negatives].T - log_q[negatives]  # [N, M]
    negative = negative.masked_fill(negatives[None, :] == targets[:, None], float("-inf"))
    logits = torch.cat([positive[:, None], negative], dim=1)  # [N, 1 + M], the positive in column 0
    return F.cross_entropy(logits.float(), torch.zeros_like(targets))


def popularity_log_q(popularity: Tensor, alpha: float = 0.75) -> Tensor:
    """log q over vocabulary indices with ``q ∝ popularity ** alpha``; reserved indices get ``-inf``.

    ``popularity`` [V - NUM_RESERVED] counts per product; alpha < 1 flattens the proposal so the tail
    still gets sampled (word2vec's 0.75).
    """
    weights = popularity.double().clamp_min(1) ** alpha
    log_q = torch.full((len(popularity) + NUM_RESERVED,), float("-inf"), dtype=torch.float64)
    log_q[NUM_RESERVED:] = (weights / weights.sum()).log()
    return log_q.float()
