"""Next-item losses over the catalogue; models produce hidden states, these turn them into a loss.

- ``full_softmax``: exact cross-entropy over every product. Best signal; costs ``N x V x d`` per step,
  fine on a GPU for catalogues up to a few hundred thousand products.
- ``sampled_softmax``: cross-entropy over the positive and ``M`` shared negatives drawn from a proposal
  ``q`` (popularity-smoothed), with the logQ correction of Yi et al. (2019) so the estimate is not
  biased towards unpopular products. Costs ``N x M x d``: use it on CPU or for very large catalogues.
- ``gbce``: gSASRec's generalised binary cross-entropy over the positive and ``M`` uniform negatives per
  row, calibrated so that sampling does not make the model overconfident (Petrov & Macdonald, 2023).
- ``in_batch_softmax`` / ``mixed_softmax``: cross-entropy over the batch's own targets (plus ``M`` uniform
  negatives for mixed), logQ-corrected; no sampling from the catalogue at all for in-batch.

``docs/losses.md`` says when to use which. Negatives are drawn by the caller (``uniform_negatives``) for
the losses added with gSASRec, so those are deterministic functions of their inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from recsys.data.vocabulary import PRODUCTS, RESERVED, index_count, product_count


def full_softmax(hidden: Tensor, targets: Tensor, item_embeddings: Tensor) -> Tensor:
    """Mean cross-entropy of ``targets`` [N] given ``hidden`` [N, d] against all items [V, d]."""
    logits = hidden @ item_embeddings.T  # [N, V]
    logits[:, RESERVED] = float("-inf")  # padding / unknown are never a valid next product
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

    ``popularity`` [num products] counts per product; alpha < 1 flattens the proposal so the tail
    still gets sampled (word2vec's 0.75).
    """
    weights = popularity.double().clamp_min(1) ** alpha
    log_q = torch.full((index_count(len(popularity)),), float("-inf"), dtype=torch.float64)
    log_q[PRODUCTS] = (weights / weights.sum()).log()
    return log_q.float()


def uniform_negatives(
    num_items: int,
    size: int | tuple[int, ...],
    device: torch.device | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Product indices of shape ``size``, uniform with replacement over the products below ``num_items``.

    ``num_items`` is the number of scored rows (``item_embeddings`` rows): padding, unknown and anything a
    model keeps past the vocabulary (BERT4Rec's MASK) are never drawn.
    """
    size = (size,) if isinstance(size, int) else size
    return torch.randint(PRODUCTS.start, num_items, size, device=device, generator=generator)


def gbce(
    hidden: Tensor, targets: Tensor, item_embeddings: Tensor, negatives: Tensor, t: float = 0.75
) -> Tensor:
    """gSASRec's generalised binary cross-entropy (Petrov & Macdonald, RecSys 2023), mean over rows.

    Per row: ``-(beta * log sigmoid(s+) + sum_j log(1 - sigmoid(s_j))) / (1 + M)`` over the positive score
    ``s+`` and the scores of the row's own uniform ``negatives`` [N, M] (``uniform_negatives``); a negative
    equal to the row's positive is left out. With ``alpha = M / (P - 1)`` the sampling rate of ``P``
    products, ``beta = alpha * (t * (1 - 1/alpha) + 1/alpha)``: ``t = 0`` is plain BCE, whose sampled
    training overestimates positive probabilities, ``t = 1`` fully calibrates the scores to the whole
    catalogue (Petrov & Macdonald recommend 0.75).

    Negatives are per row, as in gSASRec, at ``N x M x d`` memory: negatives shared by the batch are
    pushed down by every row in the same step, and in a probe on synthetic data (one batch, 16 negatives,
    240 steps) that raised the exact softmax loss where per-row negatives lowered it.
    """
    num_products = product_count(item_embeddings.shape[0])
    alpha = negatives.shape[1] / (num_products - 1)
    if not 0 < alpha <= 1:
        raise ValueError(
            f"gbce needs 1 <= negatives <= products - 1; got {negatives.shape[1]} of {num_products}"
        )
    beta = alpha * (t * (1 - 1 / alpha) + 1 / alpha)
    positive = (hidden * item_embeddings[targets]).sum(-1)  # [N]
    negative = torch.einsum("nd,nmd->nm", hidden, item_embeddings[negatives])  # [N, M]
    # log(1 - sigmoid(s)) = log sigmoid(-s), stable for any s; accidental hits contribute nothing
    negative_terms = F.logsigmoid(-negative.float()).masked_fill(negatives == targets[:, None], 0.0)
    per_row = beta * F.logsigmoid(positive.float()) + negative_terms.sum(1)  # [N]
    return -(per_row / (1 + negatives.shape[1])).mean()


def in_batch_softmax(hidden: Tensor, targets: Tensor, item_embeddings: Tensor, log_p: Tensor) -> Tensor:
    """Cross-entropy over the batch's distinct targets, logQ-corrected (Yi et al., 2019).

    Each row's negatives are the other rows' targets, so no catalogue-wide sampling or scoring happens:
    the cost is ``N x U x d`` for ``U`` distinct targets. Popular products are in-batch negatives more
    often, which would push them down; the correction (see ``mixed_softmax``) removes that bias.
    ``log_p`` [V] is the log frequency of each item as a target (``-inf`` for reserved indices).
    """
    return mixed_softmax(hidden, targets, item_embeddings, log_p, targets.new_empty(0))


def mixed_softmax(
    hidden: Tensor, targets: Tensor, item_embeddings: Tensor, log_p: Tensor, negatives: Tensor
) -> Tensor:
    """Cross-entropy over the batch's distinct targets plus uniform ``negatives`` [M] (Yang et al., 2020).

    The uniform part reaches tail products that rarely appear in a batch. Every candidate's logit is
    corrected by the log of its expected count among the candidates: ``1 - (1 - p)^N``, the chance that
    one of the ``N`` targets (deduplicated) is the item, with ``p = exp(log_p)``, plus ``M / P`` from the
    uniform draw over ``P`` products. A uniform negative equal to a row's positive is left out of that row.
    """
    num_products = product_count(item_embeddings.shape[0])
    in_batch, positive = torch.unique(targets, return_inverse=True)  # [U], [N]: row i's column positive[i]
    candidates = torch.cat([in_batch, negatives])  # [U + M]
    p = log_p[candidates].double().exp()
    in_batch_chance = -torch.expm1(len(targets) * torch.log1p(-p))  # 1 - (1 - p)^N without cancellation
    log_count = (in_batch_chance + len(negatives) / num_products).log()  # [U + M]
    logits = hidden @ item_embeddings[candidates].T - log_count.float()  # [N, U + M]
    batch_logits, uniform_logits = logits.split([len(in_batch), len(negatives)], dim=1)
    accidental = negatives[None, :] == targets[:, None]  # [N, M], a uniform negative is the row's positive
    logits = torch.cat([batch_logits, uniform_logits.masked_fill(accidental, float("-inf"))], dim=1)
    return F.cross_entropy(logits.float(), positive)
