"""The inner training run: an update rule applied for a number of steps to one inner problem, as
a lax.scan (vmap it over problems), and the truncated segment the meta-gradient is taken over."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from metalearn.data.problems import InnerProblem
from metalearn.learned_optimizers import LearnedOptimizer
from metalearn.types import Params, Split


def unroll(
    rule: LearnedOptimizer,
    problem: InnerProblem,
    theta: Params,
    params: Params,
    state,
    split: Split,
    steps: int,
    *,
    second_order: bool = False,
    remat: bool = False,
    key: jax.Array | None = None,
):
    """`steps` updates of `rule` (meta-parameters theta) on problem's loss on `split`, from
    (params, state). Returns (params, state, losses [steps + 1]): losses[i] = f(theta_i), the
    loss before update i and, last, after the final update.

    Without second_order the inner gradients are constants to the meta-gradient (Andrychowicz
    et al. 2016 drop those terms, which would need Hessians); with it the meta-gradient is the
    exact derivative of the losses (hypergradients). remat recomputes each step in the backward
    pass instead of storing it (jax.checkpoint), for long segments. For a problem with
    minibatches, step i (and the last loss, i = steps) reads problem.minibatch(split,
    fold_in(key, i)): give each segment of a run its own key.
    """

    def batch(i):
        if problem.minibatch is None:
            return split
        if key is None:
            raise ValueError("this inner problem draws minibatches: give unroll a key")
        return problem.minibatch(split, jax.random.fold_in(key, i))

    def step(carry, i):
        p, s = carry
        loss, g = jax.value_and_grad(problem.loss)(p, batch(i))
        if not second_order:
            g = jax.lax.stop_gradient(g)
        u, s = rule.update(theta, g, s, p)
        return (optax.apply_updates(p, u), s), loss

    body = jax.checkpoint(step) if remat else step
    (params, state), losses = jax.lax.scan(body, (params, state), jnp.arange(steps))
    return params, state, jnp.append(losses, problem.loss(params, batch(steps)))


def segment_loss(losses: jax.Array) -> jax.Array:
    """The meta-loss of a segment (the paper's objective with all weights 1): the mean inner loss
    after each of its updates, f(theta_{t+1}) .. f(theta_{t+K}) (f(theta_t) does not depend on
    the segment's meta-parameters)."""
    return losses[..., 1:].mean()
