"""How much can similar households add to a household's own decayed purchase frequency on Complete Journey?

A TIFU-kNN-style blend (Hu et al., 2020), scored on docs/evaluation.md's test split:
``score = alpha * own + (1 - alpha) * neighbours``, where ``own`` is the household's 120-day-decayed basket
counts divided by their sum and ``neighbours`` the similarity-weighted mean of that vector over its ``k``
most cosine-similar households. Every (k, alpha) of the grid is scored on the test split itself, so the
best row is an upper bound on what the blend could give after honest tuning. ``alpha = 1`` is the
decayed-frequency baseline.

    python -m benchmarks.cj_neighbours [--cutoff 2017-12-01] [--neighbours 50 200 600] [--alphas 0.9 0.7]
"""

from __future__ import annotations

import argparse

import numpy as np
import pyarrow.compute as pc
import scipy.sparse as sp

from recsys.data.completejourney import load_complete_journey
from recsys.data.schema import SHOPPER
from recsys.data.split import parse_cutoff
from recsys.data.vocabulary import PRODUCTS
from recsys.evaluation.baselines import purchase_counts
from recsys.evaluation.metrics import top_k
from recsys.evaluation.protocol import evaluate, prepare


def _row_scaled(matrix: sp.csr_matrix, scale: np.ndarray) -> sp.csr_matrix:
    """Each row of ``matrix`` divided by its entry of ``scale`` (zero rows stay zero)."""
    return sp.csr_matrix(sp.diags(1.0 / np.maximum(scale, 1e-12)) @ matrix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cutoff", default="2017-12-01")
    parser.add_argument("--neighbours", type=int, nargs="+", default=[50, 200, 600])
    parser.add_argument("--alphas", type=float, nargs="+", default=[1.0, 0.95, 0.9, 0.8, 0.7, 0.5])
    args = parser.parse_args()

    data = prepare(load_complete_journey(), parse_cutoff(args.cutoff, "America/New_York"), min_baskets=5)
    households = np.sort(pc.unique(data.train.column(SHOPPER)).to_numpy())
    counts = purchase_counts(data.train, data.vocab, households, data.cutoff, half_life_days=120.0).tocsr()
    share = _row_scaled(counts, np.asarray(counts.sum(axis=1)).ravel())  # [H, V]
    unit = _row_scaled(counts, np.sqrt(np.asarray(counts.multiply(counts).sum(axis=1)).ravel()))
    rows = np.searchsorted(households, data.targets.shopper_ids)  # evaluated households (all have history)
    similarity = (unit[rows] @ unit.T).toarray()  # [n, H] cosine
    similarity[np.arange(len(rows)), rows] = -np.inf  # never one's own neighbour
    own = share[rows].toarray()  # [n, V]

    print("| neighbours | alpha | recall@10 | ndcg@10 | repeat recall@10 | explore recall@10 |")
    print("|---|---|---|---|---|---|")
    for k in args.neighbours:
        nearest = np.argpartition(-similarity, k, axis=1)[:, :k]  # [n, k]
        weights = np.take_along_axis(similarity, nearest, axis=1)
        weights /= np.maximum(weights.sum(axis=1, keepdims=True), 1e-12)
        # [n, H] sparse weights @ [H, V] shares -> the neighbours' weighted mean [n, V]
        mixing = sp.csr_matrix(
            (weights.ravel(), nearest.ravel(), np.arange(0, weights.size + 1, k)), similarity.shape
        )
        neighbours = (mixing @ share).toarray()
        for alpha in args.alphas:
            scores = (alpha * own + (1 - alpha) * neighbours)[:, PRODUCTS]  # [n, N] by item row
            # equal scores (zeros included) rank by popularity, as the baselines do: item-row order
            ranked = data.vocab.product_ids_of(top_k(scores, 10))
            m = evaluate(ranked, data, (10,))
            print(
                f"| {k} | {alpha:g} | {m['recall@10']:.4f} | {m['ndcg@10']:.4f} | "
                f"{m['recall@10_repeat']:.4f} | {m['recall@10_explore']:.4f} |"
            )


if __name__ == "__main__":
    main()
