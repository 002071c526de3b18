"""The evaluation protocol of docs/evaluation.md: global temporal split, next-basket targets, metrics.

``prepare`` turns receipts into everything a ranking needs (train rows, vocabulary, targets);
``evaluate`` scores ranked product ids against it, in-vocabulary and "all items" variants alike, so
baselines and models are reported by the same code; ``new_product_targets`` narrows it to what "new to
you" lists (products the shopper never bought) are judged on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import numpy as np
import pyarrow as pa

from recsys.data.sequences import build_sequences
from recsys.data.split import Targets, next_basket_targets, temporal_split
from recsys.data.vocabulary import Vocabulary
from recsys.evaluation import baselines
from recsys.evaluation.metrics import ranking_metrics
from recsys.inputs import Histories

UNBOUGHT_POPULARITY = "popularity_among_unbought"


@dataclass(frozen=True)
class EvaluationData:
    """Training rows, vocabulary and targets for one cutoff."""

    cutoff: datetime
    train: pa.Table
    vocab: Vocabulary
    targets: Targets


def prepare(
    receipts: pa.Table, cutoff: datetime, min_baskets: int = 5, horizon: timedelta | None = None
) -> EvaluationData:
    """Split at ``cutoff``; vocabulary = products in >= ``min_baskets`` train baskets; next-basket targets."""
    train, test = temporal_split(receipts, cutoff)
    if train.num_rows == 0:
        raise ValueError(f"no receipts before the cutoff {cutoff.isoformat()}")
    if test.num_rows == 0:
        raise ValueError(f"no receipts at or after the cutoff {cutoff.isoformat()}")
    vocab = Vocabulary.build(train, min_baskets=min_baskets)
    return EvaluationData(cutoff, train, vocab, next_basket_targets(train, test, vocab, horizon))


def new_product_targets(data: EvaluationData) -> EvaluationData:
    """``data`` for "new to you" lists: each target cut to the products its shopper had not bought in
    training, and the shoppers left without one dropped. Recall@k on it is each shopper's explore
    recall, so its mean is ``recall@k_explore`` of the whole data."""
    targets = data.targets
    items = [np.setdiff1d(t, h) for t, h in zip(targets.items, targets.history, strict=True)]
    kept = np.flatnonzero([len(t) > 0 for t in items])
    every = [np.setdiff1d(targets.all_items[i], targets.history[i]) for i in kept]
    cut = Targets(
        shopper_ids=targets.shopper_ids[kept],
        items=[items[i] for i in kept],
        all_items=every,
        history=[targets.history[i] for i in kept],
    )
    return replace(data, targets=cut)


def evaluated_histories(data: EvaluationData, vocab: Vocabulary) -> Histories:
    """The training histories of ``data``'s evaluated shoppers (in ``targets`` order) as a model with
    ``vocab`` reads them, through the model-input front-end (``recsys.inputs``) serving uses."""
    return Histories.from_sequences(build_sequences(data.train, vocab).select(data.targets.shopper_ids))


def evaluate(ranked_ids: np.ndarray, data: EvaluationData, ks: Sequence[int] = (10, 20)) -> dict[str, float]:
    """Metrics of ranked product ids ``[n, K]`` (rows aligned with ``data.targets.shopper_ids``).

    Keys as :func:`ranking_metrics`, plus ``all_items/recall@k`` and ``all_items/ndcg@k`` where
    out-of-vocabulary target products count as misses.
    """
    targets = data.targets
    if len(ranked_ids) != len(targets.shopper_ids):
        raise ValueError(f"{len(ranked_ids)} ranked rows for {len(targets.shopper_ids)} evaluated shoppers")
    metrics = ranking_metrics(ranked_ids, targets.items, ks, targets.history, data.vocab.num_products)
    every = ranking_metrics(ranked_ids, targets.all_items, ks)
    for k in ks:
        for name in ("recall", "ndcg"):
            metrics[f"all_items/{name}@{k}"] = every[f"{name}@{k}"]
    return metrics


def baseline_rankings(
    data: EvaluationData, k: int, half_life_days: float = 120.0, knn_neighbours: int | None = None
) -> dict[str, np.ndarray]:
    """Ranked product ids ``[n, k]`` of every baseline for the evaluated shoppers."""
    shoppers = data.targets.shopper_ids
    indices = {
        "popularity": baselines.popularity(data.vocab, len(shoppers), k),
        "personal_frequency": baselines.personal_frequency(data.train, data.vocab, shoppers, k),
        f"personal_frequency_decay_{half_life_days:g}d": baselines.personal_frequency(
            data.train, data.vocab, shoppers, k, cutoff=data.cutoff, half_life_days=half_life_days
        ),
        "item_knn": baselines.item_knn(data.train, data.vocab, shoppers, k, neighbours=knn_neighbours),
    }
    return {name: data.vocab.decode(ranked) for name, ranked in indices.items()}


def new_to_you_rankings(data: EvaluationData, k: int) -> dict[str, np.ndarray]:
    """Ranked product ids ``[n, k]`` of the "new to you" baseline, popularity among the products each
    shopper never bought (``EMPTY``-padded), for ``data``'s evaluated shoppers."""
    ranked = baselines.popularity_among_unbought(data.vocab, data.targets.history, k)
    return {UNBOUGHT_POPULARITY: data.vocab.decode(ranked)}
