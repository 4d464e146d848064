"""Model registry: each model is (init, apply, embed) over a parameter pytree.

Every model's params are {"blocks": [...], "head": {...}}: the trunk as an ordered list of blocks
(so fine-tuning can freeze or decay by depth) and a linear head on the embedding.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import numpy as np

from metalearn.config import ModelConfig


class Model(NamedTuple):
    init: Callable[[jax.Array, int], dict]  # (key, n_out) -> params
    apply: Callable[[dict, jax.Array], jax.Array]  # (params, x [B, ...]) -> outputs [B, n_out]
    # (params, x, hook=None) -> features [B, D]; hook(i, h) -> h transforms block i's output
    # (channels last), which is how task conditioning reaches inside any model.
    embed: Callable[..., jax.Array]


def make_model(cfg: ModelConfig, input_shape: tuple[int, ...]) -> Model:
    if cfg.name == "mlp":
        from metalearn.models import mlp

        return Model(
            init=partial(
                mlp.init,
                in_features=int(np.prod(input_shape)),
                hidden=cfg.hidden,
                layers=cfg.layers,
            ),
            apply=mlp.apply,
            embed=mlp.embed,
        )
    if cfg.name == "conv4":
        from metalearn.models import conv4

        return Model(
            init=partial(
                conv4.init,
                in_channels=input_shape[-1],
                hidden=cfg.hidden,
                downsample=cfg.downsample,
                image_size=input_shape[0],
            ),
            apply=partial(conv4.apply, downsample=cfg.downsample),
            embed=partial(conv4.embed, downsample=cfg.downsample),
        )
    raise ValueError(f"unknown model {cfg.name!r}")


def num_params(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
