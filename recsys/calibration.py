"""Calibration: turning a ranking score into a probability, and measuring whether probabilities are ones.

A campaign's ``min_probability`` and an allocation's expected conversions only mean something if a
predicted 0.2 comes true one time in five. :func:`fit_isotonic` fits a monotone map from raw scores to the
observed rate on a window where the outcome is known (SciPy's pool-adjacent-violators
``isotonic_regression``), kept as knots (:class:`Calibration`) that travel as plain numbers. The measures
(:func:`brier`, :func:`expected_calibration_error`, :func:`reliability`) are read on other weeks than the
fit's. numpy and SciPy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import isotonic_regression

MAX_KNOTS = 10_000  # a stored calibration's size limit (a fit keeps one knot per block of equal value)
BINS = 10


@dataclass(frozen=True)
class Calibration:
    """A non-decreasing map from raw score to probability: linear between knots, flat beyond the ends."""

    raw: np.ndarray  # [K] float64, strictly ascending
    probability: np.ndarray  # [K] float64 in [0, 1], non-decreasing
    examples: int = 0  # outcomes it was fitted on
    positives: int = 0

    def __post_init__(self) -> None:
        raw, probability = np.asarray(self.raw, np.float64), np.asarray(self.probability, np.float64)
        if raw.ndim != 1 or raw.shape != probability.shape or not 1 <= len(raw) <= MAX_KNOTS:
            raise ValueError(f"a calibration needs 1 to {MAX_KNOTS} knots, raw and probability alike")
        if not (np.isfinite(raw).all() and np.isfinite(probability).all()):
            raise ValueError("calibration knots must be finite")
        if (np.diff(raw) <= 0).any() or (np.diff(probability) < 0).any():
            raise ValueError("calibration knots must ascend (raw strictly, probability non-decreasing)")
        if probability.min() < 0 or probability.max() > 1:
            raise ValueError("calibrated probabilities must lie in [0, 1]")
        object.__setattr__(self, "raw", raw)
        object.__setattr__(self, "probability", probability)

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        """Probabilities of ``raw`` scores (NaN stays NaN)."""
        raw = np.asarray(raw, dtype=np.float64)
        return np.where(np.isnan(raw), np.nan, np.interp(raw, self.raw, self.probability))

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "isotonic",
            "raw": self.raw.tolist(),
            "probability": self.probability.tolist(),
            "examples": self.examples,
            "positives": self.positives,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Calibration:
        """Inverse of :meth:`to_dict`; ValueError naming what is wrong."""
        if not isinstance(data, dict) or data.get("method") != "isotonic":
            raise ValueError("a calibration is a mapping with method 'isotonic'")
        for key in ("raw", "probability"):
            value = data.get(key)
            if not isinstance(value, list) or len(value) > MAX_KNOTS:
                raise ValueError(f"calibration {key!r} must be a list of at most {MAX_KNOTS} numbers")
            if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
                raise ValueError(f"calibration {key!r} must hold numbers only")
        counts = [data.get("examples", 0), data.get("positives", 0)]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
            raise ValueError("calibration 'examples' and 'positives' must be integers >= 0")
        return cls(np.array(data["raw"], np.float64), np.array(data["probability"], np.float64), *counts)


def fit_isotonic(raw: np.ndarray, outcome: np.ndarray) -> Calibration:
    """The monotone map from ``raw`` scores [M] to the rate of boolean ``outcome`` [M]: pool-adjacent-
    violators (least squares, for 0/1 outcomes also the maximum-likelihood monotone fit), each block's
    rate then shrunk to ``(hits + 1/2) / (n + 1)`` so that no probability is 0 or 1. Equal scores are
    pooled first; each block keeps its two end knots."""
    raw, outcome = np.asarray(raw, np.float64), np.asarray(outcome, bool)
    if raw.shape != outcome.shape or raw.ndim != 1 or not len(raw):
        raise ValueError("calibration needs one outcome per raw score, and at least one")
    if not np.isfinite(raw).all():
        raise ValueError("raw scores to calibrate must be finite")
    values, inverse = np.unique(raw, return_inverse=True)
    counts = np.bincount(inverse).astype(np.float64)
    hits = np.bincount(inverse, weights=outcome.astype(np.float64))
    fitted = isotonic_regression(hits / counts, weights=counts).x
    # A block's rate from finite data is never exactly 0 or 1: each block takes (hits + 1/2) / (n + 1)
    # (Jeffreys), and a second pass restores the order where a small block's shrinkage broke it.
    starts = np.flatnonzero(np.r_[True, np.diff(fitted) != 0])
    n, k = np.add.reduceat(counts, starts), np.add.reduceat(hits, starts)
    shrunk = isotonic_regression((k + 0.5) / (n + 1.0), weights=n).x
    fitted = np.clip(np.repeat(shrunk, np.diff(np.append(starts, len(values)))), 0.0, 1.0)
    # knots: the first and last score of every run of equal fitted value
    change = np.flatnonzero(np.diff(fitted) != 0)
    keep = np.unique(np.concatenate([[0, len(values) - 1], change, change + 1]))
    return Calibration(values[keep], fitted[keep], len(raw), int(outcome.sum()))


def brier(probability: np.ndarray, outcome: np.ndarray) -> float:
    """Mean squared error of probabilities against boolean outcomes."""
    return float(np.mean((np.asarray(probability, np.float64) - np.asarray(outcome, np.float64)) ** 2))


def _bins(probability: np.ndarray, bins: int) -> list[np.ndarray]:
    """Positions in ``bins`` equal-count bins of ascending probability."""
    return [chunk for chunk in np.array_split(np.argsort(probability, kind="stable"), bins) if len(chunk)]


def reliability(probability: np.ndarray, outcome: np.ndarray, bins: int = BINS) -> list[dict[str, float]]:
    """Mean predicted probability against the observed rate in ``bins`` equal-count bins."""
    probability, outcome = np.asarray(probability, np.float64), np.asarray(outcome, np.float64)
    return [
        {"predicted": float(probability[c].mean()), "observed": float(outcome[c].mean()), "count": len(c)}
        for c in _bins(probability, bins)
    ]


def expected_calibration_error(probability: np.ndarray, outcome: np.ndarray, bins: int = BINS) -> float:
    """Count-weighted mean |predicted - observed| over the equal-count bins of :func:`reliability`."""
    return _error(reliability(probability, outcome, bins))


def _error(curve: list[dict[str, float]]) -> float:
    """The expected calibration error of a :func:`reliability` curve."""
    total = sum(point["count"] for point in curve)
    return float(sum(point["count"] * abs(point["predicted"] - point["observed"]) for point in curve) / total)


def summary(probability: np.ndarray, outcome: np.ndarray, bins: int = BINS) -> dict[str, Any]:
    """Brier score, ECE and the reliability curve of probabilities against what happened."""
    probability, outcome = np.asarray(probability, np.float64), np.asarray(outcome, bool)
    curve = reliability(probability, outcome, bins)  # sorted once, read for both
    return {
        "examples": len(outcome),
        "rate": float(outcome.mean()) if len(outcome) else math.nan,
        "mean_probability": float(probability.mean()) if len(outcome) else math.nan,
        "brier": brier(probability, outcome),
        "ece": _error(curve),
        "reliability": curve,
    }


def reliability_png(curve: list[dict[str, float]], title: str) -> bytes:
    """A reliability plot of ``curve`` (from :func:`reliability`) as PNG bytes (needs matplotlib:
    ``caddie[report]``)."""
    import io

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("the reliability plot needs matplotlib: pip install 'caddie[report]'") from error
    figure, axis = plt.subplots(figsize=(5, 4))
    top = max(max(p["predicted"] for p in curve), max(p["observed"] for p in curve), 1e-3)
    axis.plot([0, top], [0, top], color="grey", linestyle="--", linewidth=1)
    axis.plot([p["predicted"] for p in curve], [p["observed"] for p in curve], marker="o")
    axis.set_xlabel("predicted probability (equal-count bins)")
    axis.set_ylabel("observed rate")
    axis.set_title(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()
