"""A learned, calibrated combination of scores: a shopper's probability of an outcome from a few numbers.

A campaign's raw propensity (:mod:`recsys.propensity`) ranks the shoppers new to its products, where their
own history cannot; among those who buy the products, their own recency-weighted frequency ranks better
(docs/results.md). A :class:`Combination` learns how to weigh such scores where the outcome is known:

1. a small binary LightGBM model over the named columns, non-decreasing in those marked so (more evidence
   of buying never lowers the probability), fitted on the examples;
2. isotonic calibration (:func:`recsys.calibration.fit_isotonic`) of that model's *cross-fitted*
   output: each of two folds of the examples is predicted by the model fitted on the other fold, so the
   calibration sees the errors the model makes on shoppers it was not fitted on (scikit-learn's
   ``CalibratedClassifierCV(ensemble=False)`` does the same); the model applied is then the one fitted on
   every example.

With fewer than :data:`MIN_OUTCOMES` examples of either outcome, trees would fit noise: the combination
is then the first column alone, calibrated (``model`` None). Both parts travel as plain values: the
LightGBM text model (checked and run by :class:`recsys.trees.Trees`) and the isotonic knots. No torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightgbm
import numpy as np

from recsys.calibration import Calibration, fit_isotonic
from recsys.trees import Trees, verified_trees

MIN_OUTCOMES = 50  # examples of each outcome a model is fitted on; fewer: the first column alone
MAX_MODEL_CHARS = 2_000_000  # a stored model's size limit (a fitted one is a few tens of kilobytes)
ROUNDS = 200
# small trees, slowly: chosen on Complete Journey's categories at a tuning cutoff (docs/results.md)
PARAMETERS: dict[str, Any] = {
    "objective": "binary",
    "num_leaves": 4,
    "learning_rate": 0.03,
    "min_data_in_leaf": 50,
    "lambda_l2": 1.0,
    # one thread, row-wise and seeded: the same examples give the same model on any machine
    "num_threads": 1,
    "deterministic": True,
    "force_row_wise": True,
    "seed": 0,
    "verbose": -1,
}


@dataclass(frozen=True)
class Combination:
    """Columns ``features`` [S, F] -> probability [S]: ``model`` (LightGBM text; None: the first column
    alone) then ``calibration``. A row whose first column is NaN gets NaN (nothing to score it on)."""

    features: tuple[str, ...]
    model: str | None
    calibration: Calibration
    trees: Trees | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.features or not all(isinstance(f, str) and f for f in self.features):
            raise ValueError("a combination needs named feature columns")
        trees = None
        if self.model is not None:
            if not isinstance(self.model, str) or len(self.model) > MAX_MODEL_CHARS:
                raise ValueError(
                    f"a combination's model must be text of at most {MAX_MODEL_CHARS} characters"
                )
            trees = Trees(self.model, self.features, "the combination's model")
        object.__setattr__(self, "trees", trees)

    def score(self, x: np.ndarray, threads: int = 1) -> np.ndarray:
        """[S] the uncalibrated combined score (the model's probability, or the first column): what to
        rank by, since the calibration is non-decreasing in it and flat over whole stretches."""
        x = self._checked(x)
        if self.trees is None:
            return x[:, 0].copy()
        out = np.full(len(x), np.nan)
        known = ~np.isnan(x[:, 0])
        if known.any():
            out[known] = self.trees.probability(x[known], threads)
        return out

    def __call__(self, x: np.ndarray, threads: int = 1) -> np.ndarray:
        """[S] calibrated probabilities of feature rows ``x`` [S, F] (NaN where the first column is)."""
        return self.calibration(self.score(x, threads))

    def _checked(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.features):
            raise ValueError(f"a combination reads [rows, {len(self.features)}] features, got {x.shape}")
        return x

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "combination",
            "features": list(self.features),
            "model": self.model,
            "calibration": self.calibration.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Any) -> Combination:
        """Inverse of :meth:`to_dict`; ValueError naming what is wrong."""
        if not isinstance(data, dict) or data.get("method") != "combination":
            raise ValueError("a combination is a mapping with method 'combination'")
        features = data.get("features")
        if not isinstance(features, list) or not 1 <= len(features) <= 64:
            raise ValueError("a combination's 'features' must be a list of 1 to 64 names")
        model = data.get("model")
        if model is not None and not isinstance(model, str):
            raise ValueError("a combination's 'model' must be LightGBM text or null")
        return cls(tuple(features), model, Calibration.from_dict(data.get("calibration")))


def fit_combination(
    x: np.ndarray,
    outcome: np.ndarray,
    features: tuple[str, ...],
    increasing: tuple[bool, ...],
    fold: np.ndarray,
) -> Combination:
    """The combination of columns ``features`` of ``x`` [M, F] fitted on boolean ``outcome`` [M];
    ``increasing`` [F]: columns the model's output may not decrease in; ``fold`` [M] bool: the two folds
    of the cross-fitting (a hash of the shopper, so that every shard and run agrees). Rows whose first
    column is NaN are not examples."""
    x, outcome, fold = np.asarray(x, np.float64), np.asarray(outcome, bool), np.asarray(fold, bool)
    if x.ndim != 2 or x.shape[1] != len(features) or len(increasing) != len(features):
        raise ValueError(f"need [rows, {len(features)}] features and one monotonicity per feature")
    if not (len(outcome) == len(fold) == len(x)):
        raise ValueError("need one outcome and one fold per row")
    keep = ~np.isnan(x[:, 0])
    x, outcome, fold = x[keep], outcome[keep], fold[keep]
    positives = int(outcome.sum())
    # each fold's model needs both outcomes among the other fold's examples
    usable = all(0 < outcome[fold == side].sum() < (fold == side).sum() for side in (False, True))
    if min(positives, len(outcome) - positives) < MIN_OUTCOMES or not usable:
        return Combination(features, None, fit_isotonic(x[:, 0], outcome))
    parameters = PARAMETERS | {"monotone_constraints": [int(flag) for flag in increasing]}

    def fitted(rows: np.ndarray) -> lightgbm.Booster:
        data = lightgbm.Dataset(x[rows], outcome[rows].astype(np.float64), feature_name=list(features))
        return lightgbm.train(parameters, data, num_boost_round=ROUNDS)

    crossed = np.empty(len(x))
    for side in (False, True):
        crossed[fold == side] = fitted(fold != side).predict(x[fold == side], num_threads=1)
    model = fitted(np.ones(len(x), dtype=bool)).model_to_string()
    # the text up to the end of the trees: what follows (importances, parameters) prediction never reads
    text = verified_trees(model, features, "the combination's model")
    return Combination(features, text, fit_isotonic(crossed, outcome))
