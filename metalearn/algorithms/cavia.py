"""CAVIA (Zintgraf et al. 2019): fast context adaptation.

The inner loop adapts only a small context vector phi (reset to zero for every task), which
conditions the network through the conditioning group (conditioning=concat, the paper's choice
for regression and the default here when conditioning=none; film or additive for images). The
network's weights are meta-learned only, by the outer loop through the inner gradient steps.
"""

from __future__ import annotations

import jax.numpy as jnp

from metalearn.algorithms.base import LossFn, sgd_adapt
from metalearn.conditioning import make_vector_conditioned_model
from metalearn.config import CAVIAConfig
from metalearn.models import Model
from metalearn.types import Algorithm


def make(
    cfg: CAVIAConfig, model: Model, loss_fn: LossFn, n_out: int, *, config, source, **_
) -> Algorithm:
    net = make_vector_conditioned_model(
        config.conditioning,
        config.model,
        source.input_shape,
        z_dim=cfg.context_dim,
        algo="cavia",
        default="concat",
    )

    def support_loss(context, meta_params, split):
        return loss_fn(net.apply_vector(meta_params, split.x, context), split.y)[0]

    def adapt(meta_params, support, key, inner_steps=cfg.inner_steps):
        return sgd_adapt(
            lambda context, split: support_loss(context, meta_params, split),
            jnp.zeros((cfg.context_dim,)),
            support,
            lr=cfg.inner_lr,
            steps=inner_steps,
            first_order=cfg.first_order,
        )

    return Algorithm(
        init=lambda key: net.init(key, n_out),
        adapt=adapt,
        predict=lambda meta_params, context, x: net.apply_vector(meta_params, x, context),
    )
