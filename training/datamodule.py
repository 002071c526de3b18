"""Receipts -> training windows and evaluation inputs, following the evaluation protocol.

The test split is docs/evaluation.md's (cutoff, vocabulary, next-basket targets). Model selection never
sees it: with ``val_days > 0`` the model trains on data before ``cutoff - val_days`` and is validated
on the next basket after that earlier cutoff; the test inputs are then histories up to the real cutoff.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from recsys.data.features import ProductFeatures, product_metadata
from recsys.data.sequences import Sequences, build_sequences, concat_ranges, training_windows
from recsys.data.split import next_basket_targets, parse_cutoff, temporal_split
from recsys.data.vocabulary import Vocabulary
from recsys.evaluation.protocol import EvaluationData, evaluate, evaluated_histories, prepare
from recsys.inputs import Histories
from recsys.rules import Rules
from training.module import ranked_products


class Batch(NamedTuple):
    """One training batch's identity and content: batch ``number`` of ``epoch`` (which seeds its basket
    shuffle) and its windows ``(start, end)``."""

    epoch: int
    number: int
    windows: list[tuple[int, int]]


class EpochBatches(Sampler):
    """Batches of training-window indices whose order is a function of ``(seed, epoch)`` only.

    A resumed epoch therefore sees the same batches as the uninterrupted one, and continues after the ones
    already trained: ``position`` (given by the data module while a trainer runs) says where the fit is,
    ``(epoch, batches of it already trained)``, when iteration starts; without it, the epoch is the last
    :meth:`set_epoch` and iteration starts at the first batch. Yields :class:`Batch` keys without windows
    (:class:`TrainingWindows` fills them in); no global random state is read or advanced.

    Distributed (``world`` processes), process ``rank`` takes batches ``rank, rank + world, ...`` of the
    epoch's one order, so the processes train on disjoint batches and ``batch_size`` is per process. Every
    process must run the same number of steps, so an epoch's last ``len % world`` batches are left out
    (a different few each epoch, as the order changes); one process takes every batch.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        drop_last: bool,
        seed: int,
        position: Callable[[], tuple[int, int]] | None = None,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not one of the {world} processes")
        self.size, self.batch_size, self.drop_last, self.seed = size, batch_size, drop_last, seed
        self.position, self.epoch, self.rank, self.world = position, 0, rank, world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches this process trains per epoch."""
        full, rest = divmod(self.size, self.batch_size)
        return (full if self.drop_last or rest == 0 else full + 1) // self.world

    def order(self, epoch: int) -> np.ndarray:
        """The window indices of ``epoch`` in training order."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def __iter__(self) -> Iterator[tuple[int, int, np.ndarray]]:
        epoch, done = self.position() if self.position is not None else (self.epoch, 0)
        if done >= len(self):  # a fit resumed from the end of an epoch continues with the next one
            epoch, done = epoch + 1, 0
        order = self.order(epoch)
        for step in range(done, len(self)):
            number = step * self.world + self.rank  # the epoch's batch this process trains at this step
            yield epoch, number, order[number * self.batch_size : (number + 1) * self.batch_size]


class TrainingWindows(Dataset):
    """The training windows, fetched a batch at a time from :class:`EpochBatches` keys."""

    def __init__(self, windows: list[tuple[int, int]]) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> tuple[int, int]:
        return self.windows[index]

    def __getitems__(self, key: tuple[int, int, np.ndarray]) -> Batch:
        epoch, number, indices = key
        return Batch(epoch, number, [self.windows[i] for i in indices.tolist()])


class WindowBatches:
    """Collates windows of item sequences into left-padded ``[B, max_len + 1]`` token and gap matrices.

    Receipts list a basket's items in product-id order, an artefact a sequence model would learn; with
    ``shuffle_baskets`` the items of each basket are put in a fresh random order in every batch: for a
    :class:`Batch`, an order drawn from ``(seed, epoch, batch number)``, so a resumed run shuffles alike;
    for a plain list of windows, from one generator seeded with ``seed``. Gaps (``Sequences.gaps``)
    belong to positions, not items: a basket's first position keeps the gap to the previous basket and
    the others 0 whatever the order, so they are read before the shuffle.
    """

    def __init__(self, sequences: Sequences, max_len: int, shuffle_baskets: bool, seed: int) -> None:
        self.sequences, self.max_len, self.shuffle_baskets = sequences, max_len, shuffle_baskets
        self.gaps = sequences.gaps()
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def __call__(self, windows: Batch | list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        rng = self.rng
        if isinstance(windows, Batch):
            rng = np.random.default_rng([self.seed, windows.epoch, windows.number])
            windows = windows.windows
        starts, ends = np.asarray(windows, dtype=np.int64).T
        lengths = ends - starts
        flat = concat_ranges(starts, lengths)  # positions into the flat sequence arrays
        row = np.repeat(np.arange(len(windows)), lengths)
        width = self.max_len + 1
        col = width - lengths[row] + concat_ranges(np.zeros_like(lengths), lengths)
        gaps = np.zeros((len(windows), width), dtype=np.float32)
        gaps[row, col] = self.gaps[flat]
        if self.shuffle_baskets:
            # sort by (row, basket, random key): basket order kept, items inside a basket permuted
            flat = flat[np.lexsort((rng.random(len(flat)), self.sequences.basket[flat], row))]
        tokens = np.zeros((len(windows), width), dtype=np.int64)
        tokens[row, col] = self.sequences.items[flat]
        return torch.from_numpy(tokens), torch.from_numpy(gaps)


class ReceiptsDataModule(pl.LightningDataModule):
    """Temporal split, vocabulary, training windows and validation/test inputs for next-item models.

    ``products`` (optional) loads a products table whose ``product_features`` columns, plus with
    ``price_bands`` > 1 a band of the median receipt price, become item feature codes for models with
    an item tower (:meth:`item_features`); models without one never load it.
    """

    def __init__(
        self,
        receipts: Callable[[], pa.Table],
        cutoff: str,
        timezone: str,
        min_baskets: int = 5,
        val_days: int = 28,
        horizon_days: float | None = None,
        max_len: int = 50,
        batch_size: int = 128,
        eval_batch_size: int = 1024,
        shuffle_baskets: bool = True,
        num_workers: int = 0,
        seed: int = 0,
        products: Callable[[], pa.Table] | None = None,
        product_features: Sequence[str] = (),
        price_bands: int = 0,
    ) -> None:
        super().__init__()
        self.load_receipts, self.load_products = receipts, products
        self.product_features, self.price_bands = list(product_features), price_bands
        self.cutoff = parse_cutoff(cutoff, timezone)
        self.timezone, self.min_baskets, self.val_days = timezone, min_baskets, val_days
        # target = first basket after the cutoff, or every basket within this many days of it
        self.horizon = timedelta(days=horizon_days) if horizon_days else None
        self.max_len, self.batch_size, self.eval_batch_size = max_len, batch_size, eval_batch_size
        self.shuffle_baskets, self.num_workers, self.seed = shuffle_baskets, num_workers, seed
        self.test_data: EvaluationData | None = None
        self.val_data: EvaluationData | None = None
        self._histories: dict[str, Histories] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.test_data is not None:
            return
        self.test_data = prepare(self.load_receipts(), self.cutoff, self.min_baskets, self.horizon)
        fit_rows = self.test_data.train
        if self.val_days > 0:
            val_cutoff = self.cutoff - timedelta(days=self.val_days)
            fit_rows, val_rows = temporal_split(fit_rows, val_cutoff)
            targets = next_basket_targets(fit_rows, val_rows, self.vocab, self.horizon)
            self.val_data = EvaluationData(val_cutoff, fit_rows, self.vocab, targets)
        self._train_on(fit_rows)

    def _train_on(self, rows: pa.Table) -> None:
        self.train_sequences = build_sequences(rows, self.vocab)
        starts, ends = training_windows(self.train_sequences, self.max_len)
        self.windows = list(zip(starts.tolist(), ends.tolist(), strict=True))

    def before(self, moment: datetime) -> ReceiptsDataModule:
        """A copy that trains on this module's training receipts strictly before ``moment`` alone, with the
        same vocabulary and no validation: a network that must know nothing from ``moment`` on (the
        ranker's network for its internal cutoffs, ``ranker.cutoff_network``)."""
        self.setup("fit")
        rows = (self.val_data or self.test_data).train
        earlier = copy.copy(self)
        earlier.val_data, earlier._histories = None, {}
        earlier._train_on(temporal_split(rows, moment)[0])
        if not earlier.windows:
            raise ValueError(f"no training receipts before {moment.isoformat()}")
        return earlier

    @property
    def vocab(self) -> Vocabulary:
        if self.test_data is None:
            raise RuntimeError("call setup() first")
        return self.test_data.vocab

    def item_features(self) -> tuple[ProductFeatures, np.ndarray] | None:
        """Feature mappings fitted on the vocabulary's products and their codes [V, F] (vocabulary order).

        Prices come from the receipts the vocabulary is built from (before the test cutoff). ``None``
        without a ``products`` loader.
        """
        if self.load_products is None:
            return None
        if self.test_data is None:
            raise RuntimeError("call setup() first")
        products, receipts = self.load_products(), self.test_data.train
        features = ProductFeatures.fit(
            products, self.vocab.product_ids, self.product_features, receipts, self.price_bands
        )
        return features, features.vocabulary_codes(self.vocab, products, receipts)

    def product_metadata(self) -> pa.Table | None:
        """The products table's rows for the vocabulary's products, in vocabulary order (``product_id``
        then the table's other columns), or None without a ``products`` loader: checkpoints keep it, so
        an exported bundle carries the metadata of the data its model was trained on."""
        if self.load_products is None:
            return None
        return product_metadata(self.load_products(), self.vocab.product_ids)

    def describe(self) -> dict[str, Any]:
        """Plain description of the data protocol, stored in checkpoints."""
        return {
            "cutoff": self.cutoff.isoformat(),
            "timezone": self.timezone,
            "min_baskets": self.min_baskets,
            "val_days": self.val_days,
            "horizon_days": self.horizon / timedelta(days=1) if self.horizon else None,
            "max_len": self.max_len,
            "train_windows": len(self.windows),
        }

    def train_dataloader(self) -> DataLoader:
        """Batches in an order that is a function of ``(seed, epoch)`` (:class:`EpochBatches`): the same
        seed and config give the same batches, and a fit resumed mid-epoch continues with the batches the
        interrupted one had not trained yet. The loader's own generator seeds workers, so iterating it
        leaves torch's global random state (dropout, negatives, masks) alone."""
        collate = WindowBatches(self.train_sequences, self.max_len, self.shuffle_baskets, self.seed)
        rank, world = self._process()
        sampler = EpochBatches(
            len(self.windows),
            self.batch_size,
            len(self.windows) > self.batch_size,
            self.seed,
            self._position(),
            rank,
            world,
        )
        return DataLoader(
            TrainingWindows(self.windows),
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _process(self) -> tuple[int, int]:
        """(rank, number of processes) of the attached trainer; (0, 1) outside one.

        The loaders split the work across processes themselves (:class:`EpochBatches`, :meth:`_eval_loader`),
        so a distributed trainer must not inject its own sampler (``conf/trainer/ddp.yaml``)."""
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return 0, 1
        if trainer._accelerator_connector.use_distributed_sampler:
            raise ValueError(
                "distributed training needs trainer.use_distributed_sampler=false (trainer=ddp sets it): "
                "the data module shards training batches and evaluated shoppers by rank itself, and a "
                "DistributedSampler would pad the evaluation with duplicate shoppers"
            )
        return trainer.global_rank, trainer.world_size

    def _position(self) -> Callable[[], tuple[int, int]] | None:
        """Where the attached trainer's fit is: (epoch, batches of it already trained), as Lightning's
        progress counters say (restored from the checkpoint on resume); None outside a trainer."""
        trainer = self.trainer
        if trainer is None:
            return None

        def position() -> tuple[int, int]:
            loop = trainer.fit_loop
            return loop.epoch_progress.current.processed, loop.epoch_loop.batch_progress.current.processed

        return position

    def histories(self, stage: str) -> Histories:
        """The evaluated shoppers of ``"val"`` or ``"test"``: their training histories before the stage's
        cutoff, through the model-input front-end serving uses (``recsys.inputs``)."""
        data = self.val_data if stage == "val" else self.test_data
        if data is None:
            raise RuntimeError(f"no {stage} split: call setup() first (and set val_days > 0 for val)")
        if stage not in self._histories:
            self._histories[stage] = evaluated_histories(data, self.vocab)
        return self._histories[stage]

    def _eval_loader(self, stage: str) -> DataLoader:
        """Batches of (shopper position, item ids, gaps) of the stage's shoppers; with several processes,
        this process's share (positions ``rank, rank + world, ...``): every shopper is evaluated by exactly
        one process, and the positions let the module put the results back in order
        (``NextItemModule._gathered``)."""
        items, gaps = self.histories(stage).model_inputs(self.max_len)
        rank, world = self._process()
        positions = np.arange(rank, len(items), world)
        dataset = TensorDataset(
            torch.from_numpy(positions), torch.from_numpy(items[positions]), torch.from_numpy(gaps[positions])
        )
        return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        # no validation split (val_days=0): Lightning skips validation given no loaders
        return [] if self.val_data is None else self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def rank(self, stage: str, rows: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
        """Product ids [n, k] (-1 padding) of the ``"val"`` or ``"test"`` shoppers from the model's searched
        item rows and scores [n, >= k], ranked by the one scorer serving uses (``recsys.scoring``): a
        shopper without a known product gets the popularity fallback here too."""
        return ranked_products(
            self.vocab, self.histories(stage), rows, scores, Rules(k=k, repeat_aware=False)
        )

    def evaluate(
        self, stage: str, rows: np.ndarray, scores: np.ndarray, ks: tuple[int, ...]
    ) -> dict[str, float]:
        """Protocol metrics of :meth:`rank` for the ``"val"`` or ``"test"`` shoppers."""
        data = self.val_data if stage == "val" else self.test_data
        if data is None:
            raise RuntimeError(f"no {stage} split to evaluate")
        if len(rows) != len(data.targets.shopper_ids):
            raise ValueError(
                f"{len(rows)} ranked shoppers for the {len(data.targets.shopper_ids)} of the {stage} split"
            )
        return evaluate(self.rank(stage, rows, scores, max(ks)), data, ks)
