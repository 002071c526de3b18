"""The ranker: gradient-boosted trees (LightGBM) turn candidate features into P(in the next basket).

In grocery about half of a next basket was bought before, and a shopper's own purchase pattern is the
baseline to beat. The network (shopper encoder + item index) proposes new products and scores them; the
ranker scores every candidate pair (:mod:`recsys.candidate_sources`) from its row of features
(:func:`recsys.rank_features.features`) with one binary LightGBM model fitted in ``training.rank`` on
stacked internal cutoffs, so repeat and new products compete on one probability scale and ``min_score``
is a probability. With a ``size_prior`` the list is ordered by each product's probability times its
size factor (:func:`recsys.rank_features.features`: what a hit on it is worth to the household's
macro-averaged Recall and NDCG), while scores, ``min_score`` and audiences keep the probability.

The model travels as LightGBM's own text format: plain numbers and names, no code, checked and run by
:class:`recsys.trees.Trees` (ONNX Runtime, LightGBM's predictions to within two units in the last
place). It names its features; the ranker refuses a model whose features differ from the ones it
declares, or a :data:`VERSION` other than this library's. Serving
(:class:`serving.Recommender`), the batch job and training's test metrics all reach :meth:`Ranker.blend`
through :func:`recsys.scoring.recommend`. No torch on this path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from recsys.data.sequences import concat_ranges
from recsys.inputs import Histories
from recsys.rank_features import Candidates, ItemStats, feature_names, features
from recsys.trees import Trees

VERSION = 1  # of the ranker's features and their meaning: a model fitted on another version is refused
STAT_COLUMNS = ("popularity", "repeat_rate", "trend", "interval", "buyers")
MAX_SIZE_PRIOR = 1e6  # prior baskets of the size factor: beyond this the factor is 1 to float precision


def per_shopper(
    owner: np.ndarray,
    item_rows: np.ndarray,
    probability: np.ndarray,
    size_factor: np.ndarray,
    num_shoppers: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat candidates [M] (owners ascending), their probabilities and size factors as :meth:`Ranker.blend`'s
    per-shopper rows [S, W] (-1 padding), probabilities and order keys [S, W] float32 (NaN padding)."""
    count = np.bincount(owner, minlength=num_shoppers)
    width = max(int(count.max(initial=0)), 1)
    slot = concat_ranges(np.zeros_like(count), count)  # owners ascend: the position within a shopper
    rows = np.full((num_shoppers, width), -1, dtype=np.int64)
    scores = np.full((num_shoppers, width), np.nan, dtype=np.float32)
    order = np.full((num_shoppers, width), np.nan, dtype=np.float32)
    rows[owner, slot] = item_rows
    scores[owner, slot] = probability
    order[owner, slot] = probability * size_factor
    return rows, scores, order


@dataclass(frozen=True)
class Ranker:
    """A fitted LightGBM model over the named ``features`` plus the per-product statistics they read.

    ``features`` is the model's input columns, a subset of :func:`recsys.rank_features.feature_names` in
    its order (an ablation drops some); ``new_candidates``, ``co_purchase_candidates`` and
    ``category_candidates`` size the candidate sources, the same in the fit and wherever it is applied.
    ``size_prior`` (> 0) orders lists by probability times the basket-size factor with that many prior
    baskets; None orders them by probability alone (rankers written before the factor existed).
    """

    model: str  # LightGBM's text model
    stats: ItemStats
    features: tuple[str, ...]
    new_candidates: int
    co_purchase_candidates: int = 0
    category_candidates: int = 0
    history_candidates: int = 0  # 0: every history product
    size_prior: float | None = None
    trees: Trees = field(init=False, repr=False, compare=False)
    columns: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("new_candidates", "co_purchase_candidates", "category_candidates", "history_candidates"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        prior = self.size_prior
        # a range test refuses NaN, infinities and integers too large for a float alike
        if prior is not None and (
            isinstance(prior, bool) or not isinstance(prior, int | float) or not 0 < prior <= MAX_SIZE_PRIOR
        ):
            raise ValueError(f"size_prior must be None or a number in (0, {MAX_SIZE_PRIOR:g}], got {prior!r}")
        if prior is not None:
            object.__setattr__(self, "size_prior", float(prior))
        known = feature_names(self.stats.levels)
        if not self.features or any(f not in known for f in self.features):
            unknown = [f for f in self.features if f not in known]
            raise ValueError(f"ranker features {unknown or '[]'} are not features of this library: {known}")
        object.__setattr__(self, "trees", Trees(self.model, self.features))
        object.__setattr__(self, "columns", np.array([known.index(f) for f in self.features], dtype=np.int64))

    @property
    def num_items(self) -> int:
        return self.stats.num_items

    def probability(self, x: np.ndarray, threads: int = 1) -> np.ndarray:
        """P(in the next basket) [M] of full feature rows [M, F] (every column of ``feature_names``), on
        ``threads`` threads (serving keeps one per request; a batch job may use its cores)."""
        return self.trees.probability(x[:, self.columns], threads)

    def candidates(self, histories: Histories, rows: np.ndarray, scores: np.ndarray) -> Candidates:
        """The candidate pairs and their feature rows (:class:`recsys.rank_features.Candidates`)."""
        return features(
            histories,
            np.asarray(rows, dtype=np.int64),
            scores,
            self.stats,
            self.new_candidates,
            self.co_purchase_candidates,
            self.category_candidates,
            self.history_candidates,
            self.size_prior,
        )

    def blend(
        self, histories: Histories, rows: np.ndarray, scores: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each shopper's candidates (history products, the network's and the other sources' new ones),
        scored by P(in the next basket), and the keys that order them (the probability times the size
        factor with a :attr:`size_prior`, else the probability).

        The network's pool is the shopper's best :attr:`new_candidates` searched products new to it (the
        search must hold that many beyond the history: :func:`recsys.scoring.search_size`). No source
        depends on how many products a caller wants, so every list is the prefix of a longer one, and
        serving, the batch job and training agree.

        Returns rows [B, W] int64 (-1 padding), scores [B, W] float32 (NaN padding) and order keys [B, W]
        float32, unordered: feed them to :func:`recsys.scoring.select` (``order=``), which ranks and
        applies the rules.
        """
        found = self.candidates(histories, rows, scores)
        probability = self.probability(found.x)
        return per_shopper(found.owner, found.rows, probability, found.size_factor, histories.num_shoppers)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the model text and the per-item arrays, as plain values (a bundle keeps the model
        as a file and the arrays as ``items.parquet`` columns; a checkpoint keeps them beside these)."""
        return {
            "version": VERSION,
            "features": list(self.features),
            "category_levels": self.stats.levels,
            "neighbours": int(self.stats.neighbours.shape[1]),
            "new_candidates": self.new_candidates,
            "co_purchase_candidates": self.co_purchase_candidates,
            "category_candidates": self.category_candidates,
            "history_candidates": self.history_candidates,
            "size_prior": self.size_prior,
        }

    def item_columns(self) -> dict[str, np.ndarray]:
        """The per-item statistics as named 1-D columns (one row per item row)."""
        columns = {name: getattr(self.stats, name) for name in STAT_COLUMNS}
        for level in range(self.stats.levels):
            columns[f"category_{level}"] = self.stats.categories[:, level]
        for j in range(self.stats.neighbours.shape[1]):
            columns[f"neighbour_{j}"] = self.stats.neighbours[:, j]
            columns[f"neighbour_score_{j}"] = self.stats.neighbour_scores[:, j]
        return columns

    @classmethod
    def from_parts(cls, data: dict[str, Any], model: str, columns: dict[str, np.ndarray]) -> Ranker:
        """Inverse of :meth:`to_dict`, the model text and :meth:`item_columns`; refuses another version,
        unknown features, and missing, mistyped or non-finite values (ValueError naming the key)."""
        if not isinstance(data, dict):
            raise ValueError(f"a ranker is a mapping, got {type(data).__name__}")
        if data.get("version") != VERSION:
            raise ValueError(f"ranker version {data.get('version')!r}; this library reads version {VERSION}")
        integers = {}
        for key in (
            "category_levels",
            "neighbours",
            "new_candidates",
            "co_purchase_candidates",
            "category_candidates",
            "history_candidates",
        ):
            value = data.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"ranker {key!r} must be an integer >= 0, got {value!r}")
            integers[key] = value
        names = data.get("features")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError("ranker 'features' must be a list of names")
        wanted = [*STAT_COLUMNS, *(f"category_{i}" for i in range(integers["category_levels"]))]
        wanted += [f"neighbour{kind}_{j}" for j in range(integers["neighbours"]) for kind in ("", "_score")]
        missing = [name for name in wanted if name not in columns]
        if missing:
            raise ValueError(f"ranker item columns {missing} are missing")
        array = {name: np.asarray(columns[name]) for name in wanted}
        levels, neighbours = integers["category_levels"], integers["neighbours"]
        n = len(array["popularity"])
        stats = ItemStats(
            *(array[name].astype(np.float64) for name in STAT_COLUMNS),
            np.stack([array[f"category_{i}"] for i in range(levels)], axis=1).astype(np.int64)
            if levels
            else np.zeros((n, 0), np.int64),
            np.stack([array[f"neighbour_{j}"] for j in range(neighbours)], axis=1).astype(np.int64)
            if neighbours
            else np.zeros((n, 0), np.int64),
            np.stack([array[f"neighbour_score_{j}"] for j in range(neighbours)], axis=1).astype(np.float64)
            if neighbours
            else np.zeros((n, 0)),
        )
        return cls(
            model,
            stats,
            tuple(names),
            integers["new_candidates"],
            integers["co_purchase_candidates"],
            integers["category_candidates"],
            integers["history_candidates"],
            data.get("size_prior"),  # checked by the constructor
        )
