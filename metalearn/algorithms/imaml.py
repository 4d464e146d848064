"""iMAML (Rajeswaran et al. 2019): implicit meta-gradients through a proximal inner problem.

The task solution is phi = argmin_phi L_support(phi) + lam/2 |phi - theta|^2, approximated by
inner gradient steps. At that optimum d phi / d theta = (I + H/lam)^-1 (H the support-loss
Hessian), so the meta-gradient is (I + H/lam)^-1 grad L_query(phi), solved by conjugate
gradients with Hessian-vector products (metalearn/algorithms/implicit.py). Nothing of the inner
loop is kept for the backward pass, so memory does not grow with the number of inner steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from metalearn import registry
from metalearn.algorithms import implicit
from metalearn.algorithms.base import AlgoConfig, LossFn, make_algorithm, support_loss
from metalearn.checks import MAX_INNER_STEPS, at_most, check_inner_steps, positive, require
from metalearn.models import Model, randomness
from metalearn.types import Algorithm


@dataclass
class IMAMLConfig(AlgoConfig):
    reads_padded: ClassVar[bool] = True

    name: str = "imaml"
    inner_lr: float = 0.1
    inner_steps: int = 16  # gradient steps on the proximal inner problem
    prox_lambda: float = 2.0  # strength of the pull towards the meta-parameters
    cg_steps: int = 5  # conjugate-gradient iterations for the implicit meta-gradient

    def __post_init__(self) -> None:
        positive("algo.inner_lr", self.inner_lr)
        positive("algo.prox_lambda", self.prox_lambda)
        check_inner_steps(self.inner_steps)
        require(self.cg_steps >= 1, f"algo.cg_steps={self.cg_steps} must be >= 1.")
        at_most("algo.cg_steps", self.cg_steps, MAX_INNER_STEPS)


def make(cfg: IMAMLConfig, model: Model, loss_fn: LossFn, n_out: int, **_) -> Algorithm:
    lam = cfg.prox_lambda

    def loss(params, split):  # over the support set's classes: the query's are the same
        return support_loss(loss_fn, lambda x: model.apply(params, x), split)

    def adapt(meta_params, support, key, inner_steps=cfg.inner_steps):
        def optimality(phi):  # the proximal objective's gradient, zero at its minimum
            g = jax.grad(loss)(phi, support)
            return jax.tree.map(lambda g, p, t: g + lam * (p - t), g, phi, meta_params)

        def inner_loop(theta):
            def step(phi, i):
                with randomness.step(i):
                    g = jax.grad(loss)(phi, support)
                return jax.tree.map(
                    lambda p, g, t: p - cfg.inner_lr * (g + lam * (p - t)), phi, g, theta
                ), None

            return jax.lax.scan(step, theta, jnp.arange(inner_steps))[0]

        # d phi / d theta = (H + lam I)^-1 lam = (I + H / lam)^-1, by conjugate gradients on
        # Hessian-vector products (the proximal objective's Hessian is symmetric)
        return implicit.root(
            optimality, inner_loop, meta_params, linear_solver="cg", maxiter=cfg.cg_steps
        )

    return make_algorithm(
        lambda key: model.init(key, n_out),
        adapt,
        lambda meta_params, task_params, x: model.apply(task_params, x),
        loss_fn,
    )


registry.register("algo", "imaml", IMAMLConfig, make)
