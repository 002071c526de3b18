"""Small real bundles built without torch: an ONNX encoder from ``onnx.helper`` plus a flat FAISS index.

The encoder mimics what matters about SASRec for serving: item embeddings looked up by vocabulary index,
right-aligned position weights (the most recent item always gets weight ``position_weights[max_len - 1]``,
so a sequence longer than ``max_len`` silently reads wrapped positions, like a real position table), and
padding (index 0) ignored. The shopper embedding is the position-weighted mean of the item embeddings;
:meth:`SyntheticBundle.brute_force_scores` recomputes it with numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import onnx
import pyarrow as pa
from onnx import TensorProto, helper, numpy_helper

from recsys.bundle import INPUT_NAME, OUTPUT_NAME, write_bundle
from recsys.data.vocabulary import NUM_RESERVED
from recsys.ranker import Ranker


def encoder_onnx(item_table: np.ndarray, position_weights: np.ndarray) -> bytes:
    """ONNX model: item_ids int64 [batch, seq] -> shopper_embedding float32 [batch, d]."""
    max_len = len(position_weights)
    initializers = [
        numpy_helper.from_array(item_table.astype(np.float32), "item_table"),
        numpy_helper.from_array(position_weights.astype(np.float32), "position_weights"),
        numpy_helper.from_array(np.array(max_len, dtype=np.int64), "max_len"),
        numpy_helper.from_array(np.array(0, dtype=np.int64), "zero"),
        numpy_helper.from_array(np.array(1, dtype=np.int64), "one"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one_f"),
    ]
    nodes = [
        helper.make_node("Shape", [INPUT_NAME], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["seq"]),
        helper.make_node("Range", ["zero", "seq", "one"], ["steps"]),
        helper.make_node("Sub", ["max_len", "seq"], ["offset"]),
        helper.make_node("Add", ["steps", "offset"], ["positions"]),  # right-aligned, like SASRec
        helper.make_node("Gather", ["position_weights", "positions"], ["weight_per_step"]),  # [S]
        helper.make_node("Gather", ["item_table", INPUT_NAME], ["vectors"]),  # [B, S, d]
        helper.make_node("Greater", [INPUT_NAME, "zero"], ["is_item"]),
        helper.make_node("Cast", ["is_item"], ["mask"], to=TensorProto.FLOAT),  # [B, S]
        helper.make_node("Mul", ["mask", "weight_per_step"], ["weights"]),
        helper.make_node("Unsqueeze", ["weights", "axis2"], ["weights3"]),  # [B, S, 1]
        helper.make_node("Mul", ["vectors", "weights3"], ["weighted"]),
        helper.make_node("ReduceSum", ["weighted", "axis1"], ["summed"], keepdims=0),  # [B, d]
        helper.make_node("ReduceSum", ["mask", "axis1"], ["count"], keepdims=1),  # [B, 1]
        helper.make_node("Max", ["count", "one_f"], ["safe_count"]),
        helper.make_node("Div", ["summed", "safe_count"], [OUTPUT_NAME]),
    ]
    graph = helper.make_graph(
        nodes,
        "synthetic_encoder",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", item_table.shape[1]])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime the project supports
    onnx.checker.check_model(model)
    return model.SerializeToString()


@dataclass(frozen=True)
class SyntheticBundle:
    """A written bundle and the parameters needed to recompute its scores."""

    path: Path
    product_ids: np.ndarray  # [N] int64, row-aligned with the index
    popularity: np.ndarray  # [N] int64
    item_table: np.ndarray  # [N + NUM_RESERVED, d] float32, row i = vocabulary index i
    position_weights: np.ndarray  # [max_len] float32

    @property
    def max_len(self) -> int:
        return len(self.position_weights)

    def brute_force_scores(self, history: Sequence[int]) -> np.ndarray:
        """[N] inner products of every item with the shopper embedding of ``history`` (product ids)."""
        row_of = {int(p): i for i, p in enumerate(self.product_ids)}
        rows = np.array([row_of[p] for p in history if p in row_of][-self.max_len :], dtype=np.int64)
        positions = np.arange(len(rows)) + self.max_len - len(rows)
        weights = self.position_weights[positions][:, None]
        embedding = (self.item_table[rows + NUM_RESERVED] * weights).sum(axis=0) / max(len(rows), 1)
        return self.item_table[NUM_RESERVED:] @ embedding

    def popular_product_ids(self) -> np.ndarray:
        """Product ids by popularity descending, then product id ascending (the fallback order)."""
        return self.product_ids[np.lexsort((self.product_ids, -self.popularity))]


def make_bundle(
    path: str | Path,
    num_items: int = 40,
    dim: int = 8,
    max_len: int = 6,
    seed: int = 0,
    manifest: dict[str, Any] | None = None,
    repeat: Ranker | None = None,
) -> SyntheticBundle:
    """Write a seeded synthetic bundle to ``path``; large product ids catch int32 truncation.
    ``repeat``: a ranker over ``num_items`` item rows.
    """
    rng = np.random.default_rng(seed)
    item_table = rng.standard_normal((num_items + NUM_RESERVED, dim)).astype(np.float32)
    item_table[0] = 0.0  # padding
    position_weights = np.linspace(0.5, 1.5, max_len).astype(np.float32)
    product_ids = (10**12 + rng.choice(10 * num_items, size=num_items, replace=False)).astype(np.int64)
    popularity = rng.integers(1, max(2, num_items // 4), size=num_items).astype(np.int64)  # with ties
    index = faiss.IndexFlatIP(dim)
    index.add(item_table[NUM_RESERVED:])
    items = pa.table({"product_id": product_ids, "popularity": popularity})
    write_bundle(
        path,
        encoder_onnx(item_table, position_weights),
        items,
        index,
        {
            "model": {"name": "synthetic-weighted-mean", "config": {"dim": dim, "seed": seed}},
            "max_len": max_len,
            "embedding_dim": dim,
            **(manifest or {}),
        },
        repeat=repeat,
    )
    return SyntheticBundle(Path(path), product_ids, popularity, item_table, position_weights)
