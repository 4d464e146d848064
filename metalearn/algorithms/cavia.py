"""CAVIA (Zintgraf et al. 2019): fast context adaptation.

The inner loop adapts only a small context vector phi (reset to zero for every task), which
conditions the network through the conditioning group (conditioning=concat, the paper's choice
for regression and the default here when conditioning=none; film or additive for images). The
network's weights are meta-learned only, by the outer loop through the inner gradient steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax.numpy as jnp

from metalearn import registry
from metalearn.algorithms.base import (
    AlgoConfig,
    LossFn,
    make_algorithm,
    sgd_adapt,
    support_loss,
)
from metalearn.checks import check_inner_steps, positive, width
from metalearn.conditioning import make_vector_conditioned_model
from metalearn.models import Model
from metalearn.types import Algorithm


@dataclass
class CAVIAConfig(AlgoConfig):
    conditioned: ClassVar[bool] = True
    reads_padded: ClassVar[bool] = True

    name: str = "cavia"
    inner_lr: float = 1.0  # step size on the context vector
    inner_steps: int = 2
    context_dim: int = 4  # size of the adapted context vector
    first_order: bool = False

    def __post_init__(self) -> None:
        positive("algo.inner_lr", self.inner_lr)
        check_inner_steps(self.inner_steps)
        width("algo.context_dim", self.context_dim)


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

    def inner_loss(context, meta_params, split):
        return support_loss(loss_fn, lambda x: net.apply_vector(meta_params, x, context), split)

    def adapt(meta_params, support, key, inner_steps=cfg.inner_steps):
        return sgd_adapt(
            lambda context, split: inner_loss(context, meta_params, split),
            jnp.zeros((cfg.context_dim,)),
            support,
            lr=cfg.inner_lr,
            steps=inner_steps,
            first_order=cfg.first_order,
        )

    return make_algorithm(
        lambda key: net.init(key, n_out),
        adapt,
        lambda meta_params, context, x: net.apply_vector(meta_params, x, context),
        loss_fn,
    )


registry.register("algo", "cavia", CAVIAConfig, make)
