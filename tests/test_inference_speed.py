"""The inference path computes only what ``encode`` returns: the trimmed encoders (torch and their ONNX
graphs) equal the full forward at the last position, for every model family, on padding-heavy batches;
every family's graph also quantises to int8 (the export option) close to it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from export.onnx import (
    PARITY_TOLERANCE,
    export_encoder,
    onnx_encoder,
    quantize_int8,
    random_gaps,
    random_histories,
)
from recsys.data.vocabulary import PAD
from recsys.models import build_model
from recsys.models.bert4rec import BERT4Rec

NUM_ITEMS, MAX_LEN, DIM = 60, 12, 16
TORCH_TOLERANCE = 1e-5  # trimmed vs full forward in torch: the same operations on fewer rows
NETS = {
    "sasrec": {"name": "sasrec", "num_layers": 2, "num_heads": 2},
    "sasrec_one_block": {"name": "sasrec", "num_layers": 1, "num_heads": 2},
    "bert4rec": {"name": "bert4rec", "num_layers": 2, "num_heads": 2},
    "gru4rec": {"name": "gru4rec", "num_layers": 2},
    "two_tower": {"name": "two_tower", "feature_cardinalities": [4, 3], "num_decays": 2},
}


def _model(key: str, time_gaps: bool) -> nn.Module:
    torch.manual_seed(0)
    net = {**NETS[key], "num_items": NUM_ITEMS, "max_len": MAX_LEN, "dim": DIM, "time_gaps": time_gaps}
    model = build_model(net).eval()
    if key == "two_tower":  # feature codes, so the item tower's feature path is exercised too
        codes = torch.stack([torch.arange(NUM_ITEMS) % 4, torch.arange(NUM_ITEMS) % 3], dim=1)
        model.set_item_codes(codes)
    return model


def _full(model: nn.Module, item_ids: Tensor, gaps: Tensor) -> Tensor:
    """The untrimmed shopper embedding: the full forward's state at the position ``encode`` reads."""
    if isinstance(model, BERT4Rec):  # encode reads the output at a MASK appended after the history
        mask = torch.full_like(item_ids[:, :1], model.mask_token)
        item_ids = torch.cat([item_ids, mask], dim=1)
        gaps = torch.cat([gaps, torch.zeros_like(gaps[:, :1])], dim=1)
    return model(item_ids, gaps)[:, -1]


def _padding_heavy(seed: int, batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Histories where most rows are mostly padding: all-padding rows, one-item rows, full rows."""
    rng = np.random.default_rng(seed)
    items = random_histories(rng, batch, length, NUM_ITEMS)
    items[: batch // 4] = PAD  # shoppers with no known product
    items[batch // 4 : batch // 2, :-1] = PAD  # one item, at the last position
    return items, random_gaps(rng, items)


@pytest.mark.parametrize("time_gaps", [False, True], ids=["ids", "gaps"])
@pytest.mark.parametrize("key", list(NETS))
def test_trimmed_encode_equals_the_full_forward(key: str, time_gaps: bool) -> None:
    model = _model(key, time_gaps)
    with torch.no_grad():
        for seed, length in enumerate((1, 2, MAX_LEN)):
            items, gaps = map(torch.from_numpy, _padding_heavy(seed, 16, length))
            got, want = model.encode(items, gaps), _full(model, items, gaps)
            assert got.shape == (16, DIM)
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, want, rtol=0, atol=TORCH_TOLERANCE)


@pytest.mark.parametrize("key", ["sasrec", "bert4rec", "gru4rec", "two_tower"])
def test_onnx_graph_of_the_trimmed_encoder_equals_the_full_forward(key: str) -> None:
    time_gaps = key != "gru4rec"  # both inputs for three families; GRU4Rec's graph of ids alone
    model = _model(key, time_gaps)
    graph = export_encoder(model)
    encode, quantized = onnx_encoder(graph), onnx_encoder(quantize_int8(graph))
    with torch.no_grad():
        for seed, (batch, length) in enumerate(((1, 1), (7, 3), (33, MAX_LEN))):
            items, gaps = _padding_heavy(seed, batch, length)
            want = _full(model, torch.from_numpy(items), torch.from_numpy(gaps)).numpy()
            got = encode(items, gaps)
            assert np.isfinite(got).all()
            assert np.max(np.abs(got - want)) <= PARITY_TOLERANCE
            # every family's graph quantises, and its int8 weights move the embeddings only a little
            approximate = quantized(items, gaps)
            assert approximate.shape == want.shape and np.isfinite(approximate).all()
            assert np.linalg.norm(approximate - want) <= 0.1 * np.linalg.norm(want)
