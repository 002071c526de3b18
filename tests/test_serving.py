"""The in-process recommender against brute-force numpy, bundle refusal, and no torch on the serving path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pytest

from recsys.bundle import BundleError, write_bundle
from recsys.rules import Rules
from serving.recommender import Recommender
from tests.bundles import SyntheticBundle, encoder_onnx, make_bundle

ROOT = Path(__file__).resolve().parents[1]
UNKNOWN = [-5, 0, 2**63 - 1, 123]  # never product ids of a synthetic bundle (those start at 10**12)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> SyntheticBundle:
    return make_bundle(tmp_path_factory.mktemp("serving") / "bundle")


@pytest.fixture(scope="module")
def recommender(bundle: SyntheticBundle) -> Recommender:
    return Recommender.load(bundle.path)


def _history(bundle: SyntheticBundle, rows: list[int]) -> list[int]:
    return bundle.product_ids[rows].tolist()


def _expected(bundle: SyntheticBundle, history: list[int], k: int, drop: set[int] = frozenset()) -> list[int]:
    scores = bundle.brute_force_scores(history)
    order = [int(p) for p in bundle.product_ids[np.argsort(-scores, kind="stable")] if int(p) not in drop]
    return order[:k]


@pytest.mark.parametrize("rows", [[0], [3, 7, 1], [5, 5, 5, 9], [11, 2, 30, 17, 4, 8]])
def test_matches_brute_force(bundle: SyntheticBundle, recommender: Recommender, rows: list[int]) -> None:
    history = _history(bundle, rows)
    result = recommender.recommend(history, Rules(k=7))
    assert result.product_ids == _expected(bundle, history, 7)
    scores = bundle.brute_force_scores(history)
    row_of = {int(p): i for i, p in enumerate(bundle.product_ids)}
    np.testing.assert_allclose(result.scores, [scores[row_of[p]] for p in result.product_ids], rtol=1e-5)
    assert (result.fallback, result.unknown, result.truncated) == (False, 0, False)


def test_unknown_products_are_dropped_and_counted(bundle: SyntheticBundle, recommender: Recommender) -> None:
    history = _history(bundle, [3, 7, 1])
    mixed = [UNKNOWN[0], history[0], UNKNOWN[1], UNKNOWN[2], history[1], history[2], UNKNOWN[3]]
    result = recommender.recommend(mixed, Rules(k=5))
    assert result.unknown == 4
    assert result.product_ids == recommender.recommend(history, Rules(k=5)).product_ids


def test_long_history_keeps_the_most_recent_max_len(
    bundle: SyntheticBundle, recommender: Recommender
) -> None:
    history = _history(bundle, list(range(bundle.max_len + 4)))
    long, recent = (
        recommender.recommend(history, Rules(k=5)),
        recommender.recommend(history[-bundle.max_len :], Rules(k=5)),
    )
    assert long.truncated and not recent.truncated
    assert long.product_ids == recent.product_ids == _expected(bundle, history, 5)
    np.testing.assert_allclose(long.scores, recent.scores, rtol=1e-6)
    # Unknown entries do not use up the window: max_len known products after dropping them is not truncated.
    assert not recommender.recommend([*UNKNOWN, *history[-bundle.max_len :]], Rules(k=5)).truncated


@pytest.mark.parametrize("history", [[], UNKNOWN])
def test_empty_or_unknown_history_falls_back_to_popularity(
    bundle: SyntheticBundle, recommender: Recommender, history: list[int]
) -> None:
    # the floor applies to model scores only
    result = recommender.recommend(history, Rules(k=6, min_score=1e9))
    assert result.fallback and result.unknown == len(history) and not result.truncated
    assert result.product_ids == bundle.popular_product_ids()[:6].tolist()
    assert result.scores == sorted(result.scores, reverse=True)


def test_exclude_purchased(bundle: SyntheticBundle, recommender: Recommender) -> None:
    history = _history(bundle, [3, 7, 1, 3])
    assert set(history) & set(recommender.recommend(history, Rules(k=10)).product_ids)  # own items score high
    result = recommender.recommend(history, Rules(k=10, exclude_purchased=True))
    assert result.product_ids == _expected(bundle, history, 10, drop=set(history))


def test_min_score_gives_fewer_or_zero_items(bundle: SyntheticBundle, recommender: Recommender) -> None:
    history = _history(bundle, [3, 7, 1])
    scores = np.sort(bundle.brute_force_scores(history))[::-1]
    floor = float(scores[3] + scores[4]) / 2  # between the 4th and 5th best
    result = recommender.recommend(history, Rules(k=10, min_score=floor))
    assert result.product_ids == _expected(bundle, history, 4) and min(result.scores) >= floor
    nothing = recommender.recommend(history, Rules(k=10, min_score=float(scores[0]) + 1))
    assert nothing.product_ids == [] and nothing.scores == [] and not nothing.fallback


def test_k_above_catalogue_returns_everything(bundle: SyntheticBundle, recommender: Recommender) -> None:
    result = recommender.recommend(_history(bundle, [1]), Rules(k=1000, exclude_purchased=True))
    assert len(result.product_ids) == len(bundle.product_ids) - 1
    with pytest.raises(ValueError, match="k must be"):
        Rules(k=0)


def test_explore_slots_show_new_products(bundle: SyntheticBundle, recommender: Recommender) -> None:
    history = _history(bundle, [3, 7, 1, 3])
    plain = recommender.recommend(history, Rules(k=6))
    assert len(set(plain.product_ids) - set(history)) < 5  # own items score high: few new ones
    result = recommender.recommend(history, Rules(k=6, explore_slots=5))
    new = _expected(bundle, history, 5, drop=set(history))  # the 5 best products new to the shopper
    assert set(new) <= set(result.product_ids)
    assert result.product_ids == [p for p in _expected(bundle, history, 100) if p in result.product_ids]
    assert set(result.product_ids) - set(new) <= set(plain.product_ids[:1])  # the one other: the best
    with pytest.raises(ValueError, match="explore_slots must be"):
        Rules(explore_slots=-1)


def test_batch_equals_single(bundle: SyntheticBundle, recommender: Recommender) -> None:
    rng = np.random.default_rng(3)
    histories = [_history(bundle, rng.integers(0, 40, size=n).tolist()) for n in (1, 3, 0, 12, 5, 2)]
    histories[4] = [*histories[4], *UNKNOWN]
    ks = [3, 10, 4, 7, 40, 1]
    excludes = [False, True, False, True, False, True]
    floors = [None, 0.0, None, None, -1.0, None]
    explores = [1, 0, 2, 3, 0, 1]
    rules = [
        Rules(k=k, exclude_purchased=e, min_score=f, explore_slots=x)
        for k, e, f, x in zip(ks, excludes, floors, explores, strict=True)
    ]
    batch = recommender.recommend_batch(histories, rules)
    for i, got in enumerate(batch):
        single = recommender.recommend(histories[i], rules[i])
        assert got.product_ids == single.product_ids
        assert (got.fallback, got.unknown, got.truncated) == (
            single.fallback,
            single.unknown,
            single.truncated,
        )
        np.testing.assert_allclose(got.scores, single.scores, rtol=1e-5, atol=1e-6)
    assert recommender.recommend_batch([]) == []


def _copy(bundle: SyntheticBundle, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle.path, tmp_path / "copy"))


def test_corrupted_file_is_refused(bundle: SyntheticBundle, tmp_path: Path) -> None:
    path = _copy(bundle, tmp_path)
    data = bytearray((path / "items.faiss").read_bytes())
    data[-1] ^= 0xFF
    (path / "items.faiss").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"items\.faiss is corrupt"):
        Recommender.load(path)


def test_missing_file_is_refused(bundle: SyntheticBundle, tmp_path: Path) -> None:
    path = _copy(bundle, tmp_path)
    (path / "model.onnx").unlink()
    with pytest.raises(BundleError, match=r"model\.onnx is missing"):
        Recommender.load(path)
    with pytest.raises(BundleError, match="not a bundle directory"):
        Recommender.load(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("format_version", 99, r"bundle\.json has format_version 99"),
        ("max_len", 0, r"bundle\.json: 'max_len' must be a positive integer, got 0"),
        ("max_len", 1.5, r"'max_len' must be a positive integer"),
        ("max_len", 10**6, r"above this reader's limit"),
        ("embedding_dim", "4", r"'embedding_dim' must be a positive integer"),
        ("input_name", "ids", r"'input_name' is 'ids'"),
    ],
)
def test_bad_manifest_is_refused(
    bundle: SyntheticBundle, tmp_path: Path, key: str, value: object, message: str
) -> None:
    path = _copy(bundle, tmp_path)
    manifest = json.loads((path / "bundle.json").read_text())
    manifest[key] = value
    (path / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message):
        Recommender.load(path)


def _items(n: int) -> pa.Table:
    return pa.table({"product_id": np.arange(n, dtype=np.int64), "popularity": np.ones(n, dtype=np.int64)})


def _index(n: int, dim: int) -> faiss.Index:
    index = faiss.IndexFlatIP(dim)
    index.add(np.ones((n, dim), dtype=np.float32))
    return index


def test_unloadable_model_is_refused(tmp_path: Path) -> None:
    manifest = {"model": {"name": "junk"}, "max_len": 4, "embedding_dim": 8}
    write_bundle(tmp_path / "b", b"not an onnx model", _items(5), _index(5, 8), manifest)
    with pytest.raises(BundleError, match=r"model\.onnx cannot be loaded"):
        Recommender.load(tmp_path / "b")


def test_model_index_dimension_mismatch_is_refused(tmp_path: Path) -> None:
    model = encoder_onnx(np.ones((7, 4), np.float32), np.ones(4, np.float32))  # 4-d shoppers, 8-d items
    manifest = {"model": {"name": "mismatch"}, "max_len": 4, "embedding_dim": 8}
    write_bundle(tmp_path / "b", model, _items(5), _index(5, 8), manifest)
    with pytest.raises(BundleError, match=r"model\.onnx returned \(1, 4\)"):
        Recommender.load(tmp_path / "b")


def test_duplicate_product_ids_are_refused(tmp_path: Path) -> None:
    model = encoder_onnx(np.ones((7, 8), np.float32), np.ones(4, np.float32))
    items = pa.table({"product_id": np.array([1, 2, 3, 2, 5]), "popularity": np.ones(5, dtype=np.int64)})
    manifest = {"model": {"name": "dupes"}, "max_len": 4, "embedding_dim": 8}
    write_bundle(tmp_path / "b", model, items, _index(5, 8), manifest)
    with pytest.raises(BundleError, match="product_id must be unique"):
        Recommender.load(tmp_path / "b")


def test_metadata_is_the_manifest(bundle: SyntheticBundle, recommender: Recommender) -> None:
    manifest = json.loads((bundle.path / "bundle.json").read_text())
    assert recommender.metadata == manifest
    recommender.metadata["max_len"] = -1  # a copy: the recommender is unaffected
    assert recommender.max_len == bundle.max_len


def test_serving_never_imports_torch(bundle: SyntheticBundle) -> None:
    code = (
        "import sys\n"
        "import serving, serving.app\n"
        "from recsys.rules import Rules\n"
        "from serving.recommender import Recommender\n"
        f"r = Recommender.load({str(bundle.path)!r})\n"
        f"assert r.recommend({_history(bundle, [1, 2])!r}, Rules(k=3)).product_ids\n"
        "r.recommend([], Rules(k=3))\n"
        "heavy = ('torch', 'lightning', 'pytorch_lightning')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
