"""Campaign audiences: every shopper's calibrated probability of buying a campaign's products, and the
audience chosen from them (the threshold, exclusions, the exploration share).

Scoring (:func:`score_part`, what the job ``batch.audience`` runs on each part of the receipts): the
bundle's engine encodes and searches each shopper as the candidate job does (:func:`batch.pipeline.search`)
and the ranker scores the campaign's products (:mod:`recsys.propensity`); beside that raw score, the
shopper's own history of the products (:func:`history_features`). Both at the scoring date and, for the
calibration sample, at the start of each calibration window (:func:`calibration_windows`), where what
happened next is known; and, when the receipts go on past the scoring date, what happened after it
(the evaluation). :func:`choose` fits the combination (:mod:`recsys.combination`) on the windows'
examples and turns every shopper's row into a probability; for a spec whose ``objective`` is ``redeem``,
that probability of buying times the shopper's coupon-use rate (:mod:`recsys.coupons`, from its baskets
with a coupon discount, counted by :func:`score_part`).

:func:`select_audience` takes each shopper's calibrated probability of buying the campaign's products
within its horizon and when the shopper last bought them, and returns the ranked audience:

- never a shopper under ``min_probability``, opted out, or who bought the products within
  ``bought_within_days``: the audience is smaller than asked rather than padded (the shortfall is
  reported);
- ``exploration`` of the audience is new to the products (never bought them), ranked by their own
  probability; the share is exact (to one shopper of rounding): when one pool runs short, the audience
  shrinks so that the share still holds;
- every member's segment: ``repeat`` (bought the products within ``lapse_days``), ``lapsed`` (bought them
  before that) or ``new`` (never);
- the cost of exploring (expected conversions given up against the plain top of the ranking of the same
  size) and its benefit (shoppers new to the products reached beyond that top).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batch.campaign import CampaignSpec
from batch.engines import OnnxEngine
from batch.partition import shopper_hash
from batch.pipeline import Part, Timings, search
from recsys.calibration import summary
from recsys.combination import Combination, fit_combination
from recsys.coupons import coupon_baskets, coupon_rate
from recsys.data.schema import BASKET, PRODUCT, SHOPPER, TIMESTAMP
from recsys.data.sequences import SECONDS_PER_DAY, build_sequences, epoch_days, positions
from recsys.data.split import temporal_split
from recsys.evaluation.baselines import decayed_baskets
from recsys.evaluation.campaigns import paired_auc
from recsys.inputs import Histories
from recsys.propensity import POPULAR, raw_score
from recsys.rules import Rules

SEGMENTS = ("repeat", "lapsed", "new")
TOP = 5  # members a summary shows
SAMPLE_BITS = 24  # the calibration sample reads the hash's top bits (the shard and part read its low ones)
LAPSE_DAYS = 90.0
FREQUENCY_HALF_LIFE_DAYS = 120.0  # the reference's decay: the recommendation protocol's decayed frequency
# What the combination (recsys.combination) weighs: the raw score, then the shopper's own history of the
# products; it may not fall as the raw score or the frequency rise
FEATURES = ("raw", "frequency", "days_since_bought", "baskets")
INCREASING = (True, True, False, False)
NEVER_DAYS = 10_000.0  # days since bought of a shopper who never bought the products: beyond any history
WINDOWS = 3  # calibration windows by default (conf/audience.yaml's calibration_windows)
MAX_WINDOWS = 12  # calibration windows a job may ask for (each scores the sample once more)
SCORES = pa.schema(
    [
        pa.field(SHOPPER, pa.int64(), nullable=False),
        pa.field("raw", pa.float64()),  # the raw score (recsys.propensity) at the scoring date (NaN: none)
        pa.field("days_since_bought", pa.float64()),  # to the scoring date, inf: never bought the products
        pa.field("baskets", pa.int64()),  # baskets before the scoring date (the low-activity view)
        pa.field("frequency", pa.float64()),  # decayed baskets with the products: the reference scorer
        # baskets before the scoring date with a coupon discount (recsys.coupons); null unless the
        # campaign's objective is redeem
        pa.field("coupon_baskets", pa.int64()),
        # the same four at the start of each calibration window (calibration_windows), one entry per
        # window, and whether the shopper bought the products in it; raw NaN: not sampled, or no receipt
        # before that window
        pa.field("calibration_raw", pa.list_(pa.float64())),
        pa.field("calibration_days_since_bought", pa.list_(pa.float64())),
        pa.field("calibration_baskets", pa.list_(pa.int64())),
        pa.field("calibration_frequency", pa.list_(pa.float64())),
        pa.field("calibration_bought", pa.list_(pa.bool_())),
        pa.field("bought_after", pa.bool_()),  # bought them in the horizon after it (if the receipts say)
    ]
)
# the calibration windows' columns of FEATURES, in its order
CALIBRATION = ("calibration_raw", "calibration_frequency", "calibration_days_since_bought",
               "calibration_baskets")  # fmt: skip


def calibration_windows(
    as_of: datetime, horizon_days: float, windows: int
) -> list[tuple[datetime, datetime]]:
    """The (start, end) of each calibration window, latest first: ``windows`` horizons back to back
    before ``as_of``. A window's examples are scored on the receipts before its start and labelled by
    what was bought from its start to its end, so every label is known before ``as_of``."""
    if isinstance(windows, bool) or not isinstance(windows, int) or not 1 <= windows <= MAX_WINDOWS:
        raise ValueError(f"calibration_windows must be 1 to {MAX_WINDOWS}, got {windows}")
    horizon = timedelta(days=horizon_days)
    return [(as_of - k * horizon, as_of - (k - 1) * horizon) for k in range(1, windows + 1)]


def campaign_rows(engine: OnnxEngine, product_ids: np.ndarray) -> np.ndarray:
    """The bundle's item rows of a campaign's products; ValueError when none is in the bundle's catalogue
    (the products unknown to it cannot be scored, and are counted by the job's manifest)."""
    rows = engine.vocab.rows(np.asarray(product_ids, dtype=np.int64))
    if not (rows >= 0).any():
        raise ValueError(f"none of the campaign's {len(product_ids)} products is in the bundle's catalogue")
    return np.unique(rows[rows >= 0])


def raw_scores(
    engine: OnnxEngine,
    histories: Histories,
    rows: np.ndarray,
    as_of: datetime,
    horizon_days: float,
    popular: int = POPULAR,
) -> np.ndarray:
    """[S] each shopper's raw within-horizon score (:mod:`recsys.propensity`) for the campaign of item
    ``rows``, its history ending before ``as_of``; NaN for a shopper without a known product."""
    if engine.repeat is None:
        raise ValueError("campaign scores need the bundle's ranking stage (a bundle with a ranker)")
    ids = np.arange(histories.num_shoppers, dtype=np.int64)
    item_ids, gap_days = histories.model_inputs(engine.max_len)
    part = Part(0, ids, histories, item_ids, gap_days, 0)
    batch = search(engine, part, 0, histories.num_shoppers, Rules(k=1), Timings("encode", "top_k"))
    days = epoch_days(as_of)
    found = batch.rows, batch.scores
    return raw_score(engine.repeat, histories, *found, rows, days, horizon_days, popular, engine.threads)


def _bought_between(table: pa.Table, products: np.ndarray, start: datetime, end: datetime) -> np.ndarray:
    """Shopper ids with a purchase of ``products`` at or after ``start`` and before ``end``."""
    kind = table.schema.field(TIMESTAMP).type
    when = table.column(TIMESTAMP)
    mask = pc.and_(
        pc.and_(pc.greater_equal(when, pa.scalar(start, kind)), pc.less(when, pa.scalar(end, kind))),
        pc.is_in(table.column(PRODUCT), pa.array(products, pa.int64())),
    )
    return np.unique(table.filter(mask).column(SHOPPER).to_numpy())


def _histories(table: pa.Table, engine: OnnxEngine, shopper_ids: np.ndarray) -> Histories:
    return Histories.from_sequences(
        build_sequences(table, engine.vocab, drop_unknown=True).select(shopper_ids)
    )


def history_features(
    table: pa.Table, product_ids: np.ndarray, shopper_ids: np.ndarray, as_of: datetime
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[S] for each of ``shopper_ids`` (ascending), from the receipts ``table`` before ``as_of``: days since
    it last bought one of ``product_ids`` (inf: never), its baskets, and its baskets with the products
    decayed over :data:`FREQUENCY_HALF_LIFE_DAYS` (the reference scorer). They read the receipts, not the
    bundle's catalogue: every campaign product counts."""
    shopper_ids = np.asarray(shopper_ids, dtype=np.int64)
    before, _ = temporal_split(table, as_of)
    last = np.full(len(shopper_ids), -np.inf)
    mine = before.filter(pc.is_in(before.column(PRODUCT), pa.array(product_ids, pa.int64())))
    grouped = mine.group_by([SHOPPER]).aggregate([(TIMESTAMP, "max")])
    at, known = positions(shopper_ids, grouped.column(SHOPPER).to_numpy())
    seconds = pc.cast(grouped.column(f"{TIMESTAMP}_max"), pa.int64()).to_numpy() / 1e6
    last[at[known]] = seconds[known] / SECONDS_PER_DAY
    counted = before.group_by([SHOPPER]).aggregate([(BASKET, "count_distinct")])
    at, known = positions(shopper_ids, counted.column(SHOPPER).to_numpy())
    baskets = np.zeros(len(shopper_ids), np.int64)
    baskets[at[known]] = counted.column(f"{BASKET}_count_distinct").to_numpy()[known]
    frequency = decayed_baskets(mine, product_ids, shopper_ids, as_of, FREQUENCY_HALF_LIFE_DAYS)
    return epoch_days(as_of) - last, baskets, frequency


def features(
    raw: np.ndarray, frequency: np.ndarray, days_since_bought: np.ndarray, baskets: np.ndarray
) -> np.ndarray:
    """[S, len(FEATURES)] the combination's input rows (NaN ``raw``: a shopper it cannot score)."""
    since = np.minimum(np.asarray(days_since_bought, np.float64), NEVER_DAYS)
    return np.column_stack([raw, frequency, since, baskets]).astype(np.float64)


def score_part(
    engine: OnnxEngine,
    table: pa.Table,
    spec: CampaignSpec,
    product_ids: np.ndarray,
    as_of: datetime,
    calibration_share: float,
    popular: int = POPULAR,
    windows: int = WINDOWS,
) -> pa.RecordBatch:
    """One part's rows of :data:`SCORES`: every shopper of receipts ``table`` with a purchase before
    ``as_of``; those of :func:`calibration_sample` (``calibration_share`` of them) are also scored at the
    start of each of the ``windows`` calibration windows (:func:`calibration_windows`). ``product_ids``:
    the campaign's (all of them, for the history features and the outcomes; the bundle scores the ones
    it knows)."""
    before, after = temporal_split(table, as_of)
    shopper_ids = np.unique(before.column(SHOPPER).to_numpy())
    sample = calibration_sample(shopper_ids, calibration_share)
    rows = campaign_rows(engine, product_ids)
    now = _histories(before, engine, shopper_ids)
    raw = raw_scores(engine, now, rows, as_of, spec.horizon_days, popular)
    since, basket_count, frequency = history_features(before, product_ids, shopper_ids, as_of)
    coupons = coupon_baskets(before, shopper_ids) if spec.objective == "redeem" else None
    found = calibration_windows(as_of, spec.horizon_days, windows)
    calibration: dict[str, list[np.ndarray]] = {field: [] for field in (*CALIBRATION, "calibration_bought")}
    # the sample's rows alone: a small share costs a small share of the grouping
    sampled_rows = before
    if not sample.all():
        sampled_rows = before.filter(pc.is_in(before.column(SHOPPER), pa.array(shopper_ids[sample])))
    for start, end in found:
        earlier, rest = temporal_split(sampled_rows, start)
        window, _ = temporal_split(rest, end)
        # not sampled, or no receipt before the window: no raw score (not an example), no history
        then = {"calibration_raw": np.full(len(shopper_ids), np.nan),
                "calibration_days_since_bought": np.full(len(shopper_ids), np.inf),
                "calibration_baskets": np.zeros(len(shopper_ids), np.int64),
                "calibration_frequency": np.zeros(len(shopper_ids))}  # fmt: skip
        sampled = np.unique(earlier.column(SHOPPER).to_numpy())
        if len(sampled):
            at = np.searchsorted(shopper_ids, sampled)
            histories = _histories(earlier, engine, sampled)
            then["calibration_raw"][at] = raw_scores(
                engine, histories, rows, start, spec.horizon_days, popular
            )
            history = history_features(earlier, product_ids, sampled, start)
            names = ("calibration_days_since_bought", "calibration_baskets", "calibration_frequency")
            for name, values in zip(names, history, strict=True):
                then[name][at] = values
        for name in CALIBRATION:
            calibration[name].append(then[name])
        bought = np.isin(shopper_ids, _bought_between(window, product_ids, start, end))
        calibration["calibration_bought"].append(bought)
    bought_after = np.isin(
        shopper_ids, _bought_between(after, product_ids, as_of, as_of + timedelta(days=spec.horizon_days))
    )
    offsets = pa.array(np.arange(0, len(shopper_ids) * len(found) + 1, len(found)), pa.int32())

    def per_window(field: str) -> pa.ListArray:  # [S] lists of one value per window
        values = np.stack(calibration[field], axis=1).ravel()
        return pa.ListArray.from_arrays(offsets, pa.array(values, SCORES.field(field).type.value_type))

    columns = [shopper_ids, raw, since, basket_count, frequency, coupons]
    return pa.record_batch(
        [
            pa.nulls(len(shopper_ids), f.type) if c is None else pa.array(c, f.type)
            for c, f in zip(columns, SCORES, strict=False)
        ]
        + [per_window(f) for f in SCORES.names[len(columns) : -1]]
        + [pa.array(bought_after)],
        schema=SCORES,
    )


@dataclass(frozen=True)
class Audience:
    """The chosen shoppers (positions into the scored arrays), best first, and what it cost."""

    members: np.ndarray  # [A] int64 positions, by probability descending (ties: smaller position first)
    segment: np.ndarray  # [A] int8 index into SEGMENTS
    eligible: np.ndarray  # [E] positions passing the threshold and exclusions, best first
    shortfall: int  # audience asked minus audience given
    explorers: int  # members new to the products
    expected_conversions: float  # sum of the members' probabilities
    exploration_cost: float  # expected conversions of the plain top of the same size, minus the above
    exploration_reach: int  # new-to-products members beyond those the plain top would have had


def select_audience(
    spec: CampaignSpec,
    shopper_ids: np.ndarray,
    probability: np.ndarray,
    days_since_bought: np.ndarray,
    lapse_days: float = LAPSE_DAYS,
    score: np.ndarray | None = None,
) -> Audience:
    """The audience of ``spec`` among shoppers ``shopper_ids`` [S] with ``probability`` [S] and days since
    they last bought one of its products [S] (``inf``: never).

    Shoppers rank by probability, ties broken by ``score`` [S] (the uncalibrated score the probabilities
    calibrate, :meth:`recsys.combination.Combination.score`: an isotonic map is flat over whole stretches
    of it, and a tie would otherwise go to the earlier position), then by position."""
    probability = np.asarray(probability, dtype=np.float64)
    score = np.zeros(len(probability)) if score is None else np.asarray(score, dtype=np.float64)
    if score.shape != probability.shape or np.isnan(score).any():
        raise ValueError("need one score, not NaN, per probability")
    new = np.isinf(days_since_bought)
    eligible = eligibility(spec, shopper_ids, probability, days_since_bought)
    order = np.lexsort((np.arange(len(probability)), -score, -probability))  # best first
    ranked = order[eligible[order]]
    if spec.exploration == 0.0:  # no reserved share: the plain top, whoever it is
        size = min(spec.audience, len(ranked))
        members = ranked[:size]
    else:
        ranked_new, ranked_old = ranked[new[ranked]], ranked[~new[ranked]]
        size = _size(spec.audience, spec.exploration, len(ranked_new), len(ranked_old))
        explore = _explorers(spec.exploration, size)
        members = np.concatenate([ranked_new[:explore], ranked_old[: size - explore]])
        members = members[np.lexsort((members, -score[members], -probability[members]))]
    segment = np.where(new[members], 2, np.where(days_since_bought[members] <= lapse_days, 0, 1)).astype(
        np.int8
    )
    plain = ranked[:size]
    return Audience(
        members=members,
        segment=segment,
        eligible=ranked,
        shortfall=spec.audience - size,
        explorers=int(new[members].sum()),
        expected_conversions=float(probability[members].sum()),
        exploration_cost=float(probability[plain].sum() - probability[members].sum()),
        exploration_reach=int(new[members].sum() - new[plain].sum()),
    )


def eligibility(
    spec: CampaignSpec, shopper_ids: np.ndarray, probability: np.ndarray, days_since_bought: np.ndarray
) -> np.ndarray:
    """[S] bool: who ``spec`` may contact at all: at or over ``min_probability``, not opted out, not a
    buyer of the products within ``bought_within_days``."""
    probability = np.asarray(probability, dtype=np.float64)
    if not (np.isfinite(probability) & (probability >= 0) & (probability <= 1)).all():
        raise ValueError("probabilities must be finite and within [0, 1]")
    eligible = probability >= spec.min_probability
    if spec.bought_within_days is not None:
        eligible &= ~(days_since_bought <= spec.bought_within_days)
    if spec.opted_out:
        eligible &= ~np.isin(shopper_ids, np.asarray(spec.opted_out, dtype=np.int64))
    return eligible


def _explorers(share: float, size: int) -> int:
    """Members of an audience of ``size`` reserved for shoppers new to the products (half rounds up)."""
    return int(np.floor(share * size + 0.5))


def _size(asked: int, share: float, new: int, old: int) -> int:
    """The largest audience <= ``asked`` whose exploration share can be filled from ``new`` explorers and
    ``old`` other eligible shoppers."""
    size = min(asked, new + old, int((new + 0.5) / share) if share > 0 else asked)
    if share < 1:
        size = min(size, int((old + 0.5) / (1 - share)))
    # the bounds above are within rounding of the answer: step down the last few
    while size > 0 and (_explorers(share, size) > new or size - _explorers(share, size) > old):
        size -= 1
    return size


@dataclass(frozen=True)
class Chosen:
    """A campaign's audience (shopper_id, probability, rank, segment), the shoppers it may contact (the
    allocation's input, ``batch.allocate``), its calibration and summary."""

    table: pa.Table
    eligible: pa.Table  # every shopper the campaign may contact: shopper_id, campaign_id, probability
    combination: Combination  # raw score and history -> probability, fitted on the calibration sample
    summary: dict[str, Any]


def choose(scores: pa.Table, spec: CampaignSpec, as_of: datetime, outcome_known: bool) -> Chosen:
    """Fit the combination (:mod:`recsys.combination`: :data:`FEATURES` -> calibrated probability) on the
    calibration sample of ``scores`` (rows of :data:`SCORES`, every shopper once) and choose the audience
    of ``spec``; judge the probabilities against ``bought_after`` when
    ``outcome_known`` (the receipts reach ``as_of + horizon``)."""
    scores = scores.sort_by(SHOPPER)  # the fit sees its examples in one order, however the job was sharded
    ids = scores.column(SHOPPER).to_numpy()

    def column(name: str) -> np.ndarray:
        return scores.column(name).to_numpy(zero_copy_only=False)

    counts = pc.list_value_length(scores.column("calibration_bought")).to_numpy(zero_copy_only=False)
    count = int(counts[0]) if len(counts) else 0  # calibration windows

    def windows(name: str) -> np.ndarray:  # [S * count] every shopper's windows in turn
        lists = scores.column(name)
        if (pc.list_value_length(lists).to_numpy(zero_copy_only=False) != count).any():
            raise ValueError(f"scores: {name} holds another number of windows for some shoppers")
        return pc.list_flatten(lists).to_numpy(zero_copy_only=False)

    since = column("days_since_bought")
    x = features(column("raw"), column("frequency"), since, column("baskets"))
    earlier = features(*(windows(name) for name in CALIBRATION))
    bought = windows("calibration_bought")
    owners = np.repeat(ids, count)
    sampled = ~np.isnan(earlier[:, 0])
    if not sampled.any():
        raise ValueError("no shopper of the calibration sample has receipts before a calibration window")
    # a shopper's windows share a fold: the cross-fitted output is never of a shopper the model saw
    combination = fit_combination(
        earlier[sampled], bought[sampled], FEATURES, INCREASING, cross_fold(owners[sampled])
    )
    ranking = combination.score(x)  # the probabilities' order, ties of the calibration broken
    buy = combination.calibration(ranking)
    probability = buy
    if spec.objective == "redeem":  # P(buy) x P(use a coupon), the two taken as independent
        coupons = scores.column("coupon_baskets")
        if coupons.null_count:
            raise ValueError("scores: objective redeem needs every shopper's coupon_baskets")
        probability = buy * coupon_rate(coupons.to_numpy(), scores.column("baskets").to_numpy())
    scored = ~np.isnan(probability)
    chosen = select_audience(spec, ids[scored], probability[scored], since[scored], score=ranking[scored])
    members = np.flatnonzero(scored)[chosen.members]
    table = pa.table(
        {
            SHOPPER: pa.array(ids[members], pa.int64()),
            "probability": pa.array(probability[members]),
            "rank": pa.array(np.arange(1, len(members) + 1), pa.int64()),
            "segment": pa.array([SEGMENTS[s] for s in chosen.segment.tolist()], pa.string()),
        }
    )
    may = np.flatnonzero(scored)[np.sort(chosen.eligible)]
    eligible = pa.table(
        {
            SHOPPER: pa.array(ids[may], pa.int64()),
            "campaign_id": pa.array(np.full(len(may), spec.campaign_id), pa.int64()),
            "probability": pa.array(probability[may]),
        }
    )
    baskets = scores.column("baskets").to_numpy()
    low = baskets <= np.quantile(baskets[scored], 1 / 3) if scored.any() else np.zeros(len(ids), bool)
    summary_: dict[str, Any] = {
        "as_of": as_of.isoformat(),
        "horizon_days": spec.horizon_days,
        "objective": spec.objective,
        "shoppers": len(ids),
        "scored": int(scored.sum()),
        "eligible": len(chosen.eligible),
        "audience": len(members),
        "shortfall": chosen.shortfall,
        "explorers": chosen.explorers,
        "segments": {name: int((chosen.segment == i).sum()) for i, name in enumerate(SEGMENTS)},
        "expected_conversions": chosen.expected_conversions,
        "exploration_cost": chosen.exploration_cost,
        "exploration_reach": chosen.exploration_reach,
        "low_activity": {
            "max_baskets": int(baskets[low].max(initial=0)),
            "in_audience": int(low[members].sum()),
        },
        "calibration": {
            "windows": [
                [start.isoformat(), end.isoformat()]
                for start, end in calibration_windows(as_of, spec.horizon_days, count)
            ],
            "examples": int(sampled.sum()),
            "method": "raw score alone" if combination.model is None else "combination",
            "fit": summary(combination(earlier[sampled]), bought[sampled]),
        },
        "evaluation": None,
        "top": table.slice(0, TOP).to_pylist(),
    }
    if outcome_known:
        outcome = scores.column("bought_after").to_numpy(zero_copy_only=False)
        frequency = scores.column("frequency").to_numpy(zero_copy_only=False)
        summary_["evaluation"] = {
            # purchases are what the receipts record: the purchase half of the probability is judged
            "overall": _judged(buy, ranking, frequency, outcome, scored),
            "low_activity": _judged(buy, ranking, frequency, outcome, scored & low),
            "audience_conversions": int(outcome[members].sum()),
        }
    return Chosen(table, eligible, combination, summary_)


def audience(
    engine: OnnxEngine,
    receipts: pa.Table,
    spec: CampaignSpec,
    as_of: datetime,
    calibration_share: float = 1.0,
    popular: int = POPULAR,
    windows: int = WINDOWS,
) -> Chosen:
    """The audience of ``spec`` among the shoppers of an in-memory receipts table (canonical columns),
    scored and chosen as the job does (without its sharding, resuming and files)."""
    product_ids = spec.product_ids(engine.items)
    part = score_part(engine, receipts, spec, product_ids, as_of, calibration_share, popular, windows)
    scores = pa.Table.from_batches([part])
    latest = pc.max(receipts.column(TIMESTAMP)).as_py()
    return choose(scores, spec, as_of, latest >= as_of + timedelta(days=spec.horizon_days))


def cross_fold(shopper_ids: np.ndarray) -> np.ndarray:
    """[S] bool: each shopper's fold in the combination's cross-fitting (the hash bit just below the
    calibration sample's, so each fold is half of the sample whatever its share)."""
    bit = np.uint64(64 - SAMPLE_BITS - 1)
    return ((shopper_hash(np.asarray(shopper_ids, np.int64)) >> bit) & np.uint64(1)).astype(bool)


def calibration_sample(shopper_ids: np.ndarray, share: float) -> np.ndarray:
    """[S] bool: the shoppers in the calibration sample (a ``share`` of them by a hash of the id, so every
    shard and every run agrees)."""
    top = (shopper_hash(np.asarray(shopper_ids, np.int64)) >> np.uint64(64 - SAMPLE_BITS)).astype(np.int64)
    return top < share * (1 << SAMPLE_BITS)


def _judged(
    probability: np.ndarray,
    ranking: np.ndarray,
    frequency: np.ndarray,
    outcome: np.ndarray,
    among: np.ndarray,
) -> dict[str, Any]:
    """Calibration measures of the probabilities of shoppers ``among`` against what happened, and the AUC
    of their ranking (probability, ties broken by ``ranking``: the order of ``ranking`` alone) next to
    decayed frequency's with a paired bootstrap interval (None without both outcomes)."""
    p, f, y = probability[among], frequency[among], outcome[among]
    judged = summary(p, y)
    judged["auc"] = judged["against_decayed_frequency"] = None
    if 0 < y.sum() < len(y):
        paired = paired_auc(ranking[among], f, y)
        judged["auc"], judged["against_decayed_frequency"] = paired["auc"], paired
    return judged
