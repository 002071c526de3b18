"""Checks every sequence model must pass (the ``forward`` / ``encode`` / ``item_embeddings`` contract)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from recsys.data.vocabulary import NUM_RESERVED, PAD


def check_prefix_states(model: nn.Module, x: Tensor, num_items: int, atol: float = 1e-6) -> None:
    """State t of ``forward`` is ``encode`` of the prefix up to t, and changing item t changes no earlier
    state but visibly changes state t (``x`` [B, L] item ids, left-padded)."""
    with torch.no_grad():
        states = model(x)
        for t in range(x.shape[1]):
            torch.testing.assert_close(states[:, t], model.encode(x[:, : t + 1]), rtol=0, atol=atol)
            changed = x.clone()
            changed[:, t] = (x[:, t] + 1 - NUM_RESERVED) % (num_items - NUM_RESERVED) + NUM_RESERVED
            after = model(changed)
            torch.testing.assert_close(after[:, :t], states[:, :t], rtol=0, atol=atol)  # the past: same
            assert not torch.allclose(after[:, t], states[:, t])  # the change is visible where it happens


def check_finite_with_heavy_padding(
    model: nn.Module, x: Tensor, no_grad: frozenset[str] = frozenset()
) -> None:
    """Outputs and the gradients of every parameter (but ``no_grad``) stay finite when one row of ``x`` is
    all padding and another holds one item."""
    x = x.clone()
    x[0] = PAD
    x[1, :-1] = PAD
    hidden = model(x)
    assert torch.isfinite(hidden).all()
    torch.logsumexp(hidden @ model.item_embeddings().T, dim=-1).sum().backward()
    for name, param in model.named_parameters():
        if name not in no_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
