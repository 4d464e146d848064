"""Transfer baseline: pre-train one network on all meta-train data, fine-tune it per test task.

Pre-training is plain supervised learning: the tasks the loop draws carry split-wide class
labels, and the loss covers their support and query examples alike. At meta-test, adapt
fine-tunes on the support set with the CS330 options: a new head, frozen early blocks and
layer-wise learning rates (deeper blocks learn faster).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metalearn.algorithms.base import LossFn, sgd_adapt
from metalearn.config import FinetuneConfig
from metalearn.models import Model
from metalearn.types import Algorithm


def layerwise_lrs(params, cfg: FinetuneConfig):
    """Block i of n gets inner_lr * layer_decay**(n - i), 0 when frozen; the head gets inner_lr."""
    n = len(params["blocks"])
    lrs = {
        "blocks": [
            jax.tree.map(
                lambda _, i=i: 0.0 if i < cfg.freeze else cfg.inner_lr * cfg.layer_decay ** (n - i),
                block,
            )
            for i, block in enumerate(params["blocks"])
        ],
        "head": jax.tree.map(lambda _: cfg.inner_lr, params["head"]),
    }
    return lrs


def make(
    cfg: FinetuneConfig, model: Model, loss_fn: LossFn, n_out: int, n_train_classes: int, **_
) -> Algorithm:
    def loss(params, split):
        return loss_fn(model.apply(params, split.x), split.y)[0]

    def meta_loss(params, task, key, step=None):
        x = jnp.concatenate([task.support.x, task.query.x])
        y = jnp.concatenate([task.support.y, task.query.y])
        return loss_fn(model.apply(params, x), y)

    def adapt(meta_params, support, key, inner_steps=cfg.inner_steps):
        params = meta_params
        if cfg.reinit_head:
            params = {**meta_params, "head": model.init(key, n_out)["head"]}
        return sgd_adapt(
            loss,
            params,
            support,
            lr=layerwise_lrs(params, cfg),
            steps=inner_steps,
            first_order=True,
        )

    return Algorithm(
        init=lambda key: model.init(key, n_train_classes),
        adapt=adapt,
        predict=lambda meta_params, task_params, x: model.apply(task_params, x),
        meta_loss=meta_loss,
        global_labels=True,
    )
