"""Prototypical networks (Snell et al. 2017): classify by distance to support-set class means."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from metalearn import registry
from metalearn.algorithms.base import AlgoConfig, LossFn, make_algorithm, split_outputs
from metalearn.models import Model
from metalearn.types import Algorithm


@dataclass
class ProtoNetConfig(AlgoConfig):
    norms: ClassVar[tuple[str, ...]] = ("transductive", "inductive")
    any_way: ClassVar[bool] = True
    kinds: ClassVar[tuple[str, ...]] = ("classification",)
    reads_padded: ClassVar[bool] = True

    name: str = "protonet"


def prototypes(
    embeddings: jax.Array, labels: jax.Array, n_way: int, mask: jax.Array | None = None
) -> jax.Array:
    """Mean embedding per class over the real examples: [n_way, D] (zero for a class the
    support set lacks, whose logits the loss masks)."""
    one_hot = jax.nn.one_hot(labels, n_way)  # [S, N]
    if mask is not None:
        one_hot = one_hot * mask[:, None]
    return (one_hot.T @ embeddings) / jnp.maximum(one_hot.sum(0), 1)[:, None]


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
        embeddings = split_outputs(lambda x: model.embed(meta_params, x), support)
        return prototypes(embeddings, support.y, n_out, support.mask)

    def predict(meta_params, protos, x):
        return squared_distance_logits(model.embed(meta_params, x), protos)

    return make_algorithm(init, adapt, predict, loss_fn)


registry.register("algo", "protonet", ProtoNetConfig, make)
