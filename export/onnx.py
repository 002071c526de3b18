"""ONNX export of a shopper encoder, and the parity check that gates every export.

The exported graph is the model's ``encode``: ``item_ids`` int64 [batch, seq] (left-padded vocabulary
indices, seq <= max_len) -> ``shopper_embedding`` float32 [batch, d], both axes dynamic. A model built with
``config.time_gaps`` (basket-aware) takes a second input, ``gap_days`` float32 [batch, seq]
(``recsys.data.sequences.purchase_gaps``). Any model exposing ``encode``, ``item_embeddings`` and
``config.max_len`` exports; nothing here knows which architecture it is.

The graph is ``encode``'s, so it computes only what the shopper embedding needs (the models trim their
last step to the last position). :func:`quantize_int8` optionally stores its weight matrix products in
int8 (ONNX Runtime's own dynamic quantiser), an export option with its parity recorded in the manifest.
"""

from __future__ import annotations

import io
import math
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from recsys.bundle import GAPS_NAME, INPUT_NAME, OUTPUT_NAME
from recsys.data.sequences import FIRST_PURCHASE
from recsys.data.vocabulary import PAD, UNK

PARITY_TOLERANCE = 1e-4  # max abs difference of shopper embeddings, ONNX Runtime vs torch
QUANTIZATIONS = ("none", "int8", "auto")  # conf/export.yaml's quantize (auto: int8 where it costs little)


class ExportError(RuntimeError):
    """An export that failed one of its checks; nothing is written."""


class _Encoder(nn.Module):
    """``model.encode`` as ``forward``, the only method torch.onnx exports."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, item_ids: Tensor, gaps: Tensor | None = None) -> Tensor:
        return self.model.encode(item_ids, gaps) if takes_gaps(self.model) else self.model.encode(item_ids)


def max_len(model: nn.Module) -> int:
    """Longest history the model takes: ``config.max_len``, which every model config carries."""
    return int(model.config.max_len)


def takes_gaps(model: nn.Module) -> bool:
    """Whether the model reads purchase gaps beside item ids (``config.time_gaps``, off if absent)."""
    return bool(getattr(model.config, "time_gaps", False))


def input_names(model: nn.Module) -> list[str]:
    """The exported graph's inputs, in order."""
    return [INPUT_NAME, GAPS_NAME] if takes_gaps(model) else [INPUT_NAME]


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd for the block, then the caller's mode back."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def export_encoder(model: nn.Module) -> bytes:
    """The model's ``encode`` as ONNX bytes (one self-contained graph: no external data).

    Raises ``ExportError`` if the exported graph's names, types or dynamic axes are not the bundle's.
    """
    length, names = max_len(model), input_names(model)
    # Two rows of max_len: an example axis of size 1 would be baked into the graph as a constant.
    example = torch.full((2, length), UNK, dtype=torch.int64)
    examples = (example, torch.ones(example.shape)) if len(names) == 2 else (example,)
    # one pair of Dims for all inputs: item ids and gaps are the same shape
    axes = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", max=length)}
    dynamic_shapes = {"item_ids": axes, "gaps": axes} if len(names) == 2 else {"item_ids": axes}
    buffer = io.BytesIO()
    # torch 2.13's exporter swaps in while_loop GRU/LSTM decompositions for dynamic shapes by writing the
    # ops' py_kernels without clearing their dispatch caches: once one export has cached the default
    # (time-unrolled) decomposition, a later RNN export in the process would pin the sequence axis.
    for op in (torch.ops.aten.gru.input, torch.ops.aten.lstm.input):
        op._dispatch_cache.clear()
    with _eval_mode(model), warnings.catch_warnings():
        # item ids and gaps share their Dims on purpose; the exporter remarks on it once per axis
        warnings.filterwarnings("ignore", message=".*shares the same shape constraints", category=UserWarning)
        torch.onnx.export(
            _Encoder(model).eval(),
            examples,
            buffer,
            input_names=names,
            output_names=[OUTPUT_NAME],
            dynamic_shapes=dynamic_shapes,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    onnx_bytes = buffer.getvalue()
    _check_signature(onnx_bytes, names)
    return onnx_bytes


def _check_signature(onnx_bytes: bytes, inputs: list[str]) -> None:
    """The graph has the bundle's inputs and output, with symbolic batch (and sequence) axes."""
    graph = onnx.load_from_string(onnx_bytes).graph
    names = ([v.name for v in graph.input], [v.name for v in graph.output])
    if names != (inputs, [OUTPUT_NAME]):
        raise ExportError(f"exported graph has inputs/outputs {names}, expected {inputs} -> [{OUTPUT_NAME}]")
    types = {INPUT_NAME: onnx.TensorProto.INT64, GAPS_NAME: onnx.TensorProto.FLOAT}
    for value, elem_type, dynamic in (
        *((value, types[value.name], (True, True)) for value in graph.input),
        (graph.output[0], onnx.TensorProto.FLOAT, (True, False)),
    ):
        tensor = value.type.tensor_type
        symbolic = tuple(dim.HasField("dim_param") for dim in tensor.shape.dim)
        if tensor.elem_type != elem_type or symbolic != dynamic:
            raise ExportError(
                f"exported {value.name} has type {onnx.TensorProto.DataType.Name(tensor.elem_type)} and "
                f"dims {[str(dim).strip() for dim in tensor.shape.dim]}; expected "
                f"{onnx.TensorProto.DataType.Name(elem_type)} with symbolic axes {dynamic}"
            )


def quantize_int8(onnx_bytes: bytes) -> bytes:
    """The encoder with its weight matrix products in int8: ONNX Runtime's dynamic quantisation
    (``onnxruntime.quantization.quantize_dynamic``: int8 weights, activations quantised per call).

    Only products with a constant weight are quantised (``MatMulConstBOnly``): attention's products of
    two activations and the embedding tables (gathers) stay fp32. Raises ``ExportError`` if the result
    lost the bundle's signature.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="caddie-quantize-") as directory:
        source, target = Path(directory, "fp32.onnx"), Path(directory, "int8.onnx")
        source.write_bytes(onnx_bytes)
        quantize_dynamic(
            source,
            target,
            op_types_to_quantize=["MatMul", "Gemm"],
            weight_type=QuantType.QInt8,
            extra_options={"MatMulConstBOnly": True},
        )
        quantized = target.read_bytes()
    graph = onnx.load_from_string(onnx_bytes).graph
    _check_signature(quantized, [value.name for value in graph.input])
    return quantized


def onnx_encoder(onnx_bytes: bytes) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The exported encoder under ONNX Runtime (CPU): item ids int64 [B, L] and gaps float32 [B, L] ->
    float32 [B, d]; the gaps are passed only to a graph that takes them."""
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    with_gaps = GAPS_NAME in [i.name for i in session.get_inputs()]

    def encode(item_ids: np.ndarray, gaps: np.ndarray) -> np.ndarray:
        feeds = {INPUT_NAME: item_ids, GAPS_NAME: gaps} if with_gaps else {INPUT_NAME: item_ids}
        return session.run([OUTPUT_NAME], feeds)[0]

    return encode


def random_histories(
    rng: np.random.Generator, batch: int, length: int, vocab_size: int, weights: np.ndarray | None = None
) -> np.ndarray:
    """[batch, length] int64 left-padded histories, each with 0..length items.

    Items are drawn uniformly from ``UNK .. vocab_size - 1``, or by ``weights`` ([vocab_size], sums to 1).
    """
    if weights is None:
        items = rng.integers(UNK, vocab_size, (batch, length))
    else:
        items = rng.choice(vocab_size, size=(batch, length), p=weights)
    padding = rng.integers(0, length + 1, batch)  # leading padding positions per row
    items[np.arange(length)[None, :] < padding[:, None]] = PAD
    return items.astype(np.int64)


def random_gaps(rng: np.random.Generator, histories: np.ndarray) -> np.ndarray:
    """Gaps float32 [B, L] for ``histories``: half the rows in the previous row's basket (0), the others
    days later (exponential, mean 7), some rows a shopper's first (``FIRST_PURCHASE``); 0 at padding."""
    gaps = np.where(rng.random(histories.shape) < 0.5, 0.0, rng.exponential(7.0, histories.shape))
    gaps[rng.random(histories.shape) < 0.05] = FIRST_PURCHASE
    return np.where(histories == PAD, 0.0, gaps).astype(np.float32)


def parity(
    model: nn.Module,
    onnx_bytes: bytes,
    batch_sizes: Sequence[int] = (1, 7, 64),
    lengths: Sequence[int] | None = None,
    seed: int = 0,
) -> float:
    """Max abs difference of ONNX Runtime vs torch shopper embeddings over random left-padded histories.

    One batch per (batch size, length), ``lengths`` defaulting to (1, 3, max_len); every batch of more
    than one row starts with an all-padding row. A non-finite output on either side gives ``inf``.
    """
    encode = onnx_encoder(onnx_bytes)
    rng = np.random.default_rng(seed)
    lengths = (1, 3, max_len(model)) if lengths is None else lengths
    worst = 0.0
    with _eval_mode(model):
        vocab_size = model.item_embeddings().shape[0]
        for batch in batch_sizes:
            for length in lengths:
                histories = random_histories(rng, batch, length, vocab_size)
                if batch > 1:
                    histories[0] = PAD  # a shopper with no history
                gaps = random_gaps(rng, histories)
                expected = (
                    _Encoder(model)(torch.from_numpy(histories), torch.from_numpy(gaps)).float().numpy()
                )
                diff = float(np.max(np.abs(encode(histories, gaps) - expected)))
                if not math.isfinite(diff):  # max() would silently drop a NaN
                    return math.inf
                worst = max(worst, diff)
    return worst
