"""Compare baselines and trained checkpoints on the evaluation protocol; print one table.

    python -m training.evaluate                                   # baselines on Complete Journey
    python -m training.evaluate 'checkpoints=[outputs/.../best.ckpt]' data.cutoff=2017-11-01
    python -m training.evaluate 'bundles=[artifacts/bundle]'      # the exported bundle, as served
    python -m training.evaluate 'bundles=[artifacts/bundle]' new_to_you=true   # its "new to you" lists

A bundle is evaluated through :class:`serving.Recommender` itself (ONNX Runtime, FAISS, the repeat-aware
scorer given each history's purchase times), so its figures are what production would answer.

``new_to_you=true`` judges "new to you" lists instead: every method recommends only products the
household never bought (``Rules(exclude_purchased=True)``), targets keep only such products (households
left without one are dropped), so Recall@k is the explore recall; the reference of the paired
differences is popularity among unbought rather than decayed frequency.

Writes ``results.json`` and ``results.csv`` to the run's output directory.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Container
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig

from recsys.bundle import read_manifest
from recsys.data.sequences import product_histories
from recsys.data.split import parse_cutoff
from recsys.evaluation.metrics import EMPTY, paired_difference, shopper_metrics
from recsys.evaluation.protocol import (
    UNBOUGHT_POPULARITY,
    EvaluationData,
    baseline_rankings,
    evaluate,
    evaluated_histories,
    new_product_targets,
    new_to_you_rankings,
)
from recsys.io import atomic_path, write_json
from recsys.rules import Rules
from serving.recommender import Recommender
from training.datamodule import ReceiptsDataModule
from training.module import load_module, recommend

log = logging.getLogger(__name__)

COLUMNS = (
    "recall@10",
    "ndcg@10",
    "hr@10",
    "recall@10_repeat",
    "recall@10_explore",
    "recall@20",
    "mrr@10",
    "coverage@10",
    "all_items/recall@10",
)


# key prefixes of the paired differences: to decayed frequency, or (new_to_you) to popularity among unbought
VS_DECAY, VS_UNBOUGHT = "vs_decay", "vs_unbought"


def paired_cell(metrics: dict[str, float], metric: str, prefix: str = VS_DECAY) -> str:
    """``metric``'s paired difference to the reference (``prefix``) and its 95% interval, as one cell."""
    key = f"{prefix}/{metric}"
    return f"{metrics[key]:+.4f} [{metrics[key + '_low']:+.4f}, {metrics[key + '_high']:+.4f}]"


def format_table(results: dict[str, dict[str, float]], columns: tuple[str, ...] = COLUMNS) -> str:
    """A Markdown table, one row per method, with the paired difference to the reference (95% CI)."""
    first = next(iter(results.values()), {})
    prefix = VS_UNBOUGHT if f"{VS_UNBOUGHT}/recall@10" in first else VS_DECAY
    paired = [c for c in ("recall@10", "ndcg@10") if f"{prefix}/{c}" in first]
    against = "popularity among unbought" if prefix == VS_UNBOUGHT else "decay"
    header = [*columns, *(f"Δ{c} vs {against} [95% CI]" for c in paired)]
    lines = ["| method | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for name, metrics in results.items():
        cells = [f"{metrics[c]:.4f}" if c in metrics else "" for c in columns]
        cells += [paired_cell(metrics, c, prefix) for c in paired]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(path: Path, results: dict[str, dict[str, float]]) -> None:
    keys = sorted({key for metrics in results.values() for key in metrics})
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", *keys])
        for name, metrics in results.items():
            writer.writerow([name, *(metrics.get(key, "") for key in keys)])


def refuse_later_training(trained: Any, data: EvaluationData, what: str) -> None:
    """Raise ValueError when ``what`` was trained on receipts past ``data``'s cutoff: its test figures
    would score purchases it learned from. ``trained`` is the protocol the model stored (a checkpoint's
    ``data`` hyperparameters, a bundle's ``training.data``): a cutoff without an offset is read in its
    ``timezone``, else in the split's own zone; one without a cutoff cannot be checked (a warning)."""
    cutoff = trained.get("cutoff") if isinstance(trained, dict) else None
    if not isinstance(cutoff, str):
        log.warning("%s does not say where its training receipts end: cannot check for leakage", what)
        return
    zone = trained.get("timezone")
    try:  # read as the data module reads its cutoff; with no stored zone, in the split's
        moment = parse_cutoff(cutoff, zone) if isinstance(zone, str) else datetime.fromisoformat(cutoff)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=data.cutoff.tzinfo)
    except (ValueError, KeyError) as error:  # ZoneInfo refuses keys that are paths, or unknown
        raise ValueError(
            f"{what} stores an unreadable training cutoff or timezone: {cutoff!r}, {zone!r}"
        ) from error
    if moment > data.cutoff:
        raise ValueError(
            f"{what} was trained on receipts up to {moment.isoformat()}, after this test split's cutoff "
            f"{data.cutoff.isoformat()}: its figures would score purchases it learned from. Evaluate it at "
            "data.cutoff on or after its own, or train one at this cutoff"
        )


def bundle_protocol(path: str | Path) -> Any:
    """The data protocol the bundle at ``path`` says its model was trained under (None if it does not)."""
    training = read_manifest(path).get("training")
    return training.get("data") if isinstance(training, dict) else None


def bundle_rankings(
    path: str,
    data: EvaluationData,
    k: int,
    batch_size: int = 256,
    last: int | None = None,
    exclude_purchased: bool = False,
) -> np.ndarray:
    """Ranked product ids [n, k] (``EMPTY``-padded) that the bundle at ``path`` serves to ``data``'s
    evaluated shoppers, given their whole training history with purchase times, or only its most recent
    ``last`` entries (what a caller held to a history limit would send); ``exclude_purchased``: their
    "new to you" lists."""
    if last is not None and last < 1:
        raise ValueError(f"last must be >= 1 history entries, got {last}")
    threads = os.cpu_count() or 1
    recommender = Recommender.load(path, intra_op_threads=threads, search_threads=threads)
    products, seconds = product_histories(data.train, data.targets.shopper_ids)
    if last is not None:
        products, seconds = [p[-last:] for p in products], [s[-last:] for s in seconds]
    ranked = np.full((len(products), k), EMPTY, dtype=np.int64)
    for first in range(0, len(products), batch_size):
        span = range(first, min(first + batch_size, len(products)))
        results = recommender.recommend_batch(
            [products[i] for i in span],
            Rules(k=k, exclude_purchased=exclude_purchased),
            timestamps=[seconds[i] for i in span],
        )
        for i, result in zip(span, results, strict=True):
            ranked[i, : len(result.product_ids)] = result.product_ids
    return ranked


def _name(kind: str, short: str, path: str, taken: Container[str]) -> str:
    """``kind (short)``, or ``kind (path)`` when another input already has that name (two bundles both
    called ``bundle``): one input's figures never overwrite another's."""
    for name in (f"{kind} ({short})", f"{kind} ({path})"):
        if name not in taken:
            return name
    raise ValueError(f"{path} is given twice")


def run(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Metrics of every baseline and checkpoint on the test split of ``cfg.data`` (of its "new to you"
    lists with ``cfg.new_to_you``)."""
    datamodule: ReceiptsDataModule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("test")
    data = datamodule.test_data
    if data is None:
        raise RuntimeError("the data module prepared no test split")
    ks = tuple(cfg.ks)
    new = cfg.new_to_you
    if not isinstance(new, bool):
        raise ValueError(f"new_to_you must be true or false, got {new!r}")
    if new:
        data = new_product_targets(data)
        rankings = new_to_you_rankings(data, max(ks))
        reference, prefix = UNBOUGHT_POPULARITY, VS_UNBOUGHT
    else:
        rankings = baseline_rankings(data, max(ks), cfg.half_life_days, cfg.knn_neighbours)
        reference, prefix = f"personal_frequency_decay_{cfg.half_life_days:g}d", VS_DECAY
    for path in cfg.checkpoints:
        module = load_module(path)
        refuse_later_training(module.hparams.get("data"), data, f"checkpoint {path}")
        kind = module.model.__class__.__name__.lower()
        name = _name(kind, Path(path).parent.parent.name, path, rankings)
        # the network alone: the repeat-aware ranking is the bundle's (bundles=[...])
        histories = evaluated_histories(data, module.vocab)
        rules = Rules(k=max(ks), exclude_purchased=new, repeat_aware=False)
        rankings[name] = recommend(module, histories, rules)
    for path in cfg.bundles:
        refuse_later_training(bundle_protocol(path), data, f"bundle {path}")
        name = _name("bundle", Path(path).name, path, rankings)
        rankings[name] = bundle_rankings(path, data, max(ks), exclude_purchased=new)
    results = {name: evaluate(ranked, data, ks) for name, ranked in rankings.items()}
    for name, ranked in rankings.items():
        results[name] |= paired_against(ranked, rankings[reference], data, min(ks), prefix)
    return results


def paired_against(
    ranked: np.ndarray, reference: np.ndarray, data: EvaluationData, k: int, prefix: str = VS_DECAY
) -> dict[str, float]:
    """The per-household difference of ``ranked`` minus ``reference`` (the decayed-frequency baseline,
    or another named by ``prefix``), mean and 95% interval, for Recall@k and NDCG@k:
    ``<prefix>/<metric>`` and ``..._low`` / ``_high``."""
    ours = shopper_metrics(ranked, data.targets.items, k)
    theirs = shopper_metrics(reference, data.targets.items, k)
    out = {}
    for metric in (f"recall@{k}", f"ndcg@{k}"):
        mean, low, high = paired_difference(ours[metric], theirs[metric])
        out |= {f"{prefix}/{metric}": mean, f"{prefix}/{metric}_low": low, f"{prefix}/{metric}_high": high}
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    results = run(cfg)
    out = Path(cfg.paths.output_dir)
    write_json(out / "results.json", results)
    write_csv(out / "results.csv", results)
    shoppers = int(next(iter(results.values()))["num_shoppers"])
    lists = ' "new to you" lists (products never bought),' if cfg.new_to_you else ""
    print(f"\nNext-basket evaluation,{lists} {shoppers} shoppers, cutoff {cfg.data.cutoff}:\n")
    print(format_table(results))
    print(f"\nwritten: {out / 'results.json'}, {out / 'results.csv'}")


if __name__ == "__main__":
    main()
