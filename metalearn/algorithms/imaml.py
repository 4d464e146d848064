"""iMAML (Rajeswaran et al. 2019): implicit meta-gradients through a proximal inner problem.

The task solution is phi = argmin_phi L_support(phi) + lam/2 |phi - theta|^2, approximated by
inner gradient steps. At that optimum d phi / d theta = (I + H/lam)^-1 (H the support-loss
Hessian), so the meta-gradient is (I + H/lam)^-1 grad L_query(phi), solved by conjugate
gradients with Hessian-vector products. Nothing of the inner loop is kept for the backward
pass, so memory does not grow with the number of inner steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from metalearn import registry
from metalearn.algorithms.base import (
    AlgoConfig,
    LossFn,
    direction_loss,
    make_algorithm,
    query_loss,
    support_loss,
)
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
        theta = jax.lax.stop_gradient(meta_params)

        def step(phi, i):
            with randomness.step(i):
                g = jax.grad(loss)(phi, support)
            return jax.tree.map(
                lambda p, g, t: p - cfg.inner_lr * (g + lam * (p - t)), phi, g, theta
            ), None

        phi, _ = jax.lax.scan(step, theta, jnp.arange(inner_steps))
        return phi

    def meta_loss(meta_params, task, key, step=0):
        """A surrogate whose gradient is the implicit meta-gradient."""
        phi = adapt(meta_params, task.support, key)
        _, metrics = query_loss(loss_fn, lambda x: model.apply(phi, x), task)
        g = jax.grad(lambda p: query_loss(loss_fn, lambda x: model.apply(p, x), task)[0])(phi)
        support_grad = lambda p: jax.grad(loss)(p, task.support)  # noqa: E731

        def matvec(v):  # (I + H / lam) v
            hv = jax.jvp(support_grad, (phi,), (v,))[1]
            return jax.tree.map(lambda v, h: v + h / lam, v, hv)

        meta_grad = conjugate_gradients(matvec, g, cfg.cg_steps)
        return direction_loss(meta_params, meta_grad), metrics

    return make_algorithm(
        lambda key: model.init(key, n_out),
        adapt,
        lambda meta_params, task_params, x: model.apply(task_params, x),
        loss_fn,
        meta_loss=meta_loss,
    )


def conjugate_gradients(matvec, b, maxiter: int, tol: float = 1e-5):
    """x with matvec(x) = b for a symmetric positive definite map, on pytrees, from x = 0.

    The iteration and stopping rule of jax.scipy.sparse.linalg.cg (stop at maxiter or when
    |r| <= tol |b|), written out because that function, vmapped over tasks, fails in JAX's
    device_put batching rule when the leaves carry the task axis at different positions (as
    Flax modules' parameters do). Nothing differentiates through it: its result is a constant
    direction.
    """

    def vdot(x, y):
        return sum(jnp.vdot(a, c) for a, c in zip(jax.tree.leaves(x), jax.tree.leaves(y)))

    def axpy(a, x, y):
        return jax.tree.map(lambda x, y: a * x + y, x, y)

    threshold = tol**2 * vdot(b, b)

    def unfinished(value):
        _, _, gamma, _, k = value
        return (gamma > threshold) & (k < maxiter)

    def step(value):
        x, r, gamma, p, k = value
        ap = matvec(p)
        alpha = gamma / vdot(p, ap)
        x, r = axpy(alpha, p, x), axpy(-alpha, ap, r)
        gamma_next = vdot(r, r)
        return x, r, gamma_next, axpy(gamma_next / gamma, p, r), k + 1

    x0 = jax.tree.map(jnp.zeros_like, b)
    r0 = b  # b - matvec(0)
    value = (x0, r0, vdot(r0, r0), r0, 0)
    return jax.lax.while_loop(unfinished, step, value)[0]


registry.register("algo", "imaml", IMAMLConfig, make)
