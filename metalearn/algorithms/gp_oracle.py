"""The GP oracle: the exact predictive of the Gaussian process that drew a data=gp task, scored
by the same evaluator and metrics as the learners, on the same test tasks (the upper bound row)."""

from __future__ import annotations

import jax.numpy as jnp

from metalearn.algorithms.base import gaussian_loss, make_algorithm, query_loss
from metalearn.data.gp import GPConfig, gp_posterior, joint_log_density, make_source
from metalearn.types import Algorithm


def oracle_algorithm(cfg: GPConfig) -> Algorithm:
    """The true GP as a learner with no parameters: adapt keeps the context, predict gives each
    target's marginal predictive (mean, std). Besides the shared Gaussian metrics it reports
    joint_log_likelihood, log p(targets | context) jointly per target point: the bound for
    learners that model the targets jointly, where factorised ones (CNPs) are bounded by the
    marginal log_likelihood."""

    def predict(params, context, x):
        mean, cov = gp_posterior(cfg, context, x)
        return mean, jnp.sqrt(jnp.diag(cov))[:, None]

    def evaluate(params, task, key, inner_steps=0):
        # One posterior serves both scores, so its Cholesky factorisations depend on each other.
        # Computing it twice per task (independent LAPACK calls, which XLA's CPU threads may run
        # at once) hung 3 of 8 evaluations of 600 tasks on a loaded machine, every thread
        # parked; with one posterior none of 10 hung. Concurrent OpenBLAS calls are the suspect.
        q = task.query
        mask = jnp.ones(len(q.x), bool) if q.mask is None else q.mask
        mean, cov = gp_posterior(cfg, task.support, q.x, mask)
        marginal = (mean, jnp.sqrt(jnp.diag(cov))[:, None])
        loss, metrics = query_loss(gaussian_loss, lambda x: marginal, task)
        return loss, {**metrics, "joint_log_likelihood": joint_log_density(q.y, mean, cov, mask)}

    return make_algorithm(
        init=lambda key: {},
        adapt=lambda params, support, key, inner_steps=0: support,
        predict=predict,
        loss_fn=gaussian_loss,
        evaluate=evaluate,
    )


def oracle_metrics(cfg: GPConfig, split: str, num_tasks: int, seed: int, batch: int | None = None):
    """The oracle's metrics on the tasks an evaluation of `split` with `num_tasks` and `seed`
    draws (the shared evaluator draws them, so they are a learner's test tasks)."""
    from metalearn.evaluate import make_evaluator

    evaluate = make_evaluator(oracle_algorithm(cfg), make_source(cfg), gaussian_loss, 0, batch)
    return evaluate({}, split, num_tasks, seed)
