"""The losses: hand-computed and brute-force values, finite gradients, no reserved negatives, a toy
problem each one solves, and SASRec / BERT4Rec training through NextItemModule with each new loss."""

from __future__ import annotations

import math
from collections.abc import Callable

import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from recsys.data.synthetic import SyntheticConfig, generate_table
from recsys.data.vocabulary import NUM_RESERVED
from recsys.losses import (
    full_softmax,
    gbce,
    in_batch_softmax,
    mixed_softmax,
    popularity_log_q,
    sampled_softmax,
    uniform_negatives,
)
from tests.contract import exact_loss_drop
from training.datamodule import ReceiptsDataModule
from training.module import NextItemModule

Loss = Callable[[Tensor, Tensor, Tensor], Tensor]  # (hidden, targets, items) -> scalar


def _uniform_log_p(num_items: int) -> Tensor:
    return popularity_log_q(torch.ones(num_items - NUM_RESERVED), alpha=1.0)


def _losses(num_items: int, num_negatives: int, log_p: Tensor | None = None) -> dict[str, Loss]:
    """Every loss as (hidden, targets, items) -> scalar, negatives drawn from the global RNG."""
    log_p = _uniform_log_p(num_items) if log_p is None else log_p

    return {
        "softmax": full_softmax,
        "sampled_softmax": lambda h, t, e: sampled_softmax(h, t, e, log_p, num_negatives),
        "gbce": lambda h, t, e: gbce(h, t, e, uniform_negatives(num_items, (len(t), num_negatives))),
        "in_batch": lambda h, t, e: in_batch_softmax(h, t, e, log_p),
        "mixed": lambda h, t, e: mixed_softmax(h, t, e, log_p, uniform_negatives(num_items, num_negatives)),
    }


def test_values_at_zero_scores_by_hand() -> None:
    """All scores 0: every loss reduces to counting candidates (uniform popularity)."""
    V, d = 7, 3  # 5 products: indices 2..6
    hidden, items = torch.zeros(3, d), torch.randn(V, d)
    targets = torch.tensor([2, 3, 2])
    log_p = _uniform_log_p(V)
    assert full_softmax(hidden, targets, items).item() == pytest.approx(math.log(5))
    # alpha = 2 / (5 - 1) = 0.5, beta = 0.5 * (0.75 * (1 - 2) + 2) = 0.625; log sigmoid(0) = -log 2;
    # row 2's negative 2 is its own positive, so that row has one negative term less
    value = gbce(hidden, targets, items, torch.tensor([[4, 5], [5, 6], [2, 6]]), t=0.75).item()
    assert value == pytest.approx(math.log(2) * (2 * (0.625 + 2) + (0.625 + 1)) / 3 / 3)
    assert in_batch_softmax(hidden, targets, items, log_p).item() == pytest.approx(math.log(2))
    # candidates {2, 3} + uniform [4, 2]: rows with target 2 lose the accidental hit (3 left), row 1 has 4
    value = mixed_softmax(hidden, targets, items, log_p, torch.tensor([4, 2])).item()
    assert value == pytest.approx((2 * math.log(3) + math.log(4)) / 3)


def _brute_gbce(hidden: Tensor, targets: Tensor, items: Tensor, negatives: Tensor, t: float) -> float:
    m = negatives.shape[1]
    alpha = m / (len(items) - NUM_RESERVED - 1)
    beta = alpha * (t * (1 - 1 / alpha) + 1 / alpha)
    total = 0.0
    for h, target, row_negatives in zip(hidden.tolist(), targets.tolist(), negatives.tolist(), strict=True):
        score = sum(a * b for a, b in zip(h, items[target].tolist(), strict=True))
        row = beta * math.log(1 / (1 + math.exp(-score)))
        for j in row_negatives:
            if j != target:  # accidental hit
                s = sum(a * b for a, b in zip(h, items[j].tolist(), strict=True))
                row += math.log(1 - 1 / (1 + math.exp(-s)))
        total -= row / (1 + m)
    return total / len(targets)


def _brute_mixed(hidden: Tensor, targets: Tensor, items: Tensor, log_p: Tensor, negatives: Tensor) -> float:
    n, m, num_products = len(targets), len(negatives), len(items) - NUM_RESERVED
    batch = sorted(set(targets.tolist()))
    total = 0.0
    for h, target in zip(hidden.tolist(), targets.tolist(), strict=True):
        logits, positive = [], None
        for source, j in [("batch", j) for j in batch] + [("uniform", j) for j in negatives.tolist()]:
            if source == "uniform" and j == target:
                continue  # accidental hit
            expected = 1 - (1 - math.exp(log_p[j].item())) ** n + m / num_products
            score = sum(a * b for a, b in zip(h, items[j].tolist(), strict=True))
            if source == "batch" and j == target:
                positive = score - math.log(expected)
            logits.append(score - math.log(expected))
        total += math.log(sum(math.exp(x) for x in logits)) - positive
    return total / n


def test_values_match_brute_force() -> None:
    """Random scores, skewed popularity, duplicate targets, accidental hits: loops vs the vectorised code."""
    torch.manual_seed(0)
    V, d = 12, 4
    hidden, items = torch.randn(6, d), torch.randn(V, d)
    targets = torch.tensor([2, 5, 5, 9, 2, 11])
    negatives = torch.tensor([3, 5, 7, 7, 11])  # 5 and 11 are positives of some rows
    per_row = torch.tensor([[3, 4, 2], [5, 6, 7], [8, 8, 9], [9, 10, 11], [2, 3, 4], [11, 11, 11]])
    log_p = popularity_log_q(torch.arange(V - NUM_RESERVED, 0, -1).float() ** 2, alpha=1.0)
    assert gbce(hidden, targets, items, per_row, t=0.6).item() == pytest.approx(
        _brute_gbce(hidden, targets, items, per_row, 0.6), rel=1e-5
    )
    assert mixed_softmax(hidden, targets, items, log_p, negatives).item() == pytest.approx(
        _brute_mixed(hidden, targets, items, log_p, negatives), rel=1e-5
    )
    assert in_batch_softmax(hidden, targets, items, log_p).item() == pytest.approx(
        _brute_mixed(hidden, targets, items, log_p, torch.tensor([], dtype=torch.int64)), rel=1e-5
    )


def test_gbce_calibration_ends() -> None:
    """t = 0 is gSASRec's plain BCE (mean over positive and negatives); t = 1 weighs the positive by alpha."""
    torch.manual_seed(1)
    V, d = 10, 4
    hidden, items = torch.randn(5, d), torch.randn(V, d)
    targets = torch.tensor([2, 3, 4, 5, 6])
    negatives = torch.tensor([[7, 8, 9], [2, 8, 9], [3, 7, 9], [7, 8, 2], [2, 3, 4]])  # no accidental hits
    positive = (hidden * items[targets]).sum(-1, keepdim=True)  # [5, 1]
    logits = torch.cat([positive, (hidden[:, None, :] * items[negatives]).sum(-1)], dim=1)  # [5, 4]
    labels = torch.zeros_like(logits)
    labels[:, 0] = 1
    bce = F.binary_cross_entropy_with_logits(logits, labels)
    assert gbce(hidden, targets, items, negatives, t=0.0).item() == pytest.approx(bce.item(), rel=1e-6)
    alpha = 3 / 7  # 3 negatives of 8 products, less the positive
    positive_part = -F.logsigmoid(positive).mean() / 4
    calibrated = gbce(hidden, targets, items, negatives, t=1.0)
    assert calibrated.item() == pytest.approx(bce.item() - (1 - alpha) * positive_part.item(), rel=1e-6)
    with pytest.raises(ValueError, match="gbce needs 1 <= negatives <= products - 1"):
        gbce(hidden, targets, items, torch.arange(2, 10).expand(5, 8))


@pytest.mark.parametrize("name", ["softmax", "sampled_softmax", "gbce", "in_batch", "mixed"])
def test_gradients_finite_and_reserved_rows_never_negatives(name: str) -> None:
    torch.manual_seed(2)
    V, d = 30, 8
    loss = _losses(V, 16)[name]
    hidden = (30 * torch.randn(40, d)).requires_grad_()  # large scores: saturated sigmoids, peaked softmax
    items = (30 * torch.randn(V, d)).requires_grad_()
    targets = torch.randint(NUM_RESERVED, V, (40,))  # duplicates and accidental hits are likely
    torch.manual_seed(3)
    value = loss(hidden, targets, items)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(items.grad).all()
    assert torch.equal(items.grad[:NUM_RESERVED], torch.zeros(NUM_RESERVED, d))  # never a candidate

    changed = items.detach().clone()
    changed[:NUM_RESERVED] = 1e4  # would dominate any loss that scored padding or unknown
    torch.manual_seed(3)  # the same negatives as above
    assert loss(hidden, targets, changed).item() == pytest.approx(value.item(), rel=1e-6)


def test_samplers_never_draw_reserved_indices() -> None:
    drawn = uniform_negatives(7, 10_000, generator=torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {2, 3, 4, 5, 6}  # every product, nothing else
    proposal = popularity_log_q(torch.tensor([5.0, 1.0, 3.0])).exp()
    assert proposal[:NUM_RESERVED].tolist() == [0.0, 0.0]
    assert proposal.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["softmax", "sampled_softmax", "gbce", "in_batch", "mixed"])
def test_each_loss_learns_a_toy_problem(name: str) -> None:
    """16 contexts, each with its own next item: trained by the loss alone, every context ranks it first."""
    torch.manual_seed(4)
    num_contexts, d = 16, 8
    V = num_contexts + NUM_RESERVED
    loss = _losses(V, 6)[name]
    contexts = torch.nn.Parameter(0.1 * torch.randn(num_contexts, d))
    items = torch.nn.Parameter(0.1 * torch.randn(V, d))
    optimizer = torch.optim.Adam([contexts, items], lr=0.05)
    for _ in range(150):
        batch = torch.randperm(num_contexts)[:8]  # in-batch negatives vary from step to step
        optimizer.zero_grad()
        loss(contexts[batch], batch + NUM_RESERVED, items).backward()
        optimizer.step()
    with torch.no_grad():
        ranked = (contexts @ items[NUM_RESERVED:].T).argmax(dim=1)  # [contexts]
    assert torch.equal(ranked, torch.arange(num_contexts))


@pytest.fixture(scope="module")
def receipts() -> pa.Table:
    return generate_table(SyntheticConfig(num_shoppers=300, num_products=200, seed=5))


@pytest.mark.parametrize(
    ("model", "loss"),
    [("sasrec", name) for name in ("gbce", "in_batch", "mixed")]
    + [("bert4rec", name) for name in ("sampled_softmax", "gbce", "in_batch", "mixed")],
)
def test_module_trains_with_each_loss(receipts: pa.Table, model: str, loss: str) -> None:
    """40 steps of a loss on one batch lower the exact softmax loss of the module's own objective.

    gbce's bar is lower: it starts slowly, its negatives first pushing every score down.
    """
    datamodule = ReceiptsDataModule(
        lambda: receipts, cutoff="2017-12-01", timezone="UTC", val_days=0, batch_size=64
    )
    datamodule.setup("fit")
    net = {"name": model, "num_items": datamodule.vocab.size, "dim": 32,
           "num_layers": 1, "num_heads": 1, "dropout": 0.1}  # fmt: skip
    objective = "masked" if model.startswith("bert4rec") else "causal"
    torch.manual_seed(0)
    module = NextItemModule(net, datamodule.vocab.to_dict(), loss=loss, num_negatives=32, objective=objective)
    batch = next(iter(datamodule.train_dataloader()))
    before, after = exact_loss_drop(module, batch, steps=40, lr=5e-3)
    assert math.isfinite(before)
    assert after < before - (0.15 if loss == "gbce" else 0.3)
