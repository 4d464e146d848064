"""The Conditional Neural Process (Garnelo et al. 2018): a Gaussian predictive from one pass.

An encoder MLP maps each context pair (x_i, y_i) to r_i; their mean over the real context points
(masked, so padding and order change nothing) is the task representation r; a decoder MLP maps
(r, x) to the mean and std of a Gaussian over y, the std bounded below as Le et al. 2018 do,
std = min_std + (1 - min_std) softplus(raw), so the likelihood cannot diverge on a near-exact
fit. Training maximises the log-likelihood of the targets, which as in the paper include the
context points (context_in_targets); meta-test scores the held-out query points. No gradient
steps run at adaptation; the model group is not used (the MLPs are this learner's own, sized by
its settings).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from metalearn import registry
from metalearn.algorithms.base import (
    AlgoConfig,
    make_algorithm,
    masked_mean,
    split_loss,
    task_loss_fn,
)
from metalearn.checks import MAX_DEPTH, at_most, require, width
from metalearn.models import Model
from metalearn.types import Algorithm, Split


@dataclass
class CNPConfig(AlgoConfig):
    kinds: ClassVar[tuple[str, ...]] = ("regression",)
    reads_padded: ClassVar[bool] = True
    predictive: ClassVar[str] = "gaussian"

    name: str = "cnp"
    hidden: int = 128  # units of every hidden layer
    encoder_layers: int = 3  # hidden layers of the encoder MLP of (x, y)
    decoder_layers: int = 2  # hidden layers of the decoder MLP of (r, x)
    representation: int = 128  # size of r
    min_std: float = 0.1  # the predictive std's lower bound (Le et al. 2018)
    context_in_targets: bool = True  # train on the context points too, as Garnelo et al.

    def __post_init__(self) -> None:
        width("algo.hidden", self.hidden)
        width("algo.representation", self.representation)
        for key in ("encoder_layers", "decoder_layers"):
            value = getattr(self, key)
            require(value >= 0, f"algo.{key}={value} is not allowed: it must be >= 0.")
            at_most(f"algo.{key}", value, MAX_DEPTH)
        require(
            0 <= self.min_std < 1,
            f"algo.min_std={self.min_std} is not allowed: the predictive std is min_std + "
            "(1 - min_std) softplus(.), so min_std must be in [0, 1).",
        )


def mlp_init(key: jax.Array, sizes: list[int]) -> list[dict]:
    """Dense layers sizes[0] -> ... -> sizes[-1]: LeCun-normal weights, zero biases."""
    keys = jax.random.split(key, len(sizes) - 1)
    dense = jax.nn.initializers.lecun_normal()
    return [
        {"w": dense(k, (fan_in, fan_out)), "b": jnp.zeros((fan_out,))}
        for k, fan_in, fan_out in zip(keys, sizes[:-1], sizes[1:])
    ]


def mlp_apply(layers: list[dict], h: jax.Array) -> jax.Array:
    """ReLU between the layers, none after the last."""
    for i, layer in enumerate(layers):
        h = h @ layer["w"] + layer["b"]
        if i < len(layers) - 1:
            h = jax.nn.relu(h)
    return h


def pairs(split: Split) -> jax.Array:
    """[n, x_dim + y_dim]: each example's input and target, flattened side by side."""
    n = len(split.x)
    return jnp.concatenate([split.x.reshape(n, -1), split.y.reshape(n, -1)], -1)


def bounded_std(raw: jax.Array, min_std: float) -> jax.Array:
    return min_std + (1 - min_std) * jax.nn.softplus(raw)


def all_targets(task) -> Split:
    """The context and the query points as one padded split (masks of all True when unpadded)."""
    s, q = task.support, task.query

    def mask(split):
        return jnp.ones(len(split.x), bool) if split.mask is None else split.mask

    masks = jnp.concatenate([mask(s), mask(q)])
    return Split(jnp.concatenate([s.x, q.x]), jnp.concatenate([s.y, q.y]), masks)


def make(cfg: CNPConfig, model: Model, loss_fn, n_out: int, *, source, **_) -> Algorithm:
    x_dim, y_dim = math.prod(source.input_shape), n_out
    loss_fn = task_loss_fn(source.kind, cfg.predictive)

    def init(key):
        k_enc, k_dec = jax.random.split(key)
        hidden = cfg.hidden
        return {
            "encoder": mlp_init(
                k_enc, [x_dim + y_dim] + [hidden] * cfg.encoder_layers + [cfg.representation]
            ),
            "decoder": mlp_init(
                k_dec, [cfg.representation + x_dim] + [hidden] * cfg.decoder_layers + [2 * y_dim]
            ),
        }

    def adapt(meta_params, support, key, inner_steps=0):
        return masked_mean(mlp_apply(meta_params["encoder"], pairs(support)), support.mask)

    def predict(meta_params, r, x):
        x = x.reshape(len(x), -1)
        h = jnp.concatenate([jnp.broadcast_to(r, (len(x), r.shape[-1])), x], -1)
        mean, raw = jnp.split(mlp_apply(meta_params["decoder"], h), 2, -1)
        return mean, bounded_std(raw, cfg.min_std)

    def meta_loss(meta_params, task, key, step=0):
        r = adapt(meta_params, task.support, key)
        targets = all_targets(task) if cfg.context_in_targets else task.query
        return split_loss(loss_fn, lambda x: predict(meta_params, r, x), targets, None)

    return make_algorithm(init, adapt, predict, loss_fn, meta_loss=meta_loss)


registry.register("algo", "cnp", CNPConfig, make)
