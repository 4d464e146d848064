"""Batch-norm statistics: transductive (each batch's own) or inductive (running averages).

model.norm=transductive normalises with the statistics of the examples at hand, in training and
at test alike (MAML's reference code; metalearn's default). model.norm=inductive keeps running
averages of the batch statistics as parameters named running_<statistic> (running_mean /
running_var; group label "state": never adapted, never given to the algorithm's optimizer) and
normalises with them at meta-test, so a query's prediction does not depend on the other
queries (as fine-tuning and metric learners are usually run).

How the averages are updated without any hook in the algorithms: in training, every batch norm
passes its output through `track`, which is the identity forward and, backward, gives the
running statistic r the cotangent momentum * (r - batch statistic). The train step sends the
"state" leaves to SGD with rate 1 (train.py), so one step moves r to
r - momentum * mean over tasks of (r - batch statistic): an exponential moving average, through
the same gradient path, chunking and sharding as every parameter. A step that normalises several
batches (a metric learner embeds support and query) takes one such move per batch. Nothing
differentiates through an inner loop's statistics: the cotangent ignores the incoming one, so
second-order terms through it are zero. Layers that compute their own moving average (Flax's
batch norms, model=flax) use `follow`, whose backward gives the cotangent r - (their update).

Padded splits (types.Split.mask: variable-way episodes padded to one shape) must not let their
padding into the batch statistics: a learner calls the model inside `examples(split.mask)`, and
the batch norms take `moments` over the real examples only (`example_mask` is the mask of the
batch at hand, or None when every example is real).

Whether a function is traced for meta-test is a trace-time flag (`testing()`), set by the
evaluator and the public API inside the functions they compile. jit caches a trace by function,
not by this flag, so enter it inside the jitted function (never call one jitted function in
both modes).
"""

from __future__ import annotations

import contextlib
import contextvars
import re

import jax
import jax.numpy as jnp

NORMS = ("transductive", "inductive")
STATE = re.compile(r"(^|\.)running_\w+$")  # running statistics: running_mean, running_var, ...

_testing = contextvars.ContextVar("metalearn_norm_testing", default=False)
_examples = contextvars.ContextVar("metalearn_norm_examples", default=None)


@contextlib.contextmanager
def testing():
    """Within: batch norms with running statistics use them (meta-test)."""
    token = _testing.set(True)
    try:
        yield
    finally:
        _testing.reset(token)


def is_testing() -> bool:
    return _testing.get()


@contextlib.contextmanager
def examples(mask: jax.Array | None):
    """Within: batch statistics are taken over the examples whose mask (bool [n]) is True; the
    batches normalised must then have n examples. None: every example is real."""
    token = _examples.set(mask)
    try:
        yield
    finally:
        _examples.reset(token)


def example_mask(x: jax.Array) -> jax.Array | None:
    """The mask of the real examples of the batch x [n, ...] being normalised, or None."""
    mask = _examples.get()
    if mask is None:
        return None
    if mask.shape != x.shape[:1]:
        raise ValueError(
            f"A batch norm saw a batch of {x.shape[0]} examples inside norm.examples(mask) with "
            f"a mask of shape {tuple(mask.shape)}: a model called on a padded split must "
            "normalise that split's examples as one batch."
        )
    return mask


def moments(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Mean and biased variance of x over `axes` (which include the batch axis 0), over the real
    examples only inside `examples(mask)`."""
    mask = example_mask(x)
    if mask is None:
        mean = x.mean(axis=axes)
        return mean, jnp.square(x - jnp.expand_dims(mean, axes)).mean(axis=axes)
    w = mask.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    n = jnp.maximum(jnp.sum(w), 1.0)
    for a in axes:
        if a > 0:
            n = n * x.shape[a]
    mean = jnp.sum(x * w, axis=axes) / n
    centred = x - jnp.expand_dims(mean, axes)
    return mean, jnp.sum(jnp.square(centred) * w, axis=axes) / n


# a normalisation layer's own weights: conv4's scale / offset, Flax's <...bn|norm...>.scale|bias
AFFINE = re.compile(r"(^|\.)(scale|offset)$|(bn|norm)[^.]*\.(scale|bias)$", re.IGNORECASE)


def is_affine(name: str) -> bool:
    """Whether a dotted parameter name is a normalisation layer's scale or offset."""
    return AFFINE.search(name) is not None


def is_state(name: str) -> bool:
    """Whether a dotted parameter name is a running statistic."""
    return STATE.search(name) is not None


@jax.custom_vjp
def track(y, running_mean, running_var, batch_mean, batch_var, momentum):
    """y, unchanged; the backward pass moves the running statistics (module docstring)."""
    return y


def _track_fwd(y, running_mean, running_var, batch_mean, batch_var, momentum):
    residuals = (running_mean, running_var, batch_mean, batch_var, momentum)
    return y, residuals


def _track_bwd(residuals, g):
    running_mean, running_var, batch_mean, batch_var, momentum = residuals
    return (
        g,
        momentum * (running_mean - jax.lax.stop_gradient(batch_mean)),
        momentum * (running_var - jax.lax.stop_gradient(batch_var)),
        jnp.zeros_like(batch_mean),
        jnp.zeros_like(batch_var),
        jnp.zeros_like(momentum),
    )


track.defvjp(_track_fwd, _track_bwd)


@jax.custom_vjp
def follow(y, running, updated):
    """y, unchanged; backward, the running statistics (a pytree) get the cotangent
    running - updated: `track` for a layer that computes its own moving average (a Flax batch
    norm's updated batch_stats), so SGD with rate 1 moves them to `updated`."""
    return y


def _follow_fwd(y, running, updated):
    return y, (running, updated)


def _follow_bwd(residuals, g):
    running, updated = residuals
    step = jax.tree.map(lambda r, u: r - jax.lax.stop_gradient(u), running, updated)
    return g, step, jax.tree.map(jnp.zeros_like, updated)


follow.defvjp(_follow_fwd, _follow_bwd)
