"""R2-D2 (Bertinetto et al. 2019): a closed-form ridge-regression head on the embedding.

Per task, the head W solves min_W ||X W - Y||^2 + lambda ||W||^2 on the support features X [S, D]
and one-hot labels Y [S, N]: W = X^T (X X^T + lambda I_S)^-1 Y (the Woodbury form, an S x S
solve, since S << D in few-shot episodes). Queries get logits alpha * (x W) + beta, with alpha
and beta learned scalars that calibrate the regression outputs for the cross-entropy, and
lambda learned too (as log lambda). The solve is differentiable, so the embedding is trained
through it end to end, with no inner gradient steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from metalearn import registry
from metalearn.algorithms.base import AlgoConfig, LossFn, make_algorithm, split_outputs
from metalearn.checks import positive
from metalearn.models import Model
from metalearn.types import Algorithm


@dataclass
class R2D2Config(AlgoConfig):
    norms: ClassVar[tuple[str, ...]] = ("transductive", "inductive")
    any_way: ClassVar[bool] = True
    kinds: ClassVar[tuple[str, ...]] = ("classification",)
    reads_padded: ClassVar[bool] = True

    name: str = "r2d2"
    ridge: float = 1.0  # lambda at the start; learned unless learn_ridge=false
    learn_ridge: bool = True
    scale: float = 1.0  # alpha at the start: logits = alpha * x W + beta (both learned)

    def __post_init__(self) -> None:
        positive("algo.ridge", self.ridge)
        positive("algo.scale", self.scale)


def ridge_head(features: jax.Array, targets: jax.Array, ridge) -> jax.Array:
    """W [D, N] minimising ||features W - targets||^2 + ridge ||W||^2, by an S x S solve."""
    gram = features @ features.T + ridge * jnp.eye(features.shape[0], dtype=features.dtype)
    return features.T @ jnp.linalg.solve(gram, targets)


def make(cfg: R2D2Config, model: Model, loss_fn: LossFn, n_out: int, **_) -> Algorithm:
    def init(key):
        return {
            "embed": model.init(key, None),
            "log_ridge": jnp.asarray(math.log(cfg.ridge), jnp.float32),
            "scale": jnp.asarray(cfg.scale, jnp.float32),
            "bias": jnp.zeros((), jnp.float32),
        }

    def ridge(meta_params):
        log_ridge = meta_params["log_ridge"]
        return jnp.exp(log_ridge if cfg.learn_ridge else jax.lax.stop_gradient(log_ridge))

    def adapt(meta_params, support, key, inner_steps=0):
        features = split_outputs(lambda x: model.embed(meta_params["embed"], x), support)
        targets = jax.nn.one_hot(support.y, n_out)
        if support.mask is not None:
            # Zero rows of padding leave the solution for the real rows as it is: the Gram
            # matrix is block diagonal and the padding's block solves to zero weights.
            real = support.mask[:, None]
            features, targets = features * real, targets * real
        return ridge_head(features, targets, ridge(meta_params))

    def predict(meta_params, head, x):
        features = model.embed(meta_params["embed"], x)
        return meta_params["scale"] * (features @ head) + meta_params["bias"]

    return make_algorithm(init, adapt, predict, loss_fn)


registry.register("algo", "r2d2", R2D2Config, make)
