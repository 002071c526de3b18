"""Fit the repeat-aware scorer (:mod:`recsys.repeat`) of a trained model, and keep it in its checkpoint.

The scorer is fitted on the validation split only (histories before ``cutoff - val_days``, the next basket
after it), so test metrics stay honest. Deployed, it uses per-product statistics of all training data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from recsys.data.sequences import Sequences, build_sequences
from recsys.data.vocabulary import NUM_RESERVED
from recsys.evaluation.protocol import EvaluationData, evaluate
from recsys.io import atomic_path
from recsys.repeat import Histories, RepeatScorer, features, item_statistics
from recsys.scoring import pair_member, select
from training.module import NextItemModule, module_from_checkpoint, read_checkpoint

CHECKPOINT_KEY = "repeat_scorer"
NEW_CANDIDATES = 50  # the model's best new products per shopper the fit sees (serving searches more)
L2 = 1e-4


def search(
    module: NextItemModule, sequences: Sequences, wanted: int, batch_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """The model's best ``wanted`` item rows [n, w] and scores [n, w] (inner products) per shopper."""
    inputs, gaps = (torch.from_numpy(a) for a in sequences.model_inputs(module.model.config.max_len))
    tops = [
        module.top_k(inputs[start : start + batch_size], wanted, gaps[start : start + batch_size])
        for start in range(0, len(inputs), batch_size)
    ]
    rows = torch.cat([indices for indices, _ in tops]).numpy().astype(np.int64) - NUM_RESERVED
    return rows, torch.cat([scores for _, scores in tops]).numpy()


def fit(module: NextItemModule, val: EvaluationData, deploy_train: EvaluationData) -> RepeatScorer:
    """A scorer fitted on ``val``'s next baskets, carrying per-product statistics of ``deploy_train``."""
    vocab = module.vocab
    everyone = build_sequences(val.train, vocab)
    repeat_rate, popularity = item_statistics(Histories.from_sequences(everyone), vocab.num_products)
    sequences = everyone.select(val.targets.shopper_ids)
    histories = Histories.from_sequences(sequences)
    wanted = min(vocab.num_products, NEW_CANDIDATES + int(histories.distinct_sizes().max(initial=0)))
    rows, scores = search(module, sequences, wanted)
    # the fit sees each shopper's best NEW_CANDIDATES new products, however long the history
    bought = pair_member(np.arange(len(rows))[:, None], rows, histories.owner, histories.rows)
    scores[bought | (np.cumsum(~bought, axis=1) > NEW_CANDIDATES)] = np.nan
    owner, item_rows, x = features(histories, rows, scores, repeat_rate, popularity)
    target_rows = [vocab.encode(items) - NUM_RESERVED for items in val.targets.items]
    target_owner = np.repeat(np.arange(len(target_rows)), [len(t) for t in target_rows])
    labels = pair_member(owner, item_rows, target_owner, np.concatenate(target_rows))

    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    weights, bias = _logistic_regression((x - mean) / scale, labels)
    full = build_sequences(deploy_train.train, vocab)
    deploy_rate, _ = item_statistics(Histories.from_sequences(full), vocab.num_products)
    return RepeatScorer(weights, bias, mean, scale, deploy_rate, vocab.popularity)


def _logistic_regression(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Weights and bias minimising the mean log-loss + ``L2`` * |w|^2 (L-BFGS, float64)."""
    features = torch.from_numpy(x)
    labels = torch.from_numpy(y.astype(np.float64))
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(features @ w + b, labels)
        loss = loss + L2 * (w**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach().numpy().copy(), float(b.item())


def rank(
    module: NextItemModule, scorer: RepeatScorer, data: EvaluationData, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Repeat-aware top-``k`` product ids [n, k] (-1 for none) and scores of ``data``'s evaluated shoppers."""
    sequences = build_sequences(data.train, module.vocab).select(data.targets.shopper_ids)
    histories = Histories.from_sequences(sequences)
    wanted = min(module.vocab.num_products, k + int(histories.distinct_sizes().max(initial=0)))
    rows, scores = search(module, sequences, wanted)
    picked, picked_scores = select(*scorer.blend(histories, rows, scores, k), k)
    return module.vocab.decode(picked + NUM_RESERVED), picked_scores  # row -1 decodes to -1


def save(checkpoint: str | Path, scorer: RepeatScorer, state: dict | None = None) -> None:
    """Add ``scorer`` to a checkpoint (plain values, so it still loads with ``weights_only=True``).

    ``state`` is the checkpoint's dictionary if the caller has already read it (:func:`read_checkpoint`).
    """
    state = dict(read_checkpoint(checkpoint) if state is None else state)
    state[CHECKPOINT_KEY] = scorer.to_dict() | {"repeat_rate": scorer.repeat_rate.tolist()}
    with atomic_path(Path(checkpoint)) as tmp:
        torch.save(state, tmp)


def load(checkpoint: str | Path) -> RepeatScorer | None:
    """The scorer kept in a checkpoint, or None if it has none."""
    return from_checkpoint(read_checkpoint(checkpoint))


def from_checkpoint(state: dict) -> RepeatScorer | None:
    """The scorer of a loaded checkpoint dictionary, or None."""
    data = state.get(CHECKPOINT_KEY)
    if data is None:
        return None
    popularity = np.asarray(state["hyper_parameters"]["vocab"]["popularity"], dtype=np.float64)
    return RepeatScorer.from_dict(data, np.asarray(data["repeat_rate"]), popularity)


def fit_and_test(
    best_checkpoint: str, test_data: EvaluationData, val_data: EvaluationData, ks: tuple
) -> dict:
    """Fit the best checkpoint's scorer on validation, store it in the checkpoint, return test metrics.

    The metrics are the protocol's for the repeat-aware ranking, keyed ``test/repeat_aware/<metric>``.
    """
    state = read_checkpoint(best_checkpoint)
    module = module_from_checkpoint(state)
    scorer = fit(module, val_data, test_data)
    save(best_checkpoint, scorer, state)
    ranked, _ = rank(module, scorer, test_data, max(ks))
    metrics = evaluate(ranked, test_data, ks)
    return {f"test/repeat_aware/{name}": float(value) for name, value in metrics.items()}
