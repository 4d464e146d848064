"""Prototypical networks (Snell et al. 2017): classify by distance to support-set class means."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from metalearn import registry
from metalearn.algorithms.base import AlgoConfig, LossFn, make_algorithm
from metalearn.models import Model
from metalearn.types import Algorithm


@dataclass
class ProtoNetConfig(AlgoConfig):
    norms: ClassVar[tuple[str, ...]] = ("transductive", "inductive")
    any_way: ClassVar[bool] = True
    kinds: ClassVar[tuple[str, ...]] = ("classification",)

    name: str = "protonet"


def prototypes(embeddings: jax.Array, labels: jax.Array, n_way: int) -> jax.Array:
    """Mean embedding per class: [n_way, D]."""
    one_hot = jax.nn.one_hot(labels, n_way)  # [S, N]
    return (one_hot.T @ embeddings) / one_hot.sum(0)[:, None]


def squared_distance_logits(queries: jax.Array, protos: jax.Array) -> jax.Array:
    """-||q - c||^2 for every query and prototype: [Q, N]."""
    return -(
        jnp.sum(queries**2, -1, keepdims=True)
        - 2 * queries @ protos.T
        + jnp.sum(protos**2, -1)[None, :]
    )


def make(cfg: ProtoNetConfig, model: Model, loss_fn: LossFn, n_out: int, **_) -> Algorithm:
    def init(key):
        return model.init(key, None)  # prototypes replace the classifier

    def adapt(meta_params, support, key, inner_steps=0):
        return prototypes(model.embed(meta_params, support.x), support.y, n_out)

    def predict(meta_params, protos, x):
        return squared_distance_logits(model.embed(meta_params, x), protos)

    return make_algorithm(init, adapt, predict, loss_fn)


registry.register("algo", "protonet", ProtoNetConfig, make)
