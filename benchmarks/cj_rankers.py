"""Rankers fitted on Complete Journey before a date, for the campaign benchmarks, cached on disk.

A campaign starting on day D may only be scored by what was known before D: the ranker (its trees and
its item statistics) is refitted on the receipts before the first of D's month (``training.rank.fit_at``:
no network, so no network trained on later weeks reaches it). A fit takes minutes on two cores, so each
one is kept under ``artifacts/cj_rankers/<date>-<config digest>/`` and read back by later runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batch.audiences import (
    FEATURES,
    INCREASING,
    WINDOWS,
    calibration_windows,
    cross_fold,
    features,
    history_features,
)
from recsys.combination import Combination, fit_combination
from recsys.data.schema import PRODUCT, SHOPPER
from recsys.data.sequences import build_sequences, epoch_days
from recsys.data.split import temporal_split
from recsys.data.vocabulary import Vocabulary
from recsys.evaluation.campaigns import Campaign
from recsys.inputs import Histories
from recsys.io import staged_directory, write_json
from recsys.propensity import raw_score
from recsys.ranker import Ranker
from training.rank import RankerConfig, fit_at

CACHE = Path("artifacts/cj_rankers")
# Without a network the new products come from co-purchase neighbours and the shopper's categories, so
# that the trees learn what a product new to the shopper is worth. Two internal cutoffs a week apart and
# two weeks of validation keep a fit short, and leave a model for February (the receipts begin on 1 Jan).
CONFIG = RankerConfig(
    new_candidates=0, co_purchase_candidates=20, category_candidates=20, cutoffs=2, spacing_days=7.0
)
VAL_DAYS = 14.0


def month_of(moment: datetime) -> datetime:
    """Midnight of the first day of ``moment``'s month, in its zone."""
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def ranker_before(
    receipts: pa.Table, products: pa.Table, date: datetime, config: RankerConfig = CONFIG
) -> tuple[Ranker, Vocabulary]:
    """The ranker fitted on the receipts before ``date`` (from the cache when it holds it)."""
    settings = asdict(config) | {"val_days": VAL_DAYS}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = CACHE / f"{date.date()}-{digest}"
    if not (folder / "settings.json").exists():
        ranker, vocab, report = fit_at(receipts, products, date, config, VAL_DAYS)
        with staged_directory(folder) as staging:  # the whole folder appears at once, or not at all
            np.savez(staging / "items.npz", vocab_ids=vocab.product_ids, vocab_popularity=vocab.popularity,
                     **ranker.item_columns())  # fmt: skip
            (staging / "model.txt").write_text(ranker.model)
            write_json(staging / "report.json", report)
            write_json(staging / "settings.json", ranker.to_dict())
    with np.load(folder / "items.npz") as arrays:
        columns = {name: arrays[name] for name in arrays.files}
    vocab = Vocabulary(columns.pop("vocab_ids"), columns.pop("vocab_popularity"))
    settings = json.loads((folder / "settings.json").read_text())
    return Ranker.from_parts(settings, (folder / "model.txt").read_text(), columns), vocab


def histories_of(before: pa.Table, vocab: Vocabulary, shoppers: np.ndarray) -> Histories:
    """The known purchases in ``before`` of each of ``shoppers``, in that order."""
    return Histories.from_sequences(build_sequences(before, vocab).select(np.asarray(shoppers)))


def raw_scores(
    ranker: Ranker,
    vocab: Vocabulary,
    histories: Histories,
    products: np.ndarray,
    as_of: datetime,
    horizon_days: float,
) -> np.ndarray:
    """[shoppers] raw propensity (``recsys.propensity.raw_score``) of buying one of ``products`` within
    ``horizon_days`` of ``as_of``, from ``histories`` that end before it (NaN: no known product)."""
    rows = vocab.rows(np.asarray(products, dtype=np.int64))
    searched = np.full((histories.num_shoppers, 0), -1, dtype=np.int64)  # no network
    days = epoch_days(as_of)
    known = np.unique(rows[rows >= 0])
    return raw_score(ranker, histories, searched, searched.astype(np.float32), known, days, horizon_days)


def bought(table: pa.Table, products: np.ndarray, shoppers: np.ndarray) -> np.ndarray:
    """[shoppers] whether each has a row of ``products`` in ``table``."""
    rows = table.filter(pc.is_in(table.column(PRODUCT), pa.array(products, pa.int64())))
    return np.isin(shoppers, rows.column(SHOPPER).to_numpy())


@dataclass(frozen=True)
class Window:
    """A calibration window (``batch.audiences.calibration_windows``): the receipts before its start, its
    own receipts, and the households known before it with their histories."""

    start: datetime
    earlier: pa.Table
    receipts: pa.Table
    households: np.ndarray
    histories: Histories


def windows_before(
    before: pa.Table, vocab: Vocabulary, as_of: datetime, horizon_days: float, count: int = WINDOWS
) -> list[Window]:
    """The calibration windows before ``as_of`` that have receipts before their start."""
    found = []
    for start, end in calibration_windows(as_of, horizon_days, count):
        earlier, rest = temporal_split(before, start)
        households = np.unique(earlier.column(SHOPPER).to_numpy())
        if len(households):
            receipts, _ = temporal_split(rest, end)
            found.append(
                Window(start, earlier, receipts, households, histories_of(earlier, vocab, households))
            )
    return found


def fitted_combination(
    ranker: Ranker, vocab: Vocabulary, windows: list[Window], products: np.ndarray, horizon_days: float
) -> Combination:
    """The combination (``recsys.combination``) of the raw score of ``products`` and every household's
    history of them, fitted on ``windows`` as the audience job fits it."""
    xs, ys, folds = [], [], []
    for w in windows:
        raw = raw_scores(ranker, vocab, w.histories, products, w.start, horizon_days)
        xs.append(history_rows(w.earlier, products, w.households, w.start, np.nan_to_num(raw)))
        ys.append(bought(w.receipts, products, w.households))
        folds.append(cross_fold(w.households))
    return fit_combination(
        np.concatenate(xs), np.concatenate(ys), FEATURES, INCREASING, np.concatenate(folds)
    )


def calibrated_propensity(
    receipts: pa.Table, products: pa.Table, campaign: Campaign, duration: float
) -> np.ndarray:
    """[recipients] P(buying one of the campaign's products during it), from before its start: the raw
    score and the recipient's history of the products combined and calibrated as the audience job does
    (:func:`fitted_combination`), on every household of the calibration windows before the start
    (uncalibrated, ``1 - exp(-raw)``, when no receipt precedes the latest window)."""
    ranker, vocab = ranker_before(receipts, products, month_of(campaign.start))
    before, _ = temporal_split(receipts, campaign.start)
    recipients = histories_of(before, vocab, campaign.recipients)
    raw = np.nan_to_num(raw_scores(ranker, vocab, recipients, campaign.products, campaign.start, duration))
    windows = windows_before(before, vocab, campaign.start, duration)
    if not windows:  # the campaign's length before its start predates the receipts
        return -np.expm1(-raw)  # the independence reading, uncalibrated
    combination = fitted_combination(ranker, vocab, windows, campaign.products, duration)
    ids = np.asarray(campaign.recipients, dtype=np.int64)  # ascending, as history_features reads them
    return combination(history_rows(before, campaign.products, ids, campaign.start, raw))


def history_rows(
    table: pa.Table, products: np.ndarray, shoppers: np.ndarray, as_of: datetime, raw: np.ndarray
) -> np.ndarray:
    """The combination's feature rows (``batch.audiences.features``) of ascending ``shoppers`` with raw
    scores ``raw``, their history of ``products`` read from ``table`` before ``as_of``."""
    since, baskets, frequency = history_features(table, products, shoppers, as_of)
    return features(raw, frequency, since, baskets)
