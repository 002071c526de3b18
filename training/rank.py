"""Fit the ranker (:mod:`recsys.ranker`) of a trained model and keep it in the checkpoint.

    python -m training.rank checkpoint=outputs/train/<run>/checkpoints/best.ckpt   # refit on a checkpoint
    python -m training.rank checkpoint=... output=other.ckpt ranker.num_leaves=31  # into a copy

``train(cfg)`` calls :func:`fit_and_test` after the network. Labels come from stacked internal cutoffs
that end before the validation window: at each cutoff ``val_cutoff - j * spacing_days`` (``j = 1 ..
cutoffs``) every shopper's history before it is ranked and its first basket from it up to the
validation cutoff is the label, with item statistics of the data before that cutoff only. The number of
boosting rounds is selected on the validation split (its log-loss), never on the test split; the
deployed ranker reads item statistics of all training data. LightGBM runs with ``deterministic=true``,
a fixed thread count and the config's seed, so a fit is a function of its data and config.

The network was trained on receipts up to the validation cutoff, so the internal cutoffs' labels were in
its training data: a network trained long enough to remember them hands the ranker features that are
better at those cutoffs than they can be at validation, test or serving (docs/results.md, "The GPU
network"). With ``ranker.cutoff_network`` the internal cutoffs read a second network instead, of the
same config and vocabulary, trained for as many epochs on the receipts before the earliest internal
cutoff alone (``training.train`` fits it; :func:`fit` takes it as ``cutoff_module``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import hydra
import lightgbm
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from omegaconf import DictConfig, OmegaConf

from recsys.calibration import reliability
from recsys.candidate_sources import SOURCES
from recsys.data.features import product_metadata
from recsys.data.sequences import build_sequences
from recsys.data.split import next_basket_targets, temporal_split
from recsys.data.vocabulary import Vocabulary
from recsys.evaluation.metrics import shopper_metrics
from recsys.evaluation.protocol import EvaluationData, evaluate, evaluated_histories, prepare
from recsys.inputs import Histories, pair_member
from recsys.io import write_json
from recsys.rank_features import NETWORK, ItemStats, feature_names, features, item_statistics
from recsys.ranker import Ranker, per_shopper
from recsys.rules import Rules
from recsys.scoring import select
from training import checkpoint as checkpoints
from training.datamodule import ReceiptsDataModule
from training.module import NextItemModule, load_module, module_from_checkpoint, recommend, search

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankerConfig:
    """``conf/ranker/*.yaml``: the candidate sources, the internal cutoffs and LightGBM's settings."""

    new_candidates: int = 50  # the network's best new products per shopper
    history_candidates: int = 100  # history products per shopper, most bought (90-day decay) first; 0: all
    co_purchase_candidates: int = 0  # new co-purchase neighbours of the recent baskets per shopper
    category_candidates: int = 0  # new popular products of the shopper's categories per shopper
    neighbours: int = 20  # co-purchase neighbours kept per product (0: no co-purchase features)
    co_purchase_baskets: int = 20  # each shopper's most recent baskets counted for co-purchase
    categories: tuple[str, ...] = ("product_category", "product_type")  # metadata columns, coarse first
    exclude: tuple[str, ...] = ()  # feature names left out (ablations), e.g. the network's
    # lists ordered by probability x basket-size factor with this many prior baskets; null: by probability
    size_prior: float | None = 1.0
    cutoffs: int = 8
    spacing_days: float = 14.0
    negative_rate: float = 0.3  # share of the stacked negatives kept (weighted back: calibration holds)
    learning_rate: float = 0.05
    num_leaves: int = 63
    min_data_in_leaf: int = 200
    feature_fraction: float = 0.8
    lambda_l2: float = 1.0
    max_rounds: int = 600
    early_stopping_rounds: int = 40
    num_threads: int = 2
    seed: int = 0
    # the internal cutoffs read a network trained before the earliest of them, not the deployed one
    cutoff_network: bool = False

    @classmethod
    def from_config(cls, cfg: DictConfig | dict[str, Any] | None) -> RankerConfig:
        """From a Hydra node (plain keys; unknown keys are an error naming them)."""
        values = (
            {}
            if cfg is None
            else OmegaConf.to_container(cfg, resolve=True)
            if isinstance(cfg, DictConfig)
            else dict(cfg)
        )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ranker setting(s) {unknown}; known: {sorted(known)}")
        for key in ("categories", "exclude"):
            if key in values:
                values[key] = tuple(values[key])
        # a string such as "false" would be truthy: a switch must be a YAML boolean
        flags = [f.name for f in fields(cls) if isinstance(f.default, bool)]
        wrong = sorted(k for k in flags if k in values and not isinstance(values[k], bool))
        if wrong:
            raise ValueError(f"ranker setting(s) {wrong} must be true or false")
        return cls(**values)


def category_codes(products: pa.Table | None, vocab: Vocabulary, columns: tuple[str, ...]) -> np.ndarray:
    """[N, L] int64 codes of each vocabulary product's category in ``columns`` of its metadata (-1 for
    unknown); the levels whose column the metadata lacks are left out (none without metadata)."""
    present = [] if products is None else [c for c in columns if c in products.column_names]
    if products is not None and len(present) < len(columns):
        log.warning("ranker: product metadata lacks %s", sorted(set(columns) - set(present)))
    if products is None:
        return np.zeros((vocab.num_products, 0), dtype=np.int64)
    if not np.array_equal(products.column("product_id").to_numpy(), vocab.product_ids):
        raise ValueError("product metadata rows must be the vocabulary's products, in its order")
    codes = []
    for column in present:
        encoded = pc.dictionary_encode(products.column(column)).combine_chunks()
        codes.append(pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64))
    return np.stack(codes, axis=1) if codes else np.zeros((vocab.num_products, 0), dtype=np.int64)


@dataclass
class _Examples:
    owner: np.ndarray
    rows: np.ndarray
    source: np.ndarray
    x: np.ndarray
    size_factor: np.ndarray
    labels: np.ndarray
    targets: int  # target products in the vocabulary, over all shoppers (the candidate recall's denominator)
    per_source: dict[str, int] = field(default_factory=dict)  # targets each source proposed


def _stats(train: pa.Table, vocab: Vocabulary, codes: np.ndarray, config: RankerConfig) -> ItemStats:
    everyone = Histories.from_sequences(build_sequences(train, vocab))
    return item_statistics(everyone, codes, config.neighbours, config.co_purchase_baskets)


def _examples(
    module: NextItemModule | None, data: EvaluationData, stats: ItemStats, config: RankerConfig
) -> _Examples:
    """Every candidate of ``data``'s evaluated shoppers, its features and whether it is in the target
    (``module`` None: no network, so no network candidates and its features missing)."""
    vocab = data.vocab if module is None else module.vocab
    histories = evaluated_histories(data, vocab)
    if module is None:
        rows = np.full((histories.num_shoppers, 0), -1, dtype=np.int64)
        scores = np.zeros(rows.shape, dtype=np.float32)
    else:
        wanted = min(
            vocab.num_products, config.new_candidates + int(histories.distinct_sizes().max(initial=0))
        )
        rows, scores = search(module, histories, max(wanted, 1))
    found = features(
        histories, rows, scores, stats, config.new_candidates, config.co_purchase_candidates,
        config.category_candidates, config.history_candidates, config.size_prior,
    )  # fmt: skip
    target_rows = [vocab.rows(items) for items in data.targets.items]
    target_owner = np.repeat(np.arange(len(target_rows)), [len(t) for t in target_rows])
    flat = np.concatenate(target_rows) if target_rows else np.zeros(0, np.int64)
    labels = pair_member(found.owner, found.rows, target_owner, flat)
    per_source = {name: int(labels[found.source == i].sum()) for i, name in enumerate(SOURCES)}
    return _Examples(
        found.owner, found.rows, found.source, found.x, found.size_factor, labels, int((flat >= 0).sum()),
        per_source,
    )  # fmt: skip


def first_internal_cutoff(val_cutoff: datetime, config: RankerConfig) -> datetime:
    """The earliest of the stacked training cutoffs (:func:`internal_cutoffs`)."""
    return val_cutoff - timedelta(days=config.cutoffs * config.spacing_days)


def internal_cutoffs(
    val: EvaluationData, config: RankerConfig, horizon: timedelta | None
) -> list[EvaluationData]:
    """The stacked training cutoffs: histories before ``val.cutoff - j * spacing_days``, labels from the
    first basket at or after it and before the validation cutoff (so nothing of validation is a label)."""
    found = []
    for j in range(1, config.cutoffs + 1):
        cutoff = val.cutoff - timedelta(days=j * config.spacing_days)
        before, after = temporal_split(val.train, cutoff)
        if before.num_rows == 0 or after.num_rows == 0:
            continue
        found.append(
            EvaluationData(cutoff, before, val.vocab, next_basket_targets(before, after, val.vocab, horizon))
        )
    if not found:
        raise ValueError(
            "no internal cutoff has receipts on both sides: lower ranker.spacing_days or cutoffs"
        )
    return found


def lightgbm_params(config: RankerConfig) -> dict[str, Any]:
    """LightGBM's parameters: a binary model (P(in the next basket)), deterministic for the seed."""
    return {
        "objective": "binary",
        "learning_rate": config.learning_rate,
        "num_leaves": config.num_leaves,
        "min_data_in_leaf": config.min_data_in_leaf,
        "feature_fraction": config.feature_fraction,
        "lambda_l2": config.lambda_l2,
        "num_threads": config.num_threads,
        "seed": config.seed,
        "deterministic": True,
        "force_row_wise": True,
        "verbosity": -1,
    }


def fit_booster(
    x: np.ndarray,
    labels: np.ndarray,
    names: list[str],
    config: RankerConfig,
    weights: np.ndarray | None = None,
    valid: tuple[np.ndarray, np.ndarray] | None = None,
) -> lightgbm.Booster:
    """A binary LightGBM model of ``labels`` from ``x`` (columns ``names``), with its number of rounds
    selected on ``valid`` (its log-loss) when given, else ``max_rounds``."""
    params = lightgbm_params(config)
    train = lightgbm.Dataset(
        x, labels.astype(np.float64), weight=weights, feature_name=names, free_raw_data=True
    )
    sets, callbacks = [], []
    if valid is not None:
        sets = [lightgbm.Dataset(valid[0], valid[1].astype(np.float64), reference=train, feature_name=names)]
        callbacks = [lightgbm.early_stopping(config.early_stopping_rounds, verbose=False)]
    booster = lightgbm.train(params, train, config.max_rounds, valid_sets=sets, callbacks=callbacks)
    return booster


def fit(
    module: NextItemModule | None,
    val: EvaluationData,
    deploy_train: pa.Table,
    products: pa.Table | None,
    config: RankerConfig,
    horizon: timedelta | None = None,
    cutoff_module: NextItemModule | None = None,
) -> tuple[Ranker, dict[str, Any]]:
    """A ranker fitted on ``val``'s internal cutoffs, its rounds selected on ``val``, carrying item
    statistics of the receipts ``deploy_train`` (what the deployed ranker reads); and a report (sizes,
    candidate recall per source, validation log-loss, reliability, feature importances, seconds).

    ``module`` None fits a ranker without a network (over ``val``'s vocabulary): it needs
    ``new_candidates=0``, and its network features are missing everywhere, so leave them out (``exclude``).
    ``cutoff_module`` (with ``config.cutoff_network``): the network the internal cutoffs read instead of
    ``module``, of its vocabulary, trained on nothing from the earliest internal cutoff on.
    """
    start = time.perf_counter()
    if module is None and config.new_candidates:
        raise ValueError("a ranker without a network has no network candidates: set new_candidates=0")
    if config.cutoff_network != (cutoff_module is not None) or (module is None and cutoff_module is not None):
        raise ValueError(
            "ranker.cutoff_network=true needs the cutoff network (training.train fits it; python -m "
            "training.rank takes cutoff_checkpoint=PATH), and a cutoff network needs "
            "ranker.cutoff_network=true"
        )
    vocab = val.vocab if module is None else module.vocab
    if cutoff_module is not None and not np.array_equal(cutoff_module.vocab.product_ids, vocab.product_ids):
        raise ValueError("the cutoff network's vocabulary is not the network's")
    codes = category_codes(products, vocab, config.categories)
    names = list(feature_names(codes.shape[1]))
    unknown = sorted(set(config.exclude) - set(names))
    if unknown:
        raise ValueError(f"ranker.exclude names unknown features {unknown}")
    used = [i for i, name in enumerate(names) if name not in config.exclude]
    rng = np.random.default_rng(config.seed)
    parts, weights = [], []
    reader = module if cutoff_module is None else cutoff_module  # the network the internal cutoffs read
    for data in internal_cutoffs(val, config, horizon):
        part = _examples(reader, data, _stats(data.train, vocab, codes, config), config)
        keep = part.labels | (rng.random(len(part.labels)) < config.negative_rate)
        parts.append((part.x[keep][:, used], part.labels[keep]))
        weights.append(np.where(part.labels[keep], 1.0, 1.0 / config.negative_rate))
        log.info(
            "ranker: cutoff %s, %d shoppers, %d candidates",
            data.cutoff.date(),
            len(data.targets.shopper_ids),
            len(part.labels),
        )
    x = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    validation = _examples(module, val, _stats(val.train, vocab, codes, config), config)
    booster = fit_booster(
        x,
        labels,
        [names[i] for i in used],
        config,
        np.concatenate(weights),
        (validation.x[:, used], validation.labels),
    )
    deployed = _stats(deploy_train, vocab, codes, config)
    ranker = Ranker(
        booster.model_to_string(),
        deployed,
        tuple(names[i] for i in used),
        config.new_candidates,
        config.co_purchase_candidates,
        config.category_candidates,
        config.history_candidates,
        config.size_prior,
    )
    predicted = ranker.probability(validation.x)
    lists = _validation_lists(validation, predicted, val, vocab)
    importance = booster.feature_importance("gain")
    report = {
        "rows": len(labels),
        "rounds": int(booster.best_iteration or booster.current_iteration()),
        "val_logloss": float(_logloss(predicted, validation.labels)),
        "val_candidate_recall": validation.labels.sum() / max(validation.targets, 1),
        "val_source_recall": {k: v / max(validation.targets, 1) for k, v in validation.per_source.items()},
        "val_candidates_per_shopper": len(validation.labels) / max(len(val.targets.shopper_ids), 1),
        **lists,
        "val_reliability": reliability(predicted, validation.labels),
        "importance": dict(
            sorted(
                zip(ranker.features, (importance / importance.sum()).round(4).tolist(), strict=True),
                key=lambda kv: -kv[1],
            )
        ),
        "seconds": round(time.perf_counter() - start, 1),
        "config": asdict(config),
    }
    return ranker, report


def fit_at(
    receipts: pa.Table,
    products: pa.Table | None,
    date: datetime,
    config: RankerConfig,
    val_days: float = 28.0,
    min_baskets: int = 5,
) -> tuple[Ranker, Vocabulary, dict[str, Any]]:
    """A ranker without a network, fitted on the receipts strictly before ``date`` alone: a vocabulary
    of the products in ``min_baskets`` baskets before its validation window (the last ``val_days``
    before ``date``), internal cutoffs before that window, and item statistics of everything before
    ``date``. What a model trained just before a campaign or a cutoff would know, and nothing after.
    ``config`` needs ``new_candidates=0``; its network features are left out whatever it says."""
    before, _ = temporal_split(receipts, date)
    val = prepare(before, date - timedelta(days=val_days), min_baskets)
    metadata = None if products is None else product_metadata(products, val.vocab.product_ids)
    config = replace(config, exclude=tuple(dict.fromkeys((*config.exclude, *NETWORK))))
    ranker, report = fit(None, val, before, metadata, config)
    return ranker, val.vocab, report


def _validation_lists(
    examples: _Examples, probability: np.ndarray, data: EvaluationData, vocab: Vocabulary, k: int = 10
) -> dict[str, float]:
    """Validation Recall@k and NDCG@k of the ranker's lists over its candidates (no popularity padding),
    as they are ordered (``val_recall@k``) and by probability alone (``..._by_probability``): what the
    basket-size order gives on this fit's own validation split."""
    rows, scores, order = per_shopper(
        examples.owner, examples.rows, probability, examples.size_factor, len(data.targets.shopper_ids)
    )
    targets = [vocab.rows(items) for items in data.targets.items]
    targets = [t[t >= 0] for t in targets]
    kept = np.array([len(t) > 0 for t in targets], dtype=bool)
    report = {}
    for suffix, keys in (("", order), ("_by_probability", None)):
        ranked, _ = select(rows, scores, k, order=keys)
        metrics = shopper_metrics(ranked[kept], [t for t, keep in zip(targets, kept, strict=True) if keep], k)
        for name in ("recall", "ndcg"):
            report[f"val_{name}@{k}{suffix}"] = float(metrics[f"{name}@{k}"].mean())
    return report


def _logloss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(np.where(y, np.log(p), np.log1p(-p))))


def fit_and_test(
    best_checkpoint: str,
    test_data: EvaluationData,
    val_data: EvaluationData,
    ks: tuple,
    config: RankerConfig | None = None,
    output: str | None = None,
    cutoff_checkpoint: str | None = None,
) -> dict:
    """Fit the checkpoint's ranker, store it in the checkpoint (or a copy at ``output``), return its test
    metrics (``test/repeat_aware/<metric>``, the protocol's, as serving ranks) and the fit's report
    (``ranker/...``). ``cutoff_checkpoint``: the cutoff network's (``ranker.cutoff_network``)."""
    config = config or RankerConfig()
    state = checkpoints.read(best_checkpoint)
    module = module_from_checkpoint(state)
    horizon = state["hyper_parameters"]["data"].get("horizon_days")
    cutoff_module = None if cutoff_checkpoint is None else load_module(cutoff_checkpoint)
    ranker, report = fit(
        module, val_data, test_data.train, checkpoints.products(state), config,
        timedelta(days=horizon) if horizon else None, cutoff_module,
    )  # fmt: skip
    checkpoints.write_scorer(output or best_checkpoint, ranker, state)
    ranked = recommend(module, evaluated_histories(test_data, module.vocab), Rules(k=max(ks)), ranker)
    metrics = evaluate(ranked, test_data, ks)
    log.info("ranker: %s", {k: v for k, v in report.items() if k not in ("config", "val_reliability")})
    flat = {f"ranker/{k}": v for k, v in report.items() if isinstance(v, int | float)}
    return {f"test/repeat_aware/{name}": float(value) for name, value in metrics.items()} | flat


@hydra.main(version_base="1.3", config_path="../conf", config_name="rank")
def main(cfg: DictConfig) -> dict:
    """Refit the ranker of ``cfg.checkpoint`` on the data it was trained on (``cfg.data`` must match the
    checkpoint's protocol)."""
    state = checkpoints.read(cfg.checkpoint)
    datamodule: ReceiptsDataModule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    trained = state["hyper_parameters"]["data"]
    for key, value in datamodule.describe().items():
        if key in ("cutoff", "val_days", "min_baskets", "horizon_days") and trained.get(key) != value:
            raise ValueError(f"data.{key} is {value!r}, the checkpoint was trained with {trained.get(key)!r}")
    if datamodule.val_data is None or datamodule.test_data is None:
        raise ValueError("the ranker needs a validation split (data.val_days > 0)")
    results = fit_and_test(
        cfg.checkpoint, datamodule.test_data, datamodule.val_data, tuple(cfg.ks),
        RankerConfig.from_config(cfg.ranker), cfg.get("output"), cfg.get("cutoff_checkpoint"),
    )  # fmt: skip
    write_json(Path(cfg.paths.output_dir) / "rank.json", results)
    log.info("results: %s", results)
    return results


if __name__ == "__main__":
    main()
