"""MAML (Finn et al. 2017): meta-learn an initialisation that one or a few SGD steps adapt.

The inner loop is jax.grad inside the outer jax.value_and_grad; first_order stops the
gradient through the inner gradients (FOMAML).
"""

from __future__ import annotations

from metalearn.algorithms.base import LossFn, sgd_adapt
from metalearn.config import MAMLConfig
from metalearn.models import Model
from metalearn.types import Algorithm


def make(cfg: MAMLConfig, model: Model, loss_fn: LossFn, n_out: int, **_) -> Algorithm:
    def support_loss(params, split):
        return loss_fn(model.apply(params, split.x), split.y)[0]

    def adapt(meta_params, support, key, inner_steps=cfg.inner_steps):
        return sgd_adapt(
            support_loss,
            meta_params,
            support,
            lr=cfg.inner_lr,
            steps=inner_steps,
            first_order=cfg.first_order,
        )

    def predict(meta_params, task_params, x):
        return model.apply(task_params, x)

    return Algorithm(
        init=lambda key: model.init(key, n_out),
        adapt=adapt,
        predict=predict,
    )
