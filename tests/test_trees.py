"""The trees of the ranker and the combination: LightGBM's text run by ONNX Runtime, its raw scores bit for
bit, its probabilities to within two units in the last place (NumPy's exp is not the C library's)."""

from __future__ import annotations

import pickle
from typing import Any

import lightgbm
import numpy as np
import pytest

from recsys.trees import Trees, verified_trees

NAMES = ("a", "b", "c", "d")


def _data(seed: int = 0, rows: int = 3000) -> tuple[np.ndarray, np.ndarray]:
    """Features with NaN, exact zeros and repeated values (so splits fall on values the rows hold), and
    labels that depend on all of them."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, len(NAMES)))
    x[:, 1] = np.round(x[:, 1], 1)  # few distinct values: thresholds equal to row values
    x[rng.random(rows) < 0.2, 0] = np.nan
    x[rng.random(rows) < 0.3, 2] = 0.0
    logit = x[:, 1] + np.nan_to_num(x[:, 0], nan=1.5) - 0.7 * x[:, 2] * x[:, 3]
    return x, rng.random(rows) < 1 / (1 + np.exp(-logit))


def _fit(params: dict[str, Any], rounds: int = 40, seed: int = 0) -> str:
    x, y = _data(seed)
    base = {"objective": "binary", "num_leaves": 15, "verbose": -1, "num_threads": 1, "seed": 0}
    data = lightgbm.Dataset(x, y.astype(np.float64), feature_name=list(NAMES))
    return lightgbm.train(base | params, data, rounds).model_to_string()


def _probe(seed: int = 1) -> np.ndarray:
    """Rows the fit never saw, with NaN, zeros, infinities and every split threshold exactly."""
    x, _ = _data(seed, 2000)
    x[::97, 3] = np.inf
    x[1::89, 2] = -np.inf
    return x


def _thresholds(text: str) -> np.ndarray:
    """Rows holding each split's threshold in its feature (NaN elsewhere)."""
    rows = []
    for line in verified_trees(text, NAMES).splitlines():
        if line.startswith("split_feature="):
            features = [int(v) for v in line.split("=", 1)[1].split()]
        if line.startswith("threshold="):
            for feature, value in zip(features, line.split("=", 1)[1].split(), strict=True):
                row = np.full(len(NAMES), np.nan)
                row[feature] = float(value)
                rows.append(row)
    return np.array(rows)


@pytest.mark.parametrize(
    "params",
    [{}, {"sigmoid": 0.7}, {"use_missing": False}, {"min_data_in_leaf": 400, "num_leaves": 4}],
    ids=["default", "sigmoid", "no-missing", "small-trees"],
)
def test_trees_give_lightgbms_probabilities(params: dict[str, Any]) -> None:
    text = _fit(params)
    trees = Trees(text, NAMES)
    booster = lightgbm.Booster(model_str=text)
    x = np.concatenate([_probe(), _thresholds(text), np.full((3, len(NAMES)), np.nan)])
    np.testing.assert_array_max_ulp(trees.probability(x), booster.predict(x, num_threads=1), maxulp=2)
    np.testing.assert_array_equal(trees.probability(x, threads=2), trees.probability(x))
    assert trees.probability(x[:0]).shape == (0,)


def test_a_single_leaf_tree_adds_its_value() -> None:
    """A constant model (no split gains anything) is trees of one leaf each."""
    x, _ = _data()
    data = lightgbm.Dataset(x, (np.arange(len(x)) % 3 == 0).astype(np.float64), feature_name=list(NAMES))
    params = {"objective": "binary", "min_data_in_leaf": len(x), "verbose": -1, "num_threads": 1}
    text = lightgbm.train(params, data, 3).model_to_string()
    assert "num_leaves=1\n" in text
    probe = _probe()
    np.testing.assert_array_max_ulp(
        Trees(text, NAMES).probability(probe), lightgbm.Booster(model_str=text).predict(probe), maxulp=2
    )


def test_trees_pickle_as_their_text() -> None:
    trees = Trees(_fit({}), NAMES)
    probe = _probe()
    trees.probability(probe)  # a session exists: it must not travel
    again = pickle.loads(pickle.dumps(trees))
    assert again == trees
    np.testing.assert_array_equal(again.probability(probe), trees.probability(probe))


@pytest.mark.parametrize(
    ("params", "refusal"),
    [
        ({"zero_as_missing": True}, "missing values None or NaN"),
        ({"linear_tree": True}, "linear trees"),
        ({"boosting": "rf", "bagging_freq": 1, "bagging_fraction": 0.5}, "random forest"),
        ({"objective": "cross_entropy"}, "binary"),
    ],
    ids=["zero-as-missing", "linear", "random-forest", "not-binary"],
)
def test_models_the_ensemble_cannot_express_are_refused(params: dict[str, Any], refusal: str) -> None:
    with pytest.raises(ValueError, match=refusal):
        Trees(_fit(params, rounds=5), NAMES)


def test_categorical_splits_and_bad_inputs_are_refused() -> None:
    x, y = _data()
    x[:, 1] = np.abs(np.round(x[:, 1] * 3))  # small non-negative integers: categories
    data = lightgbm.Dataset(x, y.astype(np.float64), feature_name=list(NAMES), categorical_feature=[1])
    params = {"objective": "binary", "verbose": -1, "num_threads": 1, "min_data_per_group": 5}
    text = lightgbm.train(params, data, 5).model_to_string()
    with pytest.raises(ValueError, match="categorical"):
        Trees(text, NAMES)
    trees = Trees(_fit({}, rounds=3), NAMES)
    with pytest.raises(ValueError, match=r"\[rows, 4\]"):
        trees.probability(np.zeros((2, 3)))
    forged = _fit({}, rounds=3).replace("sigmoid:1", "sigmoid:-1", 1)
    with pytest.raises(ValueError, match="sigmoid must be a positive"):
        Trees(forged, NAMES)


def _forged(text: str, children: dict[str, str]) -> str:
    """``text`` with tree 0's child lines replaced and ``tree_sizes`` rewritten to fit, so that only the
    tree's shape is wrong."""
    body, tail = text.split("end of trees", 1)
    head, *trees = body.split("\nTree=")
    trees = ["Tree=" + t for t in trees]
    values = {**children, "tree_sizes": ""}

    def replaced(line: str) -> str:
        key = line.split("=", 1)[0]
        return f"{key}={values[key]}" if key in values else line

    trees[0] = "\n".join(replaced(line) for line in trees[0].split("\n"))
    # each tree's text with the newline that joins it to the next (the last keeps its own)
    values["tree_sizes"] = " ".join([*(str(len(t) + 1) for t in trees[:-1]), str(len(trees[-1]))])
    head = "\n".join(replaced(line) for line in head.split("\n"))
    return head + "\n" + "\n".join(trees) + "end of trees" + tail


@pytest.mark.parametrize(
    "children",
    [
        {"left_child": "-1 2 1", "right_child": "-2 -3 -4"},  # nodes 1 and 2 each other's child: a loop
        {"left_child": "1 2 -1", "right_child": "-2 2 -3"},  # node 2 named twice, leaf 3 never
        {"left_child": "1 -1 -2", "right_child": "2 -1 -4"},  # leaf 0 named twice
    ],
    ids=["loop", "node-twice", "leaf-twice"],
)
def test_nodes_that_do_not_form_a_tree_are_refused(children: dict[str, str]) -> None:
    """A walk from the root must end and reach every node: LightGBM numbers a node's children after it."""
    text = _fit({"num_leaves": 4}, rounds=2)
    assert "num_leaves=4\n" in text.split("Tree=1")[0]
    Trees(_forged(text, {}), NAMES)  # the rewriting alone keeps a valid model
    with pytest.raises(ValueError, match="do not form a tree"):
        Trees(_forged(text, children), NAMES)
