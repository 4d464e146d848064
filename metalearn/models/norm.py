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
