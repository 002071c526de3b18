"""SASRec model: shapes, masking (NaN, causality, padding), tied embeddings, ONNX, checkpoints."""

from __future__ import annotations

import dataclasses
from functools import partial

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from recsys.data.vocabulary import PAD
from recsys.models.sasrec import SASRec, SASRecConfig
from tests.contract import check_causal, check_shapes, random_items

CFG = SASRecConfig(num_items=50, max_len=8, dim=16, num_layers=2, num_heads=2, dropout=0.2)


def _model(seed: int = 0) -> SASRec:
    torch.manual_seed(seed)
    return CFG.build()


_items = partial(random_items, CFG.num_items)  # (batch, length, seed=0) -> [batch, length] products


def _padded_batch() -> Tensor:
    """[4, max_len] with heavy left padding: all padding, one item, half padded, full."""
    x = _items(4, CFG.max_len)
    x[0] = PAD
    x[1, :-1] = PAD
    x[2, : CFG.max_len // 2] = PAD
    return x


def test_output_shapes() -> None:
    check_shapes(_model().eval(), CFG.num_items, CFG.dim, CFG.max_len)


def test_longer_than_max_len_raises() -> None:
    with pytest.raises(IndexError):
        _model()(_items(2, CFG.max_len + 1))


def test_dim_must_divide_into_heads() -> None:
    with pytest.raises(ValueError, match="divisible"):
        SASRecConfig(num_items=10, dim=10, num_heads=3)


@pytest.mark.parametrize("train", [True, False])
def test_finite_outputs_and_gradients_with_heavy_padding(train: bool) -> None:
    model = _model().train(train)
    x = _padded_batch()
    hidden = model(x)
    scores = model.encode(x) @ model.item_embeddings().T  # [B, V]
    assert torch.isfinite(hidden).all()
    assert torch.isfinite(scores).all()
    # full-softmax loss over every position, padding ones included, reaches every parameter
    loss = torch.logsumexp(hidden @ model.item_embeddings().T, dim=-1).sum() + scores.sum()
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name


def test_causality() -> None:
    model = _model().eval()
    x = _items(3, CFG.max_len)
    x[0, :2] = PAD
    check_causal(model, x, CFG.num_items)


def test_extra_left_padding_changes_nothing() -> None:
    model = _model().eval()
    x = _items(4, 5)
    x[1, :2] = PAD  # a row already padded
    padded = torch.cat([torch.full((4, 3), PAD), x], dim=1)  # [4, 8]
    with torch.no_grad():
        torch.testing.assert_close(model.encode(padded), model.encode(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(model(padded)[:, 3:], model(x), rtol=0, atol=1e-5)


def test_item_embeddings_tied_with_padding_row_zero() -> None:
    model = _model()
    table = model.item_emb.weight
    out = model.item_embeddings()
    assert torch.equal(out[PAD], torch.zeros(CFG.dim))
    assert torch.equal(table[PAD], torch.zeros(CFG.dim))
    assert torch.equal(out[1:], table[1:])
    out.sum().backward()  # gradient through the output embeddings lands in the input table
    assert torch.equal(table.grad[1:], torch.ones(CFG.num_items - 1, CFG.dim))


def test_padding_row_stays_zero_under_training() -> None:
    model = _model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    x = _padded_batch()
    for _ in range(3):
        logits = model(x) @ model.item_embeddings().T  # [B, L, V], padding logit included
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(model.item_emb.weight[PAD], torch.zeros(CFG.dim))
    assert torch.equal(model.item_embeddings()[PAD], torch.zeros(CFG.dim))


class _Encoder(nn.Module):
    """What ONNX export sees: item ids in, shopper embedding out."""

    def __init__(self, model: SASRec) -> None:
        super().__init__()
        self.model = model

    def forward(self, item_ids: Tensor) -> Tensor:
        return self.model.encode(item_ids)


def test_onnx_export_has_dynamic_batch_and_length(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = _model().eval()
    path = tmp_path / "encoder.onnx"
    # Example of batch 2 and a length > 1: torch.export silently specialises an axis whose example size
    # is 1. The wrapper is put in eval mode too: export restores the wrapper's mode afterwards, and a fresh
    # wrapper is in training mode, which would flip the wrapped model back to training.
    torch.onnx.export(
        _Encoder(model).eval(),
        (_items(2, CFG.max_len),),
        path,
        input_names=["item_ids"],
        output_names=["shopper_embedding"],
        dynamic_shapes={
            "item_ids": {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", max=CFG.max_len)}
        },
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    assert not model.training

    graph = onnx.load(path).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.output}
    dims |= {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input}
    assert dims == {"item_ids": ["batch", "seq"], "shopper_embedding": ["batch", CFG.dim]}

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 7, 64):
        for length in (1, 3, CFG.max_len):
            x = _items(batch, length, seed=batch * 100 + length)
            x[0, :-1] = PAD
            x[-1] = PAD  # all padding (the only row when batch is 1)
            (got,) = session.run(["shopper_embedding"], {"item_ids": x.numpy()})
            with torch.no_grad():
                want = model.encode(x).numpy()
            assert got.shape == (batch, CFG.dim)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_checkpoint_round_trip(tmp_path) -> None:
    model = _model(seed=0).eval()
    path = tmp_path / "sasrec.pt"
    torch.save({"config": dataclasses.asdict(CFG), "state_dict": model.state_dict()}, path)

    checkpoint = torch.load(path, weights_only=True)
    torch.manual_seed(1)  # different init, so only the loaded weights can make the outputs match
    restored = SASRecConfig(**checkpoint["config"]).build()
    restored.load_state_dict(checkpoint["state_dict"])
    restored.eval()

    x = _padded_batch()
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))
        assert torch.equal(restored.item_embeddings(), model.item_embeddings())
