"""iMAML (Rajeswaran et al. 2019): implicit meta-gradients through a proximal inner problem.

The task solution is phi = argmin_phi L_support(phi) + lam/2 |phi - theta|^2, approximated by
inner gradient steps. At that optimum d phi / d theta = (I + H/lam)^-1 (H the support-loss
Hessian), so the meta-gradient is (I + H/lam)^-1 grad L_query(phi), solved by conjugate
gradients with Hessian-vector products. Nothing of the inner loop is kept for the backward
pass, so memory does not grow with the number of inner steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
from jax.flatten_util import ravel_pytree
from jax.scipy.sparse.linalg import cg

from metalearn import registry
from metalearn.algorithms.base import AlgoConfig, LossFn, direction_loss, make_algorithm
from metalearn.checks import MAX_INNER_STEPS, at_most, check_inner_steps, positive, require
from metalearn.models import Model
from metalearn.types import Algorithm


@dataclass
class IMAMLConfig(AlgoConfig):
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

    def loss(params, split):
        return loss_fn(model.apply(params, split.x), split.y)[0]

    def adapt(meta_params, support, key, inner_steps=cfg.inner_steps):
        theta = jax.lax.stop_gradient(meta_params)

        def step(phi, _):
            g = jax.grad(loss)(phi, support)
            return jax.tree.map(
                lambda p, g, t: p - cfg.inner_lr * (g + lam * (p - t)), phi, g, theta
            ), None

        phi, _ = jax.lax.scan(step, theta, None, length=inner_steps)
        return phi

    def meta_loss(meta_params, task, key, step=0):
        """A surrogate whose gradient is the implicit meta-gradient."""
        phi = adapt(meta_params, task.support, key)
        query_loss, metrics = loss_fn(model.apply(phi, task.query.x), task.query.y)
        g = jax.grad(loss)(phi, task.query)
        support_grad = lambda p: jax.grad(loss)(p, task.support)  # noqa: E731

        # CG runs on one flat vector: vmapped over tasks, cg of a pytree whose leaves carry the
        # task axis at different positions trips JAX's device_put batching rule (Flax models).
        flat_g, unravel = ravel_pytree(g)

        def matvec(v):  # (I + H / lam) v
            hv = jax.jvp(support_grad, (phi,), (unravel(v),))[1]
            return v + ravel_pytree(hv)[0] / lam

        meta_grad, _ = cg(matvec, flat_g, maxiter=cfg.cg_steps)
        return direction_loss(meta_params, unravel(meta_grad)), metrics

    return make_algorithm(
        lambda key: model.init(key, n_out),
        adapt,
        lambda meta_params, task_params, x: model.apply(task_params, x),
        loss_fn,
        meta_loss=meta_loss,
    )


registry.register("algo", "imaml", IMAMLConfig, make)
