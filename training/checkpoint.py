"""The checkpoint format: the only code that writes or reads Caddie's part of a Lightning checkpoint.

A checkpoint holds plain values only, so ``torch.load(path, weights_only=True)`` reads it and nothing in
it can name code to run:

- ``state_dict`` and Lightning's training state (optimizer, schedulers, loops), as Lightning writes them;
- ``hyper_parameters``: the module's arguments, among them the model config ``net`` whose ``name`` is a
  key of :data:`recsys.models.MODELS` (never an importable path), and the data protocol (``data``);
- ``caddie``: this module's entries: the format version, the vocabulary (product ids and popularity, kept
  out of the hyperparameters so logged configs stay small), the product metadata of the vocabulary's
  products (parquet bytes, or none), whether the run was to fit a ranker, and that ranker once fitted
  (``ranker``: its plain settings, LightGBM's text model and per-item tensors, ``recsys.ranker``), and
  torch's random state when the checkpoint was written (``rng``: a fit resumed from it draws the same
  dropout, negatives and masks as the uninterrupted one).

Writes are atomic (a temporary file beside the target, flushed, then renamed), whoever writes:
:class:`AtomicCheckpointIO` serves Lightning, :func:`write_scorer` the ranker's fit. Reading refuses
files over :data:`MAX_CHECKPOINT_BYTES`, other formats, and unknown models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pytorch_lightning.plugins import TorchCheckpointIO

from recsys.data.vocabulary import Vocabulary
from recsys.io import atomic_path
from recsys.ranker import Ranker

KEY = "caddie"
# The only code a checkpoint's hyperparameters may name: the training schedule (the optimizer may be any
# torch.optim class). They are instantiated only when training resumes or fine-tunes, never to load.
SAFE_TARGETS = frozenset({"training.module.warmup_cosine"})
FORMAT_VERSION = 1
SCORER_KEY = "ranker"
OLD_SCORER_KEY = "repeat_scorer"  # the logistic-regression scorer before the ranker: refused, refit
RNG_KEY = "rng"
MAX_CHECKPOINT_BYTES = 16 << 30


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted or used; the message names the file and the problem."""


def entries(vocab: Vocabulary, products: pa.Table | None, expects_scorer: bool) -> dict[str, Any]:
    """This module's entries of a new checkpoint (``products``: metadata rows in vocabulary order)."""
    metadata = None
    if products is not None:
        sink = pa.BufferOutputStream()
        pq.write_table(products, sink)
        metadata = sink.getvalue().to_pybytes()
    return {
        "format_version": FORMAT_VERSION,
        "vocabulary": vocab.to_dict(),
        "products": metadata,
        "expects_scorer": expects_scorer,
    }


def random_state() -> dict[str, Any]:
    """Torch's random state now (CPU, and every CUDA device if there is one), as plain tensors."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_random_state(checkpoint: dict[str, Any]) -> None:
    """Set torch's random state to the one a checkpoint dictionary recorded (nothing if it has none)."""
    state = (checkpoint.get(KEY) or {}).get(RNG_KEY)
    if not state:
        return
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def read(path: str | Path) -> dict[str, Any]:
    """A checkpoint's dictionary on the CPU, read with ``weights_only=True`` (no pickled code), with its
    format checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.stat().st_size > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(f"{path} is larger than the {MAX_CHECKPOINT_BYTES}-byte checkpoint limit")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise CheckpointError(f"{path} is not a readable checkpoint: {error}") from error
    ours = state.get(KEY) if isinstance(state, dict) else None
    if not isinstance(ours, dict) or ours.get("format_version") != FORMAT_VERSION:
        found = ours.get("format_version") if isinstance(ours, dict) else None
        raise CheckpointError(
            f"{path} is not a Caddie checkpoint of format {FORMAT_VERSION} (found {found!r}); "
            "retrain with this version"
        )
    for key in ("hyper_parameters", "state_dict"):
        if not isinstance(state.get(key), dict):
            raise CheckpointError(f"{path} has no {key!r}")
    for where, target in _targets(state["hyper_parameters"], "hyper_parameters"):
        if target not in SAFE_TARGETS and not _is_torch_optimizer(target):
            raise CheckpointError(
                f"{path}: {where} names {target!r}; a checkpoint may name no code but a torch.optim "
                f"optimizer and {sorted(SAFE_TARGETS)} (models are named by recsys.models.MODELS keys)"
            )
    return state


def _targets(value: Any, where: str) -> list[tuple[str, str]]:
    """Every ``_target_`` (Hydra's name of code to call) in a nest of dicts and lists, with its place."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "_target_":
                found.append((where, str(item)))
            else:
                found += _targets(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found += _targets(item, f"{where}[{i}]")
    return found


def _is_torch_optimizer(target: str) -> bool:
    """``torch.optim.<Name>`` naming an optimizer class (looked up, never imported from elsewhere)."""
    name = target.removeprefix("torch.optim.")
    found = getattr(torch.optim, name, None) if name != target and name.isidentifier() else None
    return isinstance(found, type) and issubclass(found, torch.optim.Optimizer)


def vocabulary(state: dict[str, Any]) -> Vocabulary:
    """The vocabulary of a checkpoint read by :func:`read`."""
    try:
        return Vocabulary.from_dict(state[KEY]["vocabulary"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"the checkpoint's vocabulary is invalid: {error}") from error


def products(state: dict[str, Any]) -> pa.Table | None:
    """Product metadata of the checkpoint's training data, one row per vocabulary product, or None."""
    metadata = state[KEY].get("products")
    if metadata is None:
        return None
    if not isinstance(metadata, bytes):
        raise CheckpointError("the checkpoint's product metadata is not parquet bytes")
    try:
        return pq.read_table(pa.BufferReader(metadata))
    except (pa.ArrowInvalid, OSError) as error:
        raise CheckpointError(f"the checkpoint's product metadata cannot be read: {error}") from error


def scorer(state: dict[str, Any]) -> Ranker | None:
    """The ranker of a checkpoint, or None if none was fitted."""
    data = state[KEY].get(SCORER_KEY)
    if data is None:
        if state[KEY].get(OLD_SCORER_KEY) is not None:
            raise CheckpointError(
                "the checkpoint holds the logistic-regression scorer of an earlier version, which the "
                "ranker replaced: refit it with python -m training.rank checkpoint=..."
            )
        return None
    try:
        items = {name: np.asarray(values) for name, values in data["items"].items()}
        return Ranker.from_parts(data["settings"], data["model"], items)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"the checkpoint's {SCORER_KEY} is invalid: {error}") from error


def expects_scorer(state: dict[str, Any]) -> bool:
    """Whether the run that wrote the checkpoint was to fit a ranker into it."""
    return bool(state[KEY].get("expects_scorer"))


def write_scorer(path: str | Path, fitted: Ranker, state: dict[str, Any]) -> None:
    """Add ``fitted`` to the checkpoint dictionary ``state`` and write it to ``path``, atomically."""
    updated = dict(state)
    entry = {
        "settings": fitted.to_dict(),
        "model": fitted.model,
        "items": {
            name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in fitted.item_columns().items()
        },
    }
    ours = {key: value for key, value in state[KEY].items() if key != OLD_SCORER_KEY}
    updated[KEY] = {**ours, SCORER_KEY: entry}
    with atomic_path(Path(path)) as tmp:
        torch.save(updated, tmp)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic: a kill mid-save leaves the previous file whole.

    Lightning's own writer opens the target and streams into it, so a kill mid-copy truncates the last
    good ``best.ckpt``; here the bytes go to a temporary file in the target's directory (never another
    device), are flushed to disk, then renamed over the target.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        with atomic_path(Path(path)) as tmp:
            torch.save(checkpoint, tmp)
