"""The project's shopper encoders, by the name a config or a checkpoint gives them.

A checkpoint names its model by one of these keys, never by an importable path, so reading one can only
build the project's own classes (``training.checkpoint``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from recsys.models.bert4rec import BERT4RecConfig
from recsys.models.gru4rec import GRU4RecConfig
from recsys.models.sasrec import SASRecConfig
from recsys.models.two_tower import TwoTowerConfig

MODELS: dict[str, type] = {
    "sasrec": SASRecConfig,
    "gru4rec": GRU4RecConfig,
    "bert4rec": BERT4RecConfig,
    "two_tower": TwoTowerConfig,
}


def model_config(net: dict[str, Any]) -> Any:
    """The config dataclass of a model config ``{"name": <key of MODELS>, **fields}``.

    Raises ValueError for an unknown name (listing the known ones) or a config without one.
    """
    name = net.get("name")
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"unknown model {name!r}; the known models are {sorted(MODELS)}")
    return MODELS[name](**{k: v for k, v in net.items() if k != "name"})


def build_model(net: dict[str, Any]) -> nn.Module:
    """A model from its plain config (see :func:`model_config`)."""
    return model_config(net).build()
