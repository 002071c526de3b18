"""Gradient-boosted trees as plain values: LightGBM's text model, checked, then run by ONNX Runtime.

The ranker (:mod:`recsys.ranker`) and the campaign combination (:mod:`recsys.combination`) are binary
LightGBM models, fitted with lightgbm and stored as its text format: numbers and names, no code. Nothing
reads a stored model before :func:`verified_trees` has checked it line by line, since LightGBM parses
trees on several threads and aborts the whole process on a malformed one. :class:`Trees` then runs the
checked trees as one ONNX ``TreeEnsemble`` (``ai.onnx.ml`` opset 5, whose splits, leaves and sums are
float64) in ONNX Runtime, built in memory from the text, so the text stays the one stored form. It gives
LightGBM's own raw scores to the last bit whatever the thread count, and its probabilities to within two
units in the last place (NumPy's ``exp`` is not the C library's, which LightGBM calls; tests/test_trees.py),
at less cost per call than LightGBM's predictor (BENCHMARKS.md, "The ranker's trees"). numpy, onnx and
onnxruntime only: serving imports it.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from recsys.runtime import session_options

END_OF_TREES = "end of trees"
_TREE_ARRAYS = ("split_feature", "threshold", "decision_type", "left_child", "right_child")
# LightGBM's decision_type bits: 1 categorical, 2 default left, 4-8 the missing type (0 None, 1 Zero,
# 2 NaN). Numerical splits whose missing values are None (read as 0) or NaN (sent the default way) are
# what lightgbm fits without zero_as_missing, and exactly what a TreeEnsemble expresses.
_DEFAULT_LEFT = 2
_MISSING_NAN = 8
_DECISION_TYPES = (0, _DEFAULT_LEFT, _MISSING_NAN, _MISSING_NAN | _DEFAULT_LEFT)
# LightGBM's predictor reads any |value| <= its kZeroThreshold (1e-35 as a float32) as exactly 0
ZERO_THRESHOLD = float(np.float32(1e-35))
IR_VERSION = 10  # ONNX 1.16's, the oldest that has TreeEnsemble: any later onnxruntime reads it


@dataclass(frozen=True)
class _Tree:
    """One tree's arrays as LightGBM writes them: node i (of leaves - 1) splits on ``split_feature[i]``
    at ``threshold[i]``; a child >= 0 is a node, a child < 0 the leaf ``~child``."""

    split_feature: np.ndarray
    threshold: np.ndarray
    decision_type: np.ndarray
    left_child: np.ndarray
    right_child: np.ndarray
    leaf_value: np.ndarray


def _numbers(block: dict[str, str], key: str, count: int, kind: type) -> np.ndarray:
    values = block.get(key, "").split()
    if len(values) != count:
        raise ValueError(f"tree {block.get('Tree')}: {key} needs {count} values, has {len(values)}")
    try:
        array = np.array([kind(v) for v in values], dtype=np.float64 if kind is float else np.int64)
    except (ValueError, OverflowError) as error:
        raise ValueError(f"tree {block.get('Tree')}: {key} holds a non-number") from error
    # a split threshold may be infinite (LightGBM's bound of a feature's last bin), never NaN
    if np.isnan(array).any() or (key != "threshold" and not np.isfinite(array).all()):
        raise ValueError(f"tree {block.get('Tree')}: {key} holds a non-finite number")
    return array


def _parsed(text: str, features: tuple[str, ...], what: str) -> tuple[str, float, list[_Tree]]:
    """The header and trees of ``text`` (up to the end of the trees), the sigmoid's scale, the trees."""
    if not isinstance(text, str) or END_OF_TREES not in text or not text.startswith("tree\n"):
        raise ValueError(f"{what} cannot be read: it is not a LightGBM text model")
    body = text[: text.index(END_OF_TREES)]
    first = body.find("\nTree=")
    header_text = body if first < 0 else body[: first + 1]
    header = dict(line.split("=", 1) for line in header_text.splitlines()[1:] if "=" in line)
    if header.get("feature_names", "").split() != list(features):
        raise ValueError(f"{what} reads features {header.get('feature_names')}, it declares {list(features)}")
    expected = {"version": "v4", "num_class": "1", "num_tree_per_iteration": "1",
                "max_feature_idx": str(len(features) - 1)}  # fmt: skip
    for key, value in expected.items():
        if header.get(key) != value:
            raise ValueError(f"{what} cannot be read: {key}={header.get(key)!r}, expected {value}")
    if "average_output" in header_text.splitlines():  # a random forest averages its trees, boosting sums
        raise ValueError(f"{what} must be boosted trees, not a random forest (average_output)")
    objective = header.get("objective", "").split()
    if objective[:1] != ["binary"]:
        raise ValueError(f"{what} must output probabilities (binary), not {header.get('objective')!r}")
    sigmoid = _sigmoid(objective[1:], what)
    try:
        sizes = [int(v) for v in header.get("tree_sizes", "").split()]
    except ValueError as error:
        raise ValueError(f"{what} cannot be read: tree_sizes are not integers") from error
    position = len(header_text)
    trees = []
    for i, size in enumerate(sizes):
        chunk = body[position : position + size]
        position += size
        block = dict(line.split("=", 1) for line in chunk.splitlines() if "=" in line)
        if not chunk.startswith(f"Tree={i}\n") or len(chunk) != size:
            raise ValueError(f"{what} cannot be read: tree {i} is not where tree_sizes put it")
        leaves = int(_numbers(block, "num_leaves", 1, int)[0])
        if leaves < 1 or block.get("num_cat") != "0":
            raise ValueError(f"tree {i}: needs >= 1 leaves and no categorical splits")
        if block.get("is_linear", "0") != "0":
            raise ValueError(f"tree {i}: linear trees are not read, only constant leaves")
        leaf_value = _numbers(block, "leaf_value", leaves, float)
        if leaves == 1:
            empty = np.zeros(0, dtype=np.int64)
            trees.append(_Tree(empty, np.zeros(0), empty, empty, empty, leaf_value))
            continue
        split_feature, threshold, decision_type, left, right = (
            _numbers(block, key, leaves - 1, float if key == "threshold" else int) for key in _TREE_ARRAYS
        )
        children = np.concatenate([left, right])
        if (split_feature < 0).any() or (split_feature >= len(features)).any():
            raise ValueError(f"tree {i}: a split names a feature outside the model's {len(features)}")
        if (children < -leaves).any() or (children >= leaves - 1).any() or (children == 0).any():
            raise ValueError(f"tree {i}: a child index is out of range")
        # a tree: every node but the root and every leaf has one parent, and a node's children come after
        # it (as LightGBM numbers them), so a walk from the root ends and reaches everything
        parents = np.concatenate([np.arange(leaves - 1)] * 2)
        nodes, leaf_ids = children[children > 0], ~children[children < 0]
        if (
            not np.array_equal(np.sort(nodes), np.arange(1, leaves - 1))
            or not np.array_equal(np.sort(leaf_ids), np.arange(leaves))
            or (nodes <= parents[children > 0]).any()
        ):
            raise ValueError(f"tree {i}: its nodes do not form a tree")
        if not np.isin(decision_type, _DECISION_TYPES).all():
            raise ValueError(f"tree {i}: only numerical splits with missing values None or NaN are read")
        trees.append(_Tree(split_feature, threshold, decision_type, left, right, leaf_value))
    if body[position:].strip():
        raise ValueError(f"{what} cannot be read: text between the trees and their end")
    return body + END_OF_TREES + "\n", sigmoid, trees


def _sigmoid(parameters: list[str], what: str) -> float:
    """The binary objective's ``sigmoid:`` scale (LightGBM's P = 1 / (1 + exp(-scale * raw score)))."""
    values = [p.split(":", 1)[1] for p in parameters if p.startswith("sigmoid:")]
    try:
        scale = float(values[0]) if values else 1.0
    except ValueError as error:
        raise ValueError(f"{what}: the objective's sigmoid is not a number") from error
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{what}: the objective's sigmoid must be a positive number, got {scale}")
    return scale


def verified_trees(text: str, features: tuple[str, ...], what: str = "the ranker's model") -> str:
    """The header and trees of LightGBM text model ``text``, checked line by line: a model that is not
    exactly a binary model over ``features`` of numerical splits is refused (ValueError naming the
    problem). What follows the trees (importances, training parameters) is left out: prediction needs
    none of it. ``what`` names the model in the errors."""
    return _parsed(text, features, what)[0]


def _ensemble(trees: list[_Tree], num_features: int) -> bytes:
    """The trees as one serialized ONNX model: input ``x`` [M, F] float64 -> raw score ``y`` [M, 1]."""
    roots, feature, split, missing_true = [], [], [], []
    true_id, true_leaf, false_id, false_leaf, leaf_weight = [], [], [], [], []
    for tree in trees:
        node_base, leaf_base = len(feature), len(leaf_weight)
        roots.append(node_base)
        leaf_weight.extend(tree.leaf_value.tolist())
        if not len(tree.split_feature):  # a single leaf: one split whose two sides are that leaf
            feature.append(0)
            split.append(0.0)
            missing_true.append(0)
            true_id.append(leaf_base)
            false_id.append(leaf_base)
            true_leaf.append(1)
            false_leaf.append(1)
            continue
        feature.extend(tree.split_feature.tolist())
        split.extend(tree.threshold.tolist())
        nan_missing = (tree.decision_type & _MISSING_NAN) > 0
        # NaN goes the default way where NaN is the missing value; elsewhere LightGBM reads it as 0
        goes_left = np.where(nan_missing, (tree.decision_type & _DEFAULT_LEFT) > 0, tree.threshold >= 0.0)
        missing_true.extend(goes_left.astype(np.int64).tolist())
        sides = ((tree.left_child, true_id, true_leaf), (tree.right_child, false_id, false_leaf))
        for child, ids, is_leaf in sides:
            ids.extend(np.where(child < 0, leaf_base + ~child, node_base + child).tolist())
            is_leaf.extend((child < 0).astype(np.int64).tolist())
    node = helper.make_node(
        "TreeEnsemble",
        ["x"],
        ["y"],
        domain="ai.onnx.ml",
        aggregate_function=1,  # SUM
        post_transform=0,  # NONE: the sigmoid is applied as LightGBM applies it
        n_targets=1,
        tree_roots=roots,
        nodes_featureids=feature,
        nodes_splits=numpy_helper.from_array(np.array(split, dtype=np.float64)),
        nodes_modes=numpy_helper.from_array(np.zeros(len(feature), dtype=np.uint8)),  # BRANCH_LEQ: x <= split
        nodes_missing_value_tracks_true=missing_true,
        nodes_truenodeids=true_id,
        nodes_trueleafs=true_leaf,
        nodes_falsenodeids=false_id,
        nodes_falseleafs=false_leaf,
        leaf_targetids=[0] * len(leaf_weight),
        leaf_weights=numpy_helper.from_array(np.array(leaf_weight, dtype=np.float64)),
    )
    graph = helper.make_graph(
        [node],
        "trees",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [None, num_features])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [None, 1])],
    )
    opsets = [helper.make_opsetid("ai.onnx.ml", 5)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION).SerializeToString()


@dataclass(frozen=True)
class Trees:
    """A checked binary LightGBM text model over ``features``, run by ONNX Runtime: :meth:`probability`.

    One single-threaded session; several threads each run a contiguous share of the rows, so every
    row's trees are summed in the same order and the answer does not depend on the thread count.
    Pickling keeps the text only.
    """

    text: str
    features: tuple[str, ...]
    what: str = "the ranker's model"
    sigmoid: float = field(init=False, repr=False, compare=False)
    session: ort.InferenceSession = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _, sigmoid, trees = _parsed(self.text, self.features, self.what)
        model = _ensemble(trees, len(self.features))
        session = ort.InferenceSession(
            model, sess_options=session_options(1), providers=["CPUExecutionProvider"]
        )
        object.__setattr__(self, "sigmoid", sigmoid)
        object.__setattr__(self, "session", session)

    def __reduce__(self) -> tuple[type, tuple[str, tuple[str, ...], str]]:
        return Trees, (self.text, self.features, self.what)

    def _raw(self, x: np.ndarray) -> np.ndarray:
        (raw,) = self.session.run(None, {"x": x})  # [M, 1]
        return raw[:, 0]

    def probability(self, x: np.ndarray, threads: int = 1) -> np.ndarray:
        """P(positive) [M] float64 of feature rows ``x`` [M, F] (columns :attr:`features`, NaN missing),
        on ``threads`` threads: LightGBM's ``Booster.predict`` to within two units in the last place."""
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.features):
            raise ValueError(f"{self.what} reads [rows, {len(self.features)}] features, got {x.shape}")
        if not len(x):
            return np.zeros(0)
        x = np.where(np.abs(x) <= ZERO_THRESHOLD, 0.0, x)  # a new C-ordered array
        if threads == 1 or len(x) < 2 * threads:
            raw = self._raw(x)
        else:
            with ThreadPoolExecutor(threads) as pool:  # onnxruntime releases the GIL while it runs
                raw = np.concatenate(list(pool.map(self._raw, np.array_split(x, threads))))
        return 1.0 / (1.0 + np.exp(-self.sigmoid * raw))
