"""Reptile (Nichol et al. 2018): move the initialisation towards each task's adapted weights.

The update direction for one task is (initial - adapted); the shared step averages it over the
meta-batch and the outer optimiser (SGD, step size decayed linearly to 0, as in the paper)
applies it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
import optax

from metalearn import registry
from metalearn.algorithms.base import (
    AlgoConfig,
    LossFn,
    direction_loss,
    make_algorithm,
    query_loss,
    support_loss,
)
from metalearn.checks import check_inner_steps, choice, positive
from metalearn.models import Model, randomness
from metalearn.types import Algorithm


@dataclass
class ReptileConfig(AlgoConfig):
    reads_padded: ClassVar[bool] = True

    name: str = "reptile"
    inner_lr: float = 0.001
    inner_steps: int = 5
    inner_optimizer: str = "adam"  # adam (beta1=0, as in the paper) | sgd

    def __post_init__(self) -> None:
        positive("algo.inner_lr", self.inner_lr)
        check_inner_steps(self.inner_steps)
        choice("algo.inner_optimizer", self.inner_optimizer, ("adam", "sgd"))


def make(cfg: ReptileConfig, model: Model, loss_fn: LossFn, n_out: int, **_) -> Algorithm:
    # The paper's inner Adam has beta1 = 0; each task starts from a fresh optimiser state.
    if cfg.inner_optimizer == "adam":
        inner = optax.adam(cfg.inner_lr, b1=0.0, b2=0.99)
    else:
        inner = optax.sgd(cfg.inner_lr)

    def inner_loss(params, split):
        return support_loss(loss_fn, lambda x: model.apply(params, x), split)

    def adapt(meta_params, support, key, inner_steps=cfg.inner_steps):
        def step(carry, i):
            params, state = carry
            with randomness.step(i):
                grads = jax.grad(inner_loss)(params, support)
            updates, state = inner.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        if inner_steps == 0:
            return meta_params
        (adapted, _), _ = jax.lax.scan(
            step, (meta_params, inner.init(meta_params)), jnp.arange(inner_steps)
        )
        return adapted

    def meta_loss(meta_params, task, key, step=0):
        """A surrogate whose gradient is the Reptile direction (initial - adapted)."""
        adapted = adapt(jax.lax.stop_gradient(meta_params), task.support, key)
        _, metrics = query_loss(loss_fn, lambda x: model.apply(adapted, x), task)
        direction = jax.tree.map(lambda m, a: m - a, meta_params, adapted)
        return direction_loss(meta_params, direction), metrics

    def optimizer(train_cfg):
        return optax.sgd(optax.linear_schedule(train_cfg.outer_lr, 0.0, train_cfg.steps))

    return make_algorithm(
        lambda key: model.init(key, n_out),
        adapt,
        lambda meta_params, task_params, x: model.apply(task_params, x),
        loss_fn,
        meta_loss=meta_loss,
        optimizer=optimizer,
    )


registry.register("algo", "reptile", ReptileConfig, make)
