"""The model protocol: (init, apply, embed, head, groups) over a parameter pytree.

A model maps x [B, ...] to outputs [B, n_out] as embed (features [B, D]) then head. Algorithms
never read a model's parameter layout: they ask `groups` for a label per leaf ("head",
"blocks.0", "blocks.1", ..., "other") and select by label (metalearn/models/groups.py), so any
model, built in or a Flax module (model=flax), serves MAML's adaptation masks, fine-tuning's
frozen and decayed blocks, head re-initialisation and init_from alike. Model state (batch-norm
running statistics) is parameters labelled "state" (metalearn/models/norm.py); randomness
(dropout) comes from a trace-time key stream that the train step opens for each task
(metalearn/models/randomness.py), so neither needs an argument in the protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import jax
import numpy as np
from omegaconf import MISSING

from metalearn import registry

Params = Any


class Model(NamedTuple):
    # (key, n_out) -> params; n_out=None: features only (no head), for metric learners
    init: Callable[[jax.Array, int | None], Params]
    apply: Callable[[Params, jax.Array], jax.Array]  # (params, x [B, ...]) -> outputs [B, n_out]
    # (params, x, hook=None) -> features [B, D]; hook(i, h) transforms block i's output
    # (channels last), which is how task conditioning reaches inside any model.
    embed: Callable[..., jax.Array]
    head: Callable[[Params, jax.Array], jax.Array]  # (params, features [B, D]) -> [B, n_out]
    groups: Callable[[Params], Any]  # params -> the same tree of group labels (strings)
    input_shape: tuple[int, ...] = ()  # one example's shape, as the model was made for


def feature_size(model: Model) -> int:
    """D of the model's features [B, D], from an abstract forward pass."""
    params = jax.eval_shape(lambda key: model.init(key, None), jax.random.PRNGKey(0))
    x = jax.ShapeDtypeStruct((1, *model.input_shape), np.float32)
    return jax.eval_shape(model.embed, params, x).shape[-1]


@dataclass
class ModelConfig:
    """Base of every model's schema (a dataclass per option, beside the model's code).

    inputs: the kinds of data inputs the model takes ("images" [H, W, C], "vectors" [D]).
    reads_padded: its batch norms (if any) take their statistics over the real examples of a
        padded split (norm.examples), so it can train on padded episodes (DataConfig.padded).
    """

    inputs: ClassVar[tuple[str, ...]] = ("images", "vectors")
    reads_padded: ClassVar[bool] = False
    name: str = MISSING


def make_model(cfg, input_shape: tuple[int, ...]) -> Model:
    """The model of `cfg` (any registered model schema) for inputs of `input_shape`."""
    return registry.make_of("model", cfg)(cfg, input_shape)


def num_params(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
