"""BERT4Rec and the masked objective: shapes, bidirectional attention, padding, the MASK row, masking,
objective checks, and a real Hydra training run that is checkpointed, exported to ONNX and served."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from hydra import compose, initialize_config_dir

from export import index as indexes
from export.export import export_bundle
from export.onnx import PARITY_TOLERANCE, parity
from recsys.bundle import MODEL_FILE, read_bundle
from recsys.data.schema import SHOPPER
from recsys.data.sequences import build_sequences
from recsys.data.split import parse_cutoff
from recsys.data.synthetic import SyntheticConfig, generate_table
from recsys.data.vocabulary import NUM_RESERVED, PAD, UNK
from recsys.evaluation import baselines
from recsys.evaluation.protocol import EvaluationData, evaluate, prepare
from recsys.inputs import Histories
from recsys.models.bert4rec import BERT4Rec, BERT4RecConfig
from serving.recommender import Recommender
from tests.conftest import CONF
from tests.contract import network_ranking, other_item, random_items
from training.module import NextItemModule, load_module, mask_items
from training.train import train

CFG = BERT4RecConfig(num_items=50, max_len=8, dim=16, num_layers=2, num_heads=2, dropout=0.2)
SASREC_NET = {"name": "sasrec", "num_items": 10}
BERT4REC_NET = {"name": "bert4rec", "num_items": 10}
VOCAB = {"product_ids": list(range(8)), "popularity": [1] * 8}


def _model(seed: int = 0) -> BERT4Rec:
    torch.manual_seed(seed)
    return CFG.build()


_items = partial(random_items, CFG.num_items)  # (batch, length, seed=0) -> [batch, length] products


def test_output_shapes_and_the_appended_mask() -> None:
    model = _model().eval()
    assert model.mask_token == CFG.num_items
    assert model.item_emb.weight.shape == (CFG.num_items + 1, CFG.dim)  # the MASK row is extra
    assert model.pos_emb.weight.shape == (CFG.max_len + 1, CFG.dim)
    assert model.item_embeddings().shape == (CFG.num_items, CFG.dim)
    with torch.no_grad():
        for length in (1, 5, CFG.max_len):
            x = _items(3, length)
            assert model(x).shape == (3, length, CFG.dim)
            with_mask = torch.cat([x, torch.full((3, 1), CFG.num_items)], dim=1)
            # encode computes the MASK position's work alone: equal up to rounding
            torch.testing.assert_close(model.encode(x), model(with_mask)[:, -1], rtol=0, atol=1e-5)
        assert model(_items(3, CFG.max_len + 1)).shape == (3, CFG.max_len + 1, CFG.dim)  # a training window
        with pytest.raises(IndexError):
            model.encode(_items(2, CFG.max_len + 1))  # + MASK is past the position table


def test_attention_is_bidirectional() -> None:
    """Unlike SASRec, changing a later item changes the outputs at earlier positions."""
    model = _model().eval()
    x = _items(2, CFG.max_len)
    changed = x.clone()
    changed[:, -1] = other_item(x[:, -1], CFG.num_items)
    with torch.no_grad():
        before, after = model(x), model(changed)
    assert (after[:, :-1] - before[:, :-1]).abs().amax(dim=-1).min() > 1e-4  # every earlier position


def test_extra_left_padding_changes_nothing() -> None:
    model = _model().eval()
    x = _items(4, 5)
    x[1, :2] = PAD  # a row already padded
    x[2, :] = PAD  # no history at all: only the MASK is seen
    padded = torch.cat([torch.full((4, 3), PAD), x], dim=1)  # [4, 8], the longest history encode takes
    with torch.no_grad():
        torch.testing.assert_close(model.encode(padded), model.encode(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(model(padded)[:, 3:], model(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("train", [True, False])
def test_finite_outputs_and_gradients_with_heavy_padding(train: bool) -> None:
    model = _model().train(train)
    x = _items(3, CFG.max_len)
    x[0] = PAD
    x[1, :-1] = PAD
    scores = model.encode(x) @ model.item_embeddings().T  # [B, V]
    hidden = model(torch.cat([x, torch.full((3, 1), model.mask_token)], dim=1))  # all max_len + 1 positions
    assert torch.isfinite(scores).all() and torch.isfinite(hidden).all()
    (torch.logsumexp(hidden @ model.item_embeddings().T, dim=-1).sum() + scores.sum()).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name


def test_mask_row_feeds_encode_but_is_never_an_item() -> None:
    model = _model().eval()
    x = _items(2, 4)
    with torch.no_grad():
        items, encoded = model.item_embeddings(), model.encode(x)
        assert torch.equal(items[PAD], torch.zeros(CFG.dim))
        assert torch.equal(items[1:], model.item_emb.weight[1 : CFG.num_items])
        model.item_emb.weight[model.mask_token] += torch.randn(CFG.dim)
        assert torch.equal(model.item_embeddings(), items)  # the MASK row is no output item
        assert not torch.allclose(model.encode(x), encoded)  # but it is encode's query


def test_mask_items() -> None:
    torch.manual_seed(0)
    tokens = torch.randint(NUM_RESERVED, 100, (2000, 9))
    tokens[:500, :4] = PAD
    tokens[::7, 2] = UNK
    tokens[3, :] = PAD  # nothing to mask
    tokens[5, :] = UNK
    tokens[6, -1] = UNK  # a last-only draw falls back to another product
    is_product = tokens > UNK
    inputs, masked = mask_items(tokens, mask_token=100, mask_prob=0.3, mask_last_prob=0.0)
    assert not (masked & ~is_product).any()  # padding and unknown are never targets
    assert torch.equal(masked.any(dim=1), is_product.any(dim=1))  # at least one per window with products
    assert torch.equal(inputs, torch.where(masked, 100, tokens))
    assert masked.sum() / is_product.sum() == pytest.approx(0.3, abs=0.02)

    _, last = mask_items(tokens, mask_token=100, mask_prob=0.3, mask_last_prob=1.0)
    assert torch.equal(last[:, -1], is_product[:, -1])
    assert torch.equal(last[:, :-1].sum(dim=1), (~is_product[:, -1] & is_product[:, :-1].any(dim=1)).long())

    _, mixed = mask_items(tokens, mask_token=100, mask_prob=0.3, mask_last_prob=0.25)
    only_last = (mixed.sum(dim=1) == 1) & mixed[:, -1]  # a few random draws mask only the last item too
    assert 0.22 < only_last.float().mean() < 0.30


def test_objective_must_match_the_model() -> None:
    with pytest.raises(ValueError, match="BERT4Rec trains with the 'masked' objective, not 'causal'"):
        NextItemModule(BERT4REC_NET, VOCAB)
    with pytest.raises(ValueError, match="SASRec trains with the 'causal' objective, not 'masked'"):
        NextItemModule(SASREC_NET, VOCAB, objective="masked")
    with pytest.raises(ValueError, match="unknown objective 'cloze'"):
        NextItemModule(BERT4REC_NET, VOCAB, objective="cloze")
    with pytest.raises(ValueError, match="mask_prob"):
        NextItemModule(BERT4REC_NET, VOCAB, objective="masked", mask_prob=0.0)
    assert NextItemModule(BERT4REC_NET, VOCAB, objective="masked").model.mask_token == 10


# Synthetic world: training sees the first 1024 shoppers (one generator block, identical to a 1024-shopper
# config), the next 1024 are held out. Small model, as tests/test_training.py's SASRec.
SEED, NUM_PRODUCTS = 3, 400
OVERRIDES = [
    "data=synthetic", "model=bert4rec", "trainer=cpu", "logger=csv", f"seed={SEED}",
    "data.receipts.config.num_shoppers=1024", f"data.receipts.config.num_products={NUM_PRODUCTS}",
    "model.net.dim=32", "model.net.num_layers=1", "model.net.num_heads=1", "model.net.dropout=0.1",
    "model.lr=3e-3", "model.warmup_steps=20", "data.batch_size=64", "trainer.max_epochs=4",
    "trainer.enable_progress_bar=false",
]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Output directory of ``train(cfg)`` for the real composed configs (checkpoint, metrics.json)."""
    out = tmp_path_factory.mktemp("bert4rec_run")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={out}", *OVERRIDES])
    train(cfg)
    return out


@pytest.fixture(scope="module")
def held_out() -> EvaluationData:
    world = generate_table(SyntheticConfig(num_shoppers=2048, num_products=NUM_PRODUCTS, seed=SEED))
    shoppers = world.column(SHOPPER)
    unseen: pa.Table = world.filter(pc.greater_equal(shoppers, pc.min(shoppers).as_py() + 1024))
    return prepare(unseen, parse_cutoff("2017-12-01", "UTC"), min_baskets=1)


def test_masked_training_learns_and_beats_popularity_on_held_out_shoppers(
    run: Path, held_out: EvaluationData
) -> None:
    checkpoint = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    trained = load_module(str(run / "checkpoints" / "best.ckpt"))
    torch.manual_seed(0)
    untrained = NextItemModule(**checkpoint["hyper_parameters"], vocab=trained.vocab).eval()

    # masked loss on held-out windows (the most recent max_len + 1 items), the same masks for both
    max_len = trained.model.config.max_len
    sequences = build_sequences(held_out.train, trained.vocab)
    inputs = Histories.from_sequences(sequences).model_inputs(max_len + 1)
    windows = tuple(torch.from_numpy(a) for a in inputs)  # items, gaps

    def masked_loss(module: NextItemModule) -> float:
        torch.manual_seed(1)
        with torch.no_grad():
            return module.training_step(windows, 0).item()

    assert masked_loss(trained) < masked_loss(untrained) - 1.0

    shoppers = held_out.targets.shopper_ids
    model = evaluate(network_ranking(trained, held_out.train, shoppers, 10), held_out, ks=(10,))
    popular = baselines.popularity(trained.vocab, len(shoppers), 10)
    popular = evaluate(trained.vocab.decode(popular), held_out, ks=(10,))
    assert model["recall@10"] > 1.5 * popular["recall@10"], (model, popular)
    assert model["ndcg@10"] > 1.5 * popular["ndcg@10"]


def test_checkpoint_is_plain_values_and_reloads(run: Path) -> None:
    path = run / "checkpoints" / "best.ckpt"
    hparams = torch.load(path, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert hparams["net"]["name"] == "bert4rec"
    assert (hparams["objective"], hparams["mask_prob"]) == ("masked", 0.2)
    assert "vocab" not in hparams  # a checkpoint entry of its own (training.checkpoint)
    module, reloaded = load_module(str(path)), load_module(str(path))
    assert isinstance(module.model, BERT4Rec)
    history = torch.tensor([[0, 0, 5, 6, 7]])
    assert torch.equal(module.top_k(history, 10)[0], reloaded.top_k(history, 10)[0])


def test_exported_bundle_matches_torch_and_serves(
    run: Path, held_out: EvaluationData, tmp_path: Path
) -> None:
    checkpoint = run / "checkpoints" / "best.ckpt"
    bundle_path = export_bundle(checkpoint, tmp_path / "bundle", indexes.flat)
    module = load_module(str(checkpoint))
    onnx_bytes = (bundle_path / MODEL_FILE).read_bytes()
    inputs = onnx.load_from_string(onnx_bytes).graph.input
    assert [dim.dim_param for dim in inputs[0].type.tensor_type.shape.dim] == ["batch", "seq"]
    assert parity(module.model, onnx_bytes, (1, 7, 64), (1, 3, module.model.config.max_len), seed=1) <= (
        PARITY_TOLERANCE
    )
    manifest = read_bundle(bundle_path).manifest
    assert manifest["model"]["name"] == "BERT4Rec"
    assert manifest["vocab_size"] == module.vocab.size  # the MASK row is not in the index

    # real held-out histories of very different lengths, served in one batch padded to the longest
    max_len = module.model.config.max_len
    sequences = Histories.from_sequences(build_sequences(held_out.train, module.vocab)).model_inputs(max_len)[
        0
    ][:64]
    rows = [row[row > UNK] for row in sequences]  # serving drops unknown products, so torch does too
    rows = [row for row in rows if len(row)]
    item_ids = np.zeros((len(rows), max_len), dtype=np.int64)
    for i, row in enumerate(rows):
        item_ids[i, max_len - len(row) :] = row
    assert len({len(row) for row in rows}) > 5
    expected = module.vocab.product_ids_of(module.top_k(torch.from_numpy(item_ids), 10)[0].numpy())
    served = Recommender.load(bundle_path).recommend_batch(
        [module.vocab.decode(row).tolist() for row in rows]
    )
    assert [r.product_ids for r in served] == expected.tolist()
