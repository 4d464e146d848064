"""Reptile (Nichol et al. 2018): move the initialisation towards each task's adapted weights.

The update direction for one task is (initial - adapted); the shared step averages it over the
meta-batch and the outer optimiser (SGD, step size decayed linearly to 0) applies it.
"""

from __future__ import annotations

import jax
import optax

from metalearn.algorithms.base import LossFn
from metalearn.config import ReptileConfig
from metalearn.models import Model
from metalearn.types import Algorithm


def make(cfg: ReptileConfig, model: Model, loss_fn: LossFn, n_out: int, **_) -> Algorithm:
    # The paper's inner Adam has beta1 = 0; each task starts from a fresh optimiser state.
    if cfg.inner_optimizer == "adam":
        inner = optax.adam(cfg.inner_lr, b1=0.0, b2=0.99)
    else:
        inner = optax.sgd(cfg.inner_lr)

    def support_loss(params, split):
        return loss_fn(model.apply(params, split.x), split.y)[0]

    def adapt(meta_params, support, key, inner_steps=cfg.inner_steps):
        def step(carry, _):
            params, state = carry
            grads = jax.grad(support_loss)(params, support)
            updates, state = inner.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        if inner_steps == 0:
            return meta_params
        (adapted, _), _ = jax.lax.scan(
            step, (meta_params, inner.init(meta_params)), None, length=inner_steps
        )
        return adapted

    def meta_gradient(meta_params, task, key):
        adapted = adapt(meta_params, task.support, key)
        _, metrics = loss_fn(model.apply(adapted, task.query.x), task.query.y)
        return jax.tree.map(lambda m, a: m - a, meta_params, adapted), metrics

    return Algorithm(
        init=lambda key: model.init(key, n_out),
        adapt=adapt,
        predict=lambda meta_params, task_params, x: model.apply(task_params, x),
        meta_gradient=meta_gradient,
    )
