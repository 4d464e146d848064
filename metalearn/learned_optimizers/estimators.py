"""Gradient estimators of a learned optimizer's meta-loss that differentiate nothing: antithetic
evolution strategies (ES) over one truncation segment, and persistent evolution strategies
(PES, Vicol et al. 2021), which accumulate each particle's perturbations over the segments of a
run so that the estimate is unbiased for the gradient of the whole (untruncated) unroll.

Both take `segment(theta, carry) -> (loss, carry)`: one K-step segment of the meta-batch's inner
runs from `carry` (the inner parameters and rule state), its mean inner loss, and where it ends.
Each pair i perturbs theta by +eps_i and -eps_i, eps_i ~ N(0, sigma^2 I) (the same eps for every
problem of the batch), and the segments of all 2N perturbed rules run vmapped together.

For a loss L(theta) that is quadratic in theta the antithetic estimate is exactly unbiased; in
general it is unbiased for the gradient of the Gaussian-smoothed loss E L(theta + eps), which
tends to the gradient as sigma -> 0. Truncated ES is biased for the full unroll: it ignores how
theta moved the carry it starts from. PES removes that bias: a particle keeps its own carried
runs (perturbed +eps and -eps at every segment), and the score function of its whole
perturbation history, the sum of its eps so far, weights the segment's loss difference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from metalearn.types import Params

ESTIMATORS = ("backprop", "es", "pes")
Segment = Callable[[Params, Any], tuple[jax.Array, Any]]


class PESState(NamedTuple):
    """Each of the N pairs' persistent runs (a leading pair axis [N]) and perturbation sum."""

    pos: Any  # [N, ...] the carry of the runs under theta + eps
    neg: Any  # [N, ...] the carry of the runs under theta - eps
    accum: Params  # [N, ...theta] the sum of the pair's eps since its runs started


def perturbations(key: jax.Array, theta: Params, sigma: float, pairs: int) -> Params:
    """eps [pairs, ...] ~ N(0, sigma^2) for every leaf of theta."""
    leaves, treedef = jax.tree.flatten(theta)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [sigma * jax.random.normal(k, (pairs, *x.shape), x.dtype) for k, x in zip(keys, leaves)]
    )


def antithetic_gradient(weights: Params, pos: jax.Array, neg: jax.Array, sigma: float) -> Params:
    """mean_i weights_i (L+_i - L-_i) / (2 sigma^2): ES's estimate with weights = eps, PES's
    with weights = the accumulated eps. pos, neg [N]: the pairs' losses."""
    diff = (pos - neg) / (2 * sigma**2)
    return jax.tree.map(lambda w: jnp.tensordot(diff, w, 1) / diff.shape[0], weights)


def per_pair(weights: Params, pos: jax.Array, neg: jax.Array, sigma: float) -> Params:
    """The N single-pair estimates [N, ...theta] whose mean is antithetic_gradient (for tests and
    standard errors)."""
    diff = (pos - neg) / (2 * sigma**2)
    return jax.tree.map(lambda w: diff.reshape((-1,) + (1,) * (w.ndim - 1)) * w, weights)


def _shifted(theta: Params, eps: Params, sign: float) -> Params:
    return jax.tree.map(lambda t, e: t + sign * e, theta, eps)


def es_segment(segment: Segment, theta: Params, carry: Any, key: jax.Array, sigma, pairs: int):
    """Truncated antithetic ES on one segment from `carry`. The runs go on from the unperturbed
    rule's end of the segment. Returns (grads, loss at theta, carry, (eps, L+, L-))."""
    eps = perturbations(key, theta, sigma, pairs)
    both = jax.vmap(segment, (0, None))

    pos, _ = both(_shifted(theta, eps, 1.0), carry)
    neg, _ = both(_shifted(theta, eps, -1.0), carry)
    loss, carry = segment(theta, carry)
    return antithetic_gradient(eps, pos, neg, sigma), loss, carry, (eps, pos, neg)


def pes_start(carry: Any, theta: Params, pairs: int) -> PESState:
    """The pairs' state at the start of new runs: every run at `carry`, nothing accumulated."""
    copies = jax.tree.map(lambda x: jnp.broadcast_to(x, (pairs, *x.shape)), carry)
    zeros = jax.tree.map(lambda t: jnp.zeros((pairs, *t.shape), t.dtype), theta)
    return PESState(copies, copies, zeros)


def pes_segment(segment: Segment, theta: Params, state: PESState, key, sigma, pairs: int):
    """One PES segment: fresh eps per pair, added to its sum, and each pair's +/- runs advanced
    under theta +/- eps. Returns (grads, the pairs' mean loss, state, (accum, L+, L-))."""
    eps = perturbations(key, theta, sigma, pairs)
    accum = jax.tree.map(jnp.add, state.accum, eps)
    both = jax.vmap(segment, (0, 0))
    pos, pos_carry = both(_shifted(theta, eps, 1.0), state.pos)
    neg, neg_carry = both(_shifted(theta, eps, -1.0), state.neg)
    grads = antithetic_gradient(accum, pos, neg, sigma)
    loss = (pos.mean() + neg.mean()) / 2  # the loss near theta (for the logs)
    return grads, loss, PESState(pos_carry, neg_carry, accum), (accum, pos, neg)
