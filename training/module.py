"""LightningModule for next-item sequence models: objective, loss, optimiser, schedule, protocol metrics.

Two objectives turn a window of items into (hidden state, target) pairs: ``causal`` (SASRec: the output
at position t predicts item t + 1) and ``masked`` (BERT4Rec: items replaced by the model's MASK token are
predicted from both sides). A model needing the masked objective says so with ``objective = "masked"``;
a model that declares nothing is causal. Either objective works with every loss of ``recsys.losses``.

Hyperparameters are plain values only (model config, vocabulary, data description), so a checkpoint
is self-describing and loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor

from recsys.data.vocabulary import PAD, PRODUCTS, UNK, Vocabulary
from recsys.inputs import Histories
from recsys.io import atomic_path
from recsys.losses import (
    full_softmax,
    gbce,
    in_batch_softmax,
    mixed_softmax,
    popularity_log_q,
    sampled_softmax,
    uniform_negatives,
)
from recsys.models import build_model
from recsys.ranker import Ranker
from recsys.rules import Rules
from recsys.scoring import popularity_order, search_size
from recsys.scoring import recommend as score_candidates
from training import checkpoint as checkpoints

LOSSES = ("softmax", "sampled_softmax", "gbce", "in_batch", "mixed")
OBJECTIVES = ("causal", "masked")


def mask_items(
    tokens: Tensor, mask_token: int, mask_prob: float, mask_last_prob: float
) -> tuple[Tensor, Tensor]:
    """Masked-objective inputs for windows ``tokens`` [B, T]: (inputs [B, T], masked [B, T] bool).

    Each product (index > UNK; padding and unknown are never targets) is masked with probability
    ``mask_prob``; a ``mask_last_prob`` share of the windows masks only the most recent item instead, which
    is exactly how ``encode`` queries the model. A window left without any mask gets one at a random
    product. ``inputs`` is ``tokens`` with masked positions replaced by ``mask_token``.
    """
    is_product = tokens > UNK
    noise = torch.rand(tokens.shape, device=tokens.device)  # [B, T]
    masked = (noise < mask_prob) & is_product
    last_only = torch.rand(len(tokens), 1, device=tokens.device) < mask_last_prob  # [B, 1]
    last = torch.zeros_like(masked)
    last[:, -1] = True  # windows are left-padded: the last column is the most recent item
    masked = torch.where(last_only, last & is_product, masked)
    # the largest noise among a row's products is at a uniformly random product (iid noise)
    pick = noise.masked_fill(~is_product, -1.0).argmax(dim=1)  # [B]
    fallback = F.one_hot(pick, tokens.shape[1]).bool() & is_product & ~masked.any(dim=1, keepdim=True)
    masked = masked | fallback
    return tokens.masked_fill(masked, mask_token), masked


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 200, min_lr_ratio: float = 0.1
) -> torch.optim.lr_scheduler.SequentialLR:
    """Linear warmup, then cosine decay to ``min_lr_ratio`` x the peak lr: torch's schedulers, stepped once
    per optimizer step over ``total_steps`` (``conf/model/*.yaml``'s ``scheduler``).

    The warmup is ``w = min(warmup_steps, total_steps // 10 + 1)`` steps (at least 1), so a short run still
    spends most of its steps decaying. ``LinearLR`` runs step ``t < w`` at ``(t + 1) / w`` of the optimizer's
    lr (the peak at step ``w - 1``); ``CosineAnnealingLR`` then goes from the peak at step ``w`` to
    ``min_lr_ratio`` x the peak at step ``total_steps``; ``SequentialLR`` switches between them at ``w``.
    """
    warmup = max(1, min(warmup_steps, total_steps // 10 + 1))
    peak = optimizer.param_groups[0]["lr"]  # every group starts at the optimizer's lr
    schedulers = torch.optim.lr_scheduler
    linear = schedulers.LinearLR(optimizer, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1)
    cosine = schedulers.CosineAnnealingLR(
        optimizer, T_max=max(1, total_steps - warmup), eta_min=min_lr_ratio * peak
    )
    return schedulers.SequentialLR(optimizer, [linear, cosine], milestones=[warmup])


class NextItemModule(pl.LightningModule):
    """Trains a model exposing ``forward`` [B, L, d], ``encode`` [B, d] and ``item_embeddings`` [V, d]."""

    def __init__(
        self,
        net: dict[str, Any],
        vocab: Vocabulary | dict[str, Any],
        data: dict[str, Any] | None = None,
        loss: str = "softmax",
        num_negatives: int = 2048,
        gbce_t: float = 0.75,
        objective: str = "causal",
        mask_prob: float = 0.2,
        mask_last_prob: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 200,
        ks: tuple[int, ...] = (10, 20),
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
    ) -> None:
        """``optimizer`` and ``scheduler`` are plain-dict Hydra configs of partials (``conf/model/*.yaml``),
        instantiated only by :meth:`optimizer_and_scheduler` when training starts, never when a checkpoint
        is loaded: ``optimizer`` is called with the parameter groups, ``scheduler`` with the optimizer and
        ``total_steps``. Left ``None`` (direct construction, checkpoints written before they existed), they
        are AdamW(lr, betas (0.9, 0.98), weight_decay) and :func:`warmup_cosine` (warmup_steps, 10%). The
        configs' nodes interpolate ``lr``, ``weight_decay`` and ``warmup_steps``, so ``model.lr=...`` and
        ``model.warmup_steps=...`` overrides keep working."""
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
        if not (0 < mask_prob <= 1 and 0 <= mask_last_prob <= 1):
            raise ValueError(
                f"need 0 < mask_prob <= 1 and 0 <= mask_last_prob <= 1; got {mask_prob}, {mask_last_prob}"
            )
        # the vocabulary is a checkpoint entry of its own (training.checkpoint), not a hyperparameter: it
        # would make every logged config (hparams.yaml, wandb) as large as the catalogue
        self.save_hyperparameters(ignore=["vocab"])
        self.model = build_model(net)
        required = getattr(self.model, "objective", "causal")
        if objective != required:
            raise ValueError(
                f"{type(self.model).__name__} trains with the {required!r} objective, not {objective!r}; "
                f"set model.objective={required}"
            )
        self.vocab = vocab if isinstance(vocab, Vocabulary) else Vocabulary.from_dict(vocab)
        # product metadata of the vocabulary's products, kept in checkpoints for export (training.train)
        self.products: pa.Table | None = None
        self.expects_scorer = False  # whether train() will fit a repeat-aware scorer into the checkpoint
        self.ks = tuple(ks)
        popularity = torch.as_tensor(self.vocab.popularity)
        # sampled_softmax's proposal (flattened popularity), and each item's frequency as a target, which
        # is how often it turns up as an in-batch negative
        self.register_buffer("log_q", popularity_log_q(popularity), persistent=False)
        self.register_buffer("log_p", popularity_log_q(popularity, alpha=1.0), persistent=False)
        self._searched: list[tuple[Tensor, Tensor]] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        tokens, gaps = batch  # [B, L + 1] items and their gaps (models without time_gaps ignore these)
        if self.hparams.objective == "masked":
            # the whole window [B, L + 1] goes in: the model's positions cover max_len + 1
            inputs, masked = mask_items(
                tokens, self.model.mask_token, self.hparams.mask_prob, self.hparams.mask_last_prob
            )
            hidden, targets = self.model(inputs, gaps)[masked], tokens[masked]  # [N, d], [N]
        else:
            inputs, targets = tokens[:, :-1], tokens[:, 1:]  # [B, L] each: predict the next item
            hidden = self.model(inputs, gaps[:, :-1])  # [B, L, d]
            # no loss where there is nothing to predict (padding) or the input is padding (no context)
            valid = (targets > UNK) & (inputs != PAD)
            hidden, targets = hidden[valid], targets[valid]  # [N, d], [N]
        loss = self.compute_loss(hidden, targets)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(targets))
        return loss

    def compute_loss(self, hidden: Tensor, targets: Tensor) -> Tensor:
        """The configured loss of hidden states ``hidden`` [N, d] predicting products ``targets`` [N]."""
        items = self.model.item_embeddings()
        name, num_negatives = self.hparams.loss, self.hparams.num_negatives
        if name == "softmax":
            return full_softmax(hidden, targets, items)
        if name == "sampled_softmax":
            return sampled_softmax(hidden, targets, items, self.log_q, num_negatives)
        if name == "in_batch":
            return in_batch_softmax(hidden, targets, items, self.log_p)
        if name == "gbce":
            negatives = uniform_negatives(len(items), (len(targets), num_negatives), device=items.device)
            return gbce(hidden, targets, items, negatives, self.hparams.gbce_t)
        negatives = uniform_negatives(len(items), num_negatives, device=items.device)
        return mixed_softmax(hidden, targets, items, self.log_p, negatives)

    @torch.no_grad()
    def top_k(self, item_ids: Tensor, k: int, gaps: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Top-``k`` item rows [B, k] (``recsys.data.vocabulary``) and their scores (inner products) for
        histories ``item_ids`` [B, L] (with their ``gaps`` [B, L] for ``time_gaps`` models)."""
        scores = self.model.encode(item_ids, gaps) @ self.model.item_embeddings()[PRODUCTS].T  # [B, N]
        top = scores.float().topk(min(k, scores.shape[1]), dim=1)
        return top.indices, top.values

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[checkpoints.KEY] = checkpoints.entries(self.vocab, self.products, self.expects_scorer)
        checkpoint[checkpoints.KEY][checkpoints.RNG_KEY] = checkpoints.random_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # a resumed fit continues with the random state of the interrupted one (training/checkpoint.py)
        trainer = self._trainer
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            checkpoints.restore_random_state(checkpoint)

    def _eval_step(self, batch: tuple[Tensor, Tensor, Tensor]) -> None:
        positions, item_ids, gaps = batch  # [B] shoppers' positions in the stage's order, [B, L] each
        rows, scores = self.top_k(item_ids, max(self.ks), gaps)
        self._searched.append((positions, rows, scores))

    def _eval_epoch_end(self, stage: str) -> None:
        positions, rows, scores = (torch.cat(parts) for parts in zip(*self._searched, strict=True))
        self._searched.clear()
        if self.trainer.sanity_checking:
            return
        if self.trainer.world_size > 1:
            positions, rows, scores = self._gathered(positions, rows, scores)
        order = positions.argsort()
        if not torch.equal(positions[order].cpu(), torch.arange(len(positions))):
            raise RuntimeError(f"the {stage} shoppers were not each evaluated exactly once")
        rows, scores = rows[order].cpu().numpy().astype(np.int64), scores[order].float().cpu().numpy()
        # every process ranks all shoppers alike and logs the same figures: their max is each one exactly
        # (a mean over processes could round them)
        metrics = self.trainer.datamodule.evaluate(stage, rows, scores, self.ks)
        figures = {f"{stage}/{name}": float(value) for name, value in metrics.items()}
        self.log_dict(figures, sync_dist=True, reduce_fx="max")

    def _gathered(self, positions: Tensor, rows: Tensor, scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Every process's evaluated shoppers, on every process: an all-gather of per-shopper results
        (padded to the largest share, the padding's position -1 dropped after)."""
        size = torch.tensor([len(positions)], device=self.device)
        largest = int(self.all_gather(size).max())
        pad = largest - len(positions)
        shares = (
            F.pad(positions.to(self.device), (0, pad), value=-1),  # [n_max]
            F.pad(rows.to(self.device), (0, 0, 0, pad), value=-1),  # [n_max, k]
            F.pad(scores.float().to(self.device), (0, 0, 0, pad)),  # [n_max, k]
        )
        positions, rows, scores = (self.all_gather(t).flatten(0, 1) for t in shares)  # [world * n_max, ...]
        kept = positions >= 0
        return positions[kept], rows[kept], scores[kept]

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def optimizer_and_scheduler(
        self, total_steps: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """The configured optimizer over two parameter groups and its per-step scheduler for ``total_steps``.

        Instantiated here, from the plain ``optimizer`` / ``scheduler`` hyperparameters, and nowhere else.
        """
        hparams = self.hparams
        optimizer_config = hparams.get("optimizer") or {
            "_target_": "torch.optim.AdamW",
            "_partial_": True,
            "lr": hparams.lr,
            "betas": [0.9, 0.98],
            "weight_decay": hparams.weight_decay,
        }
        scheduler_config = hparams.get("scheduler") or {
            "_target_": "training.module.warmup_cosine",
            "_partial_": True,
            "warmup_steps": hparams.warmup_steps,
            "min_lr_ratio": 0.1,
        }
        # no weight decay on embeddings, norms and biases: decaying them only shrinks rare items; the other
        # group takes the optimizer's own weight_decay
        decay = [p for n, p in self.named_parameters() if p.ndim >= 2 and "emb" not in n]
        no_decay = [p for n, p in self.named_parameters() if not (p.ndim >= 2 and "emb" not in n)]
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = instantiate(optimizer_config, _convert_="all")(groups)
        scheduler = instantiate(scheduler_config, _convert_="all")(optimizer, total_steps=total_steps)
        return optimizer, scheduler

    def configure_optimizers(self) -> dict[str, Any]:
        total = max(1, int(self.trainer.estimated_stepping_batches))
        optimizer, scheduler = self.optimizer_and_scheduler(total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def module_from_checkpoint(state: dict[str, Any]) -> NextItemModule:
    """The trained module of a checkpoint dictionary (:func:`training.checkpoint.read`), in eval mode.

    Only the project's own models are built: the config's ``name`` is looked up in ``recsys.models``.
    """
    try:
        module = NextItemModule(**state["hyper_parameters"], vocab=checkpoints.vocabulary(state))
    except (TypeError, ValueError) as error:
        raise checkpoints.CheckpointError(f"the checkpoint's hyperparameters are invalid: {error}") from error
    module.products = checkpoints.products(state)
    module.load_state_dict(state["state_dict"])
    return module.eval()


def load_module(path: str | Path) -> NextItemModule:
    """A trained module from the checkpoint file at ``path``."""
    return module_from_checkpoint(checkpoints.read(path))


def save_module(module: NextItemModule, path: str | Path) -> None:
    """Write ``module`` as a checkpoint outside a Lightning run (weights, hyperparameters and this
    project's entries, as a trainer's checkpoint holds them), atomically."""
    state = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}
    module.on_save_checkpoint(state)
    with atomic_path(Path(path)) as tmp:
        torch.save(state, tmp)


def search(
    module: NextItemModule, histories: Histories, wanted: int, batch_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """The model's best ``wanted`` item rows [S, w] and scores [S, w] (inner products) per shopper."""
    inputs, gaps = (torch.from_numpy(a) for a in histories.model_inputs(module.model.config.max_len))
    tops = [
        module.top_k(inputs[start : start + batch_size], wanted, gaps[start : start + batch_size])
        for start in range(0, len(inputs), batch_size)
    ]
    rows = torch.cat([indices for indices, _ in tops]).numpy().astype(np.int64)
    return rows, torch.cat([scores for _, scores in tops]).numpy()


def ranked_products(
    vocab: Vocabulary,
    histories: Histories,
    rows: np.ndarray,
    scores: np.ndarray,
    rules: Rules,
    scorer: Ranker | None = None,
) -> np.ndarray:
    """Product ids [S, k] (-1 padding) from a model's searched item rows and scores [S, C]: the one scorer
    (``recsys.scoring.recommend``) with ``rules`` and ``scorer``, the popularity fallback included."""
    fallback = popularity_order(vocab.product_ids, vocab.popularity)
    ranked = score_candidates(histories, rows, scores, rules, scorer, fallback, vocab.popularity)
    return vocab.product_ids_of(ranked.rows)


def recommend(
    module: NextItemModule, histories: Histories, rules: Rules, scorer: Ranker | None = None
) -> np.ndarray:
    """Ranked product ids [S, k] (-1 padding) for ``histories``, as serving would rank them: the module's
    exact search, then :func:`ranked_products`."""
    wanted = max(1, search_size(histories, rules, scorer, module.vocab.num_products))
    rows, scores = search(module, histories, wanted)
    return ranked_products(module.vocab, histories, rows, scores, rules, scorer)
