"""iMAML (Rajeswaran et al. 2019): implicit meta-gradients through a proximal inner problem.

The task solution is phi = argmin_phi L_support(phi) + lam/2 |phi - theta|^2, approximated by
inner gradient steps. At that optimum d phi / d theta = (I + H/lam)^-1 (H the support-loss
Hessian), so the meta-gradient is (I + H/lam)^-1 grad L_query(phi), solved by conjugate
gradients with Hessian-vector products. Nothing of the inner loop is kept for the backward
pass, so memory does not grow with the number of inner steps.
"""

from __future__ import annotations

import jax
from jax.scipy.sparse.linalg import cg

from metalearn.algorithms.base import LossFn
from metalearn.config import IMAMLConfig
from metalearn.models import Model
from metalearn.types import Algorithm


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

    def meta_gradient(meta_params, task, key):
        phi = adapt(meta_params, task.support, key)
        query_loss, metrics = loss_fn(model.apply(phi, task.query.x), task.query.y)
        g = jax.grad(loss)(phi, task.query)
        support_grad = lambda p: jax.grad(loss)(p, task.support)  # noqa: E731

        def matvec(v):  # (I + H / lam) v
            hv = jax.jvp(support_grad, (phi,), (v,))[1]
            return jax.tree.map(lambda v, h: v + h / lam, v, hv)

        meta_grad, _ = cg(matvec, g, maxiter=cfg.cg_steps)
        return meta_grad, metrics

    return Algorithm(
        init=lambda key: model.init(key, n_out),
        adapt=adapt,
        predict=lambda meta_params, task_params, x: model.apply(task_params, x),
        meta_gradient=meta_gradient,
    )
