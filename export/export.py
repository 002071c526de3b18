"""Export a training checkpoint as a serving bundle (``recsys.bundle``).

    python -m export.export checkpoint=artifacts/demo/train/checkpoints/best.ckpt output=artifacts/bundle
    python -m export.export checkpoint=... output=... index=hnsw index.ef_search=256 overwrite=true
    python -m export.export checkpoint=... output=... allow_unfinished=true   # a run killed before its scorer

Nothing is written unless the export passes its checks: ONNX Runtime vs torch shopper embeddings within
``PARITY_TOLERANCE``, and for an exact index, top-10 of the index on ONNX embeddings = torch's top-10.
The index's recall@10 against exact search is measured and recorded in the manifest. The products'
metadata is the one the checkpoint kept from its training data (none if that data had none). A checkpoint
whose run was to fit a repeat-aware scorer but stopped before it is refused: its bundle would rank by the
network alone, a fraction of the quality; ``allow_unfinished=true`` exports it anyway, with a warning.

``quantize=int8`` stores the encoder with int8 weight products (:func:`export.onnx.quantize_int8`), after
the fp32 graph passed its checks. Its own parity is recorded in the manifest (``quantization``: max abs
difference from torch, and how much of the fp32 graph's exact top-10 it keeps on the export's queries).
``quantize=auto`` (the command's default) also measures both encoders through serving on the validation
window of ``evaluation_data`` (the window before the protocol's cutoff, never its test split) and keeps
int8 only when it costs less than ``max_ndcg_cost`` relative NDCG@10; the figures of both, with a paired
interval, and the choice are in the manifest's ``quantization``.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import faiss
import hydra
import numpy as np
import pyarrow as pa
import torch
from omegaconf import DictConfig

from export.index import describe_index, index_recall
from export.onnx import (
    PARITY_TOLERANCE,
    QUANTIZATIONS,
    ExportError,
    export_encoder,
    max_len,
    onnx_encoder,
    parity,
    quantize_int8,
    random_gaps,
    random_histories,
    takes_gaps,
)
from recsys.bundle import BundleError, sha256_file, write_bundle
from recsys.data.vocabulary import PRODUCTS, Vocabulary, to_indices
from recsys.evaluation.metrics import paired_difference, shopper_metrics
from recsys.evaluation.protocol import EvaluationData, evaluate
from training import checkpoint as checkpoints
from training.datamodule import ReceiptsDataModule
from training.evaluate import bundle_rankings
from training.module import NextItemModule, module_from_checkpoint

log = logging.getLogger(__name__)

K = 10
NUM_QUERIES = 1000  # shopper embeddings the index's recall is measured on
NUM_TOP_K_CHECKS = 64  # of those, histories whose top-K is compared with torch (scores are [n, V])
TIE_TOLERANCE = 1e-5  # torch scores this close count as a tie, whose order the check ignores
MAX_METRICS_BYTES = 1 << 20  # a run's metrics.json, copied into the manifest
MAX_NDCG_COST = 0.005  # quantize=auto keeps int8 below this relative NDCG@10 cost


def item_vectors(module: NextItemModule) -> np.ndarray:
    """[N, d] float32 product embeddings, one per item row."""
    with torch.no_grad():
        return np.ascontiguousarray(module.model.item_embeddings()[PRODUCTS].float().numpy())


def items_table(vocab: Vocabulary, metadata: pa.Table | None = None) -> pa.Table:
    """Bundle rows in vocabulary order: product_id, popularity, then ``metadata``'s other columns.

    ``metadata`` is the checkpoint's (``recsys.data.features.product_metadata``: one row per vocabulary
    product, in vocabulary order).
    """
    items = pa.table(
        {
            "product_id": pa.array(vocab.product_ids, pa.int64()),
            "popularity": pa.array(vocab.popularity, pa.int64()),
        }
    )
    if metadata is None:
        return items
    if not np.array_equal(metadata.column("product_id").to_numpy(), vocab.product_ids):
        raise ExportError("the checkpoint's product metadata does not follow its vocabulary")
    extra = metadata.drop_columns(["product_id"])
    clash = set(extra.column_names) & set(items.column_names)
    if clash:
        raise ExportError(f"product metadata column(s) {sorted(clash)} clash with the bundle's own")
    for name, column in zip(extra.column_names, extra.columns, strict=True):
        items = items.append_column(name, column)
    return items


def check_top_k(
    module: NextItemModule, index: faiss.Index, histories: np.ndarray, gaps: np.ndarray, shoppers: np.ndarray
) -> None:
    """Top-K of ``index`` searched with the ONNX ``shoppers`` embeddings = torch's ranking of ``histories``
    (with their ``gaps``).

    Compared by torch score at each rank, so two items in an exact tie may come in either order.
    """
    k = min(K, index.ntotal)
    _, found = index.search(shoppers, k)
    item_ids, item_gaps = torch.from_numpy(histories), torch.from_numpy(gaps)
    expected = module.top_k(item_ids, k, item_gaps)[0].numpy()
    with torch.no_grad():
        shopper = module.model.encode(item_ids, item_gaps)
        scores = (shopper @ module.model.item_embeddings()[PRODUCTS].T).float().numpy()  # [n, N]
    got = np.take_along_axis(scores, found.clip(0), 1)
    want = np.take_along_axis(scores, expected, 1)
    wrong = np.flatnonzero((found < 0).any(axis=1) | (np.abs(got - want) > TIE_TOLERANCE).any(axis=1))
    if len(wrong):
        bad = wrong[0]
        raise ExportError(
            f"top-{k} of the index differs from torch for {len(wrong)} of {len(histories)} histories, e.g. "
            f"{histories[bad].tolist()}: item rows {found[bad].tolist()} vs {expected[bad].tolist()}"
        )


def top_k_agreement(vectors: np.ndarray, reference: np.ndarray, other: np.ndarray, k: int) -> float:
    """Mean share of each shopper's exact top-``k`` items under ``reference`` embeddings [n, d] that
    ``other`` embeddings [n, d] also rank in their top-``k``, over item ``vectors`` [N, d]."""
    k = min(k, len(vectors))
    tops = [np.argpartition(-(e @ vectors.T), k - 1, axis=1)[:, :k] for e in (reference, other)]
    shared = [len(np.intersect1d(a, b)) for a, b in zip(*tops, strict=True)]
    return float(np.mean(shared)) / k


def training_metrics(checkpoint: Path) -> dict[str, Any] | None:
    """``metrics.json`` of the training run, beside the checkpoint or in its run dir (<run>/checkpoints/),
    without the file paths it records (a bundle's manifest is shown to clients)."""
    for directory in (checkpoint.parent, checkpoint.parent.parent):
        path = directory / "metrics.json"
        if path.is_file() and path.stat().st_size <= MAX_METRICS_BYTES:
            metrics = json.loads(path.read_text())
            return (
                {k: v for k, v in metrics.items() if k != "best_checkpoint"}
                if isinstance(metrics, dict)
                else None
            )
    return None


def export_bundle(
    checkpoint: str | Path,
    output: str | Path,
    index_builder: Callable[[np.ndarray], faiss.Index],
    overwrite: bool = False,
    seed: int = 0,
    allow_unfinished: bool = False,
    quantize: str = "none",
    evaluation: EvaluationData | None = None,
    max_ndcg_cost: float = MAX_NDCG_COST,
) -> Path:
    """Export ``checkpoint`` as a bundle at ``output`` and return its path.

    ``index_builder`` maps item vectors [N, d] to a filled inner-product index (``export.index``);
    ``quantize`` is one of :data:`export.onnx.QUANTIZATIONS`: ``auto`` keeps the int8 encoder only when
    its relative NDCG@10 cost on ``evaluation`` (next-basket data the bundle is served on, e.g. a
    validation window) is below ``max_ndcg_cost``; with ``int8``, an ``evaluation`` is measured and
    recorded too. Raises ``ExportError`` when a check fails or the checkpoint's run did not finish (unless
    ``allow_unfinished``), ``BundleError`` when ``output`` exists and ``overwrite`` is false,
    ``ValueError`` for an unknown ``quantize`` or ``auto`` without ``evaluation``.
    """
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {list(QUANTIZATIONS)}, got {quantize!r}")
    if quantize == "auto" and evaluation is None:
        raise ValueError("quantize=auto needs evaluation data to measure the int8 encoder's cost on")
    checkpoint, output = Path(checkpoint), Path(output)
    # write_bundle refuses too, but only after all the work below
    if output.exists() and not overwrite:
        raise BundleError(f"{output} already exists; pass overwrite=True to replace it")
    state = checkpoints.read(checkpoint)
    scorer = checkpoints.scorer(state)
    if scorer is None and checkpoints.expects_scorer(state):
        message = (
            f"{checkpoint} comes from a run that stopped before fitting its repeat-aware scorer: its bundle "
            "would rank by the network alone"
        )
        if not allow_unfinished:
            raise ExportError(f"{message}; finish the run, or pass allow_unfinished=true to export it anyway")
        log.warning("%s (exported anyway: allow_unfinished=true)", message)
    module = module_from_checkpoint(state)
    model, vocab = module.model, module.vocab
    items = items_table(vocab, module.products)

    # The encoder first: its export and parity check take seconds, the index build can take minutes.
    onnx_bytes = export_encoder(model)
    max_abs_diff = parity(model, onnx_bytes, seed=seed)
    log.info("ONNX parity: max abs diff %.2e", max_abs_diff)
    if max_abs_diff > PARITY_TOLERANCE:
        raise ExportError(
            f"ONNX and torch shopper embeddings differ by {max_abs_diff:.3g} > {PARITY_TOLERANCE}"
        )

    vectors = item_vectors(module)
    start = time.perf_counter()
    index = index_builder(vectors)
    if index.metric_type != faiss.METRIC_INNER_PRODUCT or index.ntotal != len(vectors):
        raise ExportError(f"the index builder must index all {len(vectors)} items by inner product")
    description = describe_index(index)
    log.info(
        "%s index of %d items built in %.1f s", description["type"], index.ntotal, time.perf_counter() - start
    )

    # Queries: the exported encoder's embeddings of histories drawn by product popularity, a stand-in
    # for real shoppers that needs no receipts at export time.
    weights = np.zeros(vocab.size)
    weights[to_indices(np.arange(vocab.num_products))] = vocab.popularity / vocab.popularity.sum()
    rng = np.random.default_rng(seed)
    histories = random_histories(rng, NUM_QUERIES, max_len(model), vocab.size, weights)
    gaps = random_gaps(rng, histories)
    shoppers = onnx_encoder(onnx_bytes)(histories, gaps)
    if description["type"] == "Flat":
        n = NUM_TOP_K_CHECKS
        check_top_k(module, index, histories[:n], gaps[:n], shoppers[:n])
    quantization: dict[str, Any] | None = None
    int8_bytes = b""
    if quantize != "none":
        int8_bytes = quantize_int8(onnx_bytes)
        quantized = onnx_encoder(int8_bytes)(histories, gaps)
        quantization = {
            "method": "int8-dynamic",  # onnxruntime.quantization.quantize_dynamic, weight products only
            "max_abs_diff": parity(model, int8_bytes, seed=seed),
            f"top_{K}_agreement": top_k_agreement(vectors, shoppers, quantized, K),
        }
        if not math.isfinite(quantization["max_abs_diff"]):
            raise ExportError("the int8 encoder gives non-finite shopper embeddings; export quantize=none")
        log.info("int8 encoder: %s", quantization)

    def bundle(path: Path, graph: bytes, replace: bool = overwrite) -> Path:
        """The bundle of ``graph`` at ``path``, with the manifest as it stands when called."""
        return write_bundle(
            path, graph, items, index, manifest, overwrite=replace, repeat=scorer, time_gaps=takes_gaps(model)
        )

    manifest = {
        "model": {"name": type(model).__name__, "config": dict(module.hparams["net"])},
        "max_len": max_len(model),
        "embedding_dim": int(vectors.shape[1]),
        "vocab_size": vocab.size,
        "training": {"metrics": training_metrics(checkpoint), "data": module.hparams.get("data")},
        "parity": {"max_abs_diff": max_abs_diff, "tolerance": PARITY_TOLERANCE},
        # the checkpoint's name and digest, not its path: a bundle's manifest is shown to clients
        "source": {"checkpoint": checkpoint.name, "sha256": sha256_file(checkpoint)},
    }
    if quantization is not None:
        if evaluation is not None:
            graphs = {"fp32": onnx_bytes, "int8": int8_bytes}
            quantization["evaluation"] = quantization_cost(bundle, graphs, evaluation, output.parent)
            quantization["evaluation"]["max_relative_ndcg_cost"] = max_ndcg_cost
        cost = quantization.get("evaluation", {}).get("relative_ndcg_cost")
        quantization["kept"] = quantize == "int8" or cost < max_ndcg_cost
        if quantization["kept"]:
            onnx_bytes, shoppers = int8_bytes, quantized  # the index's recall: on what the bundle computes
        else:
            log.warning(
                "int8 encoder not kept: it costs %.3g relative NDCG@%d (bar %.3g)", cost, K, max_ndcg_cost
            )
        manifest["quantization"] = quantization
    recall = index_recall(index, vectors, shoppers, K)
    log.info("index recall@%d vs exact search: %.4f", K, recall)
    manifest["index"] = {**description, f"recall_at_{K}": recall}
    log.info("repeat-aware scorer: %s", "included" if scorer is not None else "none in the checkpoint")
    return bundle(output, onnx_bytes)


def quantization_cost(
    bundle: Callable[[Path, bytes, bool], Path],
    graphs: dict[str, bytes],
    data: EvaluationData,
    scratch: Path,
) -> dict[str, Any]:
    """Recall@10 and NDCG@10 through serving of the bundle written (by ``bundle``) with each encoder of
    ``graphs`` (``fp32``, ``int8``) on ``data``, the per-shopper NDCG@10 difference int8 - fp32 (mean and
    95% interval), and the relative NDCG@10 cost of int8."""
    figures: dict[str, Any] = {"cutoff": data.cutoff.isoformat(), "shoppers": len(data.targets.shopper_ids)}
    per_shopper = {}
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".caddie-quantization-", dir=scratch) as directory:
        for name, graph in graphs.items():
            path = bundle(Path(directory) / name, graph, False)
            ranked = bundle_rankings(str(path), data, K)
            metrics = evaluate(ranked, data, (K,))
            figures[name] = {f"recall@{K}": metrics[f"recall@{K}"], f"ndcg@{K}": metrics[f"ndcg@{K}"]}
            per_shopper[name] = shopper_metrics(ranked, data.targets.items, K)[f"ndcg@{K}"]
    mean, low, high = paired_difference(per_shopper["int8"], per_shopper["fp32"])
    figures[f"ndcg@{K}_difference"] = {"mean": float(mean), "low": float(low), "high": float(high)}
    fp32 = figures["fp32"][f"ndcg@{K}"]
    figures["relative_ndcg_cost"] = (fp32 - figures["int8"][f"ndcg@{K}"]) / fp32 if fp32 > 0 else 0.0
    log.info("int8 encoder through serving on %d shoppers: %s", figures["shoppers"], figures)
    return figures


TRAINING_SPLIT = ("cutoff", "timezone", "min_baskets", "val_days", "horizon_days")  # of a checkpoint's data


def validation_data(cfg: DictConfig, checkpoint: str | Path) -> EvaluationData:
    """The validation window of ``cfg`` (a data config) split as ``checkpoint``'s training data was (its
    cutoff, zone, vocabulary and validation days, where the checkpoint records them): the ``val_days``
    before that cutoff, with histories before them, so the int8 choice never sees the model's test split."""
    trained = checkpoints.read(checkpoint).get("hyper_parameters", {}).get("data") or {}
    if not isinstance(trained, dict):
        raise ExportError(f"{checkpoint}: its training data description is not a mapping")
    split = {key: trained[key] for key in TRAINING_SPLIT if key in trained and key in cfg}
    for key, value in split.items():
        # plain values only: a mapping here would reach hydra.utils.instantiate, which runs a `_target_`
        if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
            raise ExportError(
                f"{checkpoint}: its training data's {key!r} is not a plain value: {value!r:.80}"
            )
    if isinstance(split.get("cutoff"), str) and split.get("timezone"):
        try:
            moment = datetime.fromisoformat(split["cutoff"])
            if moment.tzinfo is not None:  # a recorded offset: the zone's wall clock, as training split it
                local = moment.astimezone(ZoneInfo(str(split["timezone"]))).replace(tzinfo=None)
                split["cutoff"] = local.isoformat()
        except (ValueError, KeyError) as error:  # ZoneInfo refuses keys that are paths
            raise ExportError(
                f"{checkpoint}: its training data's cutoff or timezone is unreadable: {error}"
            ) from error
    datamodule: ReceiptsDataModule = hydra.utils.instantiate(cfg, **split)
    datamodule.setup("fit")
    if datamodule.val_data is None:
        raise ExportError("quantize=auto needs a validation window: evaluation_data.val_days must be > 0")
    return datamodule.val_data


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    # torch.onnx's optimiser passes log every rewrite at INFO, which Hydra's root logger would print
    for name in ("onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.WARNING)
    measured = cfg.quantize != "none" and cfg.get("evaluation_data") is not None
    path = export_bundle(
        cfg.checkpoint,
        cfg.output,
        hydra.utils.instantiate(cfg.index),
        overwrite=cfg.overwrite,
        seed=cfg.seed,
        allow_unfinished=cfg.allow_unfinished,
        quantize=cfg.quantize,
        evaluation=validation_data(cfg.evaluation_data, cfg.checkpoint) if measured else None,
        max_ndcg_cost=cfg.max_ndcg_cost,
    )
    log.info("bundle written to %s", path)


if __name__ == "__main__":
    main()
