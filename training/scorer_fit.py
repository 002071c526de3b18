"""Fit the repeat-aware scorer (:mod:`recsys.repeat_scorer`) of a trained model and keep it in the checkpoint.

The scorer is fitted on the validation split only (histories before ``cutoff - val_days``, the next basket
after it), so test metrics stay honest. Deployed, it uses per-product statistics of all training data.
"""

from __future__ import annotations

import numpy as np
import torch

from recsys.data.sequences import build_sequences
from recsys.evaluation.protocol import EvaluationData, evaluate, evaluated_histories
from recsys.inputs import Histories, pair_member
from recsys.repeat_scorer import NEW_CANDIDATES, RepeatScorer, features, item_statistics
from recsys.rules import Rules
from training import checkpoint as checkpoints
from training.module import NextItemModule, module_from_checkpoint, recommend, search

L2 = 1e-4


def fit(module: NextItemModule, val: EvaluationData, deploy_train: EvaluationData) -> RepeatScorer:
    """A scorer fitted on ``val``'s next baskets, carrying per-product statistics of ``deploy_train``."""
    vocab = module.vocab
    everyone = Histories.from_sequences(build_sequences(val.train, vocab))
    repeat_rate, popularity = item_statistics(everyone, vocab.num_products)
    histories = evaluated_histories(val, vocab)
    # the pool the deployed scorer weighs: each shopper's history plus its best NEW_CANDIDATES new products
    wanted = min(vocab.num_products, NEW_CANDIDATES + int(histories.distinct_sizes().max(initial=0)))
    rows, scores = search(module, histories, wanted)
    owner, item_rows, x = features(histories, rows, scores, repeat_rate, popularity, NEW_CANDIDATES)
    target_rows = [vocab.rows(items) for items in val.targets.items]
    target_owner = np.repeat(np.arange(len(target_rows)), [len(t) for t in target_rows])
    labels = pair_member(owner, item_rows, target_owner, np.concatenate(target_rows))

    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    weights, bias = _logistic_regression((x - mean) / scale, labels)
    full = Histories.from_sequences(build_sequences(deploy_train.train, vocab))
    deploy_rate, _ = item_statistics(full, vocab.num_products)
    return RepeatScorer(weights, bias, mean, scale, deploy_rate, vocab.popularity.astype(np.float64))


def _logistic_regression(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Weights and bias minimising the mean log-loss + ``L2`` * |w|^2 (L-BFGS, float64)."""
    inputs = torch.from_numpy(x)
    labels = torch.from_numpy(y.astype(np.float64))
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(inputs @ w + b, labels)
        loss = loss + L2 * (w**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach().numpy().copy(), float(b.item())


def fit_and_test(
    best_checkpoint: str, test_data: EvaluationData, val_data: EvaluationData, ks: tuple
) -> dict:
    """Fit the best checkpoint's scorer on validation, store it in the checkpoint, return test metrics.

    The metrics are the protocol's for the repeat-aware ranking, keyed ``test/repeat_aware/<metric>``.
    """
    state = checkpoints.read(best_checkpoint)
    module = module_from_checkpoint(state)
    scorer = fit(module, val_data, test_data)
    checkpoints.write_scorer(best_checkpoint, scorer, state)
    ranked = recommend(module, evaluated_histories(test_data, module.vocab), Rules(k=max(ks)), scorer)
    metrics = evaluate(ranked, test_data, ks)
    return {f"test/repeat_aware/{name}": float(value) for name, value in metrics.items()}
