"""Vocabulary, sequences and the temporal split (no future leakage)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from recsys.data import vocabulary
from recsys.data.sequences import (
    HISTORY_ORDER,
    build_sequences,
    concat_ranges,
    ordered_runs,
    time_ordered,
    training_windows,
)
from recsys.data.split import next_basket_targets, parse_cutoff, temporal_split
from recsys.data.vocabulary import PAD, UNK, Vocabulary
from recsys.inputs import Histories

DAY = timedelta(days=1)
T0 = datetime(2017, 1, 1, tzinfo=timezone.utc)


def receipts(rows: list[tuple[int, int, int, int]]) -> pa.Table:
    """(shopper, basket, product, day) rows -> canonical receipts."""
    s, b, p, d = (list(x) for x in zip(*rows, strict=True))
    return pa.table(
        {
            "shopper_id": pa.array(s, pa.int64()),
            "basket_id": pa.array(b, pa.int64()),
            "product_id": pa.array(p, pa.int64()),
            "timestamp": pa.array([T0 + n * DAY for n in d], pa.timestamp("us", tz="UTC")),
        }
    )


ROWS = [
    # shopper 1: baskets 11 (day 0), 12 (day 5); basket ids out of time order on purpose
    (1, 12, 100, 0), (1, 12, 101, 0), (1, 11, 102, 5),
    # shopper 2: two baskets before the cutoff (day 10), two after
    (2, 21, 100, 1), (2, 22, 100, 3), (2, 22, 103, 3), (2, 23, 101, 12), (2, 23, 999, 12), (2, 24, 102, 15),
    # shopper 3: only after the cutoff (no history -> not evaluated)
    (3, 31, 100, 11),
    # shopper 4: after the cutoff only an out-of-vocabulary product -> dropped
    (4, 41, 100, 2), (4, 42, 998, 11),
]  # fmt: skip


def test_vocabulary_orders_by_baskets_then_id_and_reserves_ids() -> None:
    vocab = Vocabulary.build(receipts(ROWS))
    assert vocab.product_ids[:2].tolist() == [100, 101]  # 100 in 5 baskets, 101 in 2 (tie with 102 -> id)
    assert vocab.encode(np.array([100, 12345])).tolist() == [2, UNK]
    assert vocab.decode(np.array([PAD, UNK, 2])).tolist() == [-1, -1, 100]
    assert Vocabulary.from_dict(vocab.to_dict()).product_ids.tolist() == vocab.product_ids.tolist()


def test_vocabulary_hash_lookup_matches_binary_search(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many ids at once are looked up by hashing (``pyarrow.compute.index_in``), few by binary search:
    the same rows either way, unknown ids -1, the input's shape kept."""
    rng = np.random.default_rng(0)
    vocab = Vocabulary(rng.permutation(np.arange(0, 30_000, 3)), np.ones(10_000, dtype=np.int64))
    ids = rng.integers(-5, 30_005, size=(40, 500))  # two in three unknown
    hashed = vocab.rows(ids)
    monkeypatch.setattr(vocabulary, "HASHED_LOOKUP_MIN", ids.size + 1)
    searched = vocab.rows(ids)
    assert hashed.shape == ids.shape and hashed.dtype == np.int64
    assert np.array_equal(hashed, searched) and (hashed == -1).any()
    known = hashed >= 0
    assert np.array_equal(vocab.product_ids[hashed[known]], ids[known])


@pytest.mark.parametrize("span", [1_000, 2**61], ids=["small ids", "ids too far apart for one key"])
def test_receipts_are_time_ordered_whatever_order_they_come_in(span: int) -> None:
    """Receipts in any order give the rows of a sort by shopper, time, basket and product id (those
    written basket by basket only have each basket's products ordered), and the same sequences."""
    rows = [*ROWS, (2, 22, 100, 3)]  # a product twice in one basket
    table = receipts(rows)
    ids = table.column("product_id").to_numpy()
    table = table.set_column(2, "product_id", pa.array(np.where(ids == 999, span, ids)))
    keys = [(name, "ascending") for name in HISTORY_ORDER]
    ordered = table.sort_by(keys)
    by_basket = ordered.take(
        np.lexsort(
            (
                -ordered.column("product_id").to_numpy(),
                *(ordered.column(k).to_numpy() for k in reversed(HISTORY_ORDER[:3])),
            )
        )
    )
    shuffled = table.take(np.random.default_rng(1).permutation(table.num_rows))

    def opens(t: pa.Table) -> np.ndarray | None:
        return ordered_runs(tuple(pc.cast(t.column(k), pa.int64()).to_numpy() for k in HISTORY_ORDER[:3]))

    assert opens(shuffled) is None and opens(by_basket) is not None
    assert opens(ordered.slice(0, 0)) is not None
    assert opens(ordered.slice(0, 1)).tolist() == [True]
    vocab = Vocabulary.build(table)
    for other in (table, ordered, by_basket, shuffled):
        assert time_ordered(other).equals(ordered.select(list(HISTORY_ORDER)))
        a, b = build_sequences(other, vocab), build_sequences(ordered, vocab)
        assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("shopper_ids", "offsets", "items"))
        assert np.array_equal(a.basket, b.basket) and np.array_equal(a.timestamps, b.timestamps)


def test_vocabulary_min_baskets_counts_distinct_baskets() -> None:
    doubled = receipts([(1, 1, 7, 0), (1, 1, 7, 0), (1, 2, 8, 0), (2, 3, 8, 0)])
    assert Vocabulary.build(doubled, min_baskets=2).product_ids.tolist() == [8]


def test_sequences_order_baskets_by_time_then_id() -> None:
    vocab = Vocabulary.build(receipts(ROWS))
    seqs = build_sequences(receipts(ROWS), vocab)
    first = vocab.decode(seqs.items[seqs.offsets[0] : seqs.offsets[1]]).tolist()
    assert first == [100, 101, 102]  # basket 12 (day 0) before basket 11 (day 5)
    assert seqs.basket[seqs.offsets[0] : seqs.offsets[1]].tolist() == [0, 0, 1]
    assert seqs.shopper_ids.tolist() == [1, 2, 3, 4]


def test_model_inputs_keep_most_recent_items_left_padded() -> None:
    vocab = Vocabulary.build(receipts(ROWS))
    seqs = build_sequences(receipts(ROWS), vocab)
    last, _ = Histories.from_sequences(seqs).model_inputs(2)
    assert last.shape == (4, 2)
    assert vocab.decode(last[1]).tolist() == [999, 102]
    assert last[2].tolist() == [PAD, vocab.encode(np.array([100]))[0]]


def test_select_keeps_order_and_gives_unknown_shoppers_empty_rows() -> None:
    seqs = build_sequences(receipts(ROWS), Vocabulary.build(receipts(ROWS)))
    sub = seqs.select(np.array([3, 77, 1]))
    assert sub.lengths.tolist() == [1, 0, 3]
    assert (
        sub.items[sub.offsets[2] : sub.offsets[3]].tolist()
        == seqs.items[seqs.offsets[0] : seqs.offsets[1]].tolist()
    )


def test_concat_ranges() -> None:
    assert concat_ranges(np.array([5, 0, 9]), np.array([2, 0, 3])).tolist() == [5, 6, 9, 10, 11]
    assert concat_ranges(np.array([3]), np.array([0])).tolist() == []


def test_training_windows_tile_the_whole_history() -> None:
    rows = [(1, b, 100 + b, b) for b in range(12)]
    seqs = build_sequences(receipts(rows), Vocabulary.build(receipts(rows)))
    starts, ends = training_windows(seqs, max_len=5)
    # 12 items -> 11 targets -> windows [7, 12), [2, 7) overlapping by one item, and [0, 2)
    assert list(zip(starts.tolist(), ends.tolist(), strict=True)) == [(6, 12), (1, 7), (0, 2)]
    targets = np.concatenate([np.arange(s + 1, e) for s, e in zip(starts, ends, strict=True)])
    assert sorted(targets.tolist()) == list(range(1, 12))  # every item but the first is a target once


def test_split_has_no_future_leakage() -> None:
    table = receipts(ROWS)
    cutoff = T0 + 10 * DAY
    train, test = temporal_split(table, cutoff)
    assert train.num_rows + test.num_rows == table.num_rows
    assert max(train.column("timestamp").to_pylist()) < cutoff <= min(test.column("timestamp").to_pylist())
    vocab = Vocabulary.build(train)
    assert 999 not in vocab.product_ids  # seen only after the cutoff
    targets = next_basket_targets(train, test, vocab)
    history = dict(zip(targets.shopper_ids.tolist(), targets.history, strict=True))
    assert 101 not in history[2]  # bought by shopper 2 only after the cutoff


def test_targets_are_first_basket_after_cutoff() -> None:
    train, test = temporal_split(receipts(ROWS), T0 + 10 * DAY)
    targets = next_basket_targets(train, test, Vocabulary.build(train))
    # shopper 3 has no history; shopper 4's target is out of vocabulary only -> both dropped
    assert targets.shopper_ids.tolist() == [2]
    assert targets.items[0].tolist() == [101]
    assert targets.all_items[0].tolist() == [101, 999]
    assert targets.history[0].tolist() == [100, 103]


def test_targets_with_a_horizon_take_every_basket_within_it() -> None:
    train, test = temporal_split(receipts(ROWS), T0 + 10 * DAY)
    targets = next_basket_targets(train, test, Vocabulary.build(train), horizon=7 * DAY)
    assert targets.items[0].tolist() == [101, 102]


def test_cutoff_parsing_uses_the_receipts_zone() -> None:
    cutoff = parse_cutoff("2017-12-01", "America/New_York")
    assert cutoff.utcoffset() == timedelta(hours=-5)
    with pytest.raises(ValueError, match="timezone-aware"):
        temporal_split(receipts(ROWS), datetime(2017, 1, 5))


def test_unknown_products_are_dropped_by_default_or_kept_as_unk() -> None:
    train, _ = temporal_split(receipts(ROWS), T0 + 10 * DAY)
    vocab = Vocabulary.build(train, min_baskets=2)  # only 100 is in >= 2 baskets
    dropped = build_sequences(train, vocab)
    kept = build_sequences(train, vocab, drop_unknown=False)
    assert UNK not in dropped.items
    assert len(kept.items) == train.num_rows and (kept.items == UNK).sum() == train.num_rows - 4
    assert dropped.lengths.sum() == 4
