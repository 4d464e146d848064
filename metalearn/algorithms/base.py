"""What every algorithm shares: the task loss, the inner SGD loop, and the episodic meta-loss."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from metalearn.types import Metrics, Params, Split

LossFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, Metrics]]


def classification_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, Metrics]:
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = (jnp.argmax(logits, -1) == labels).mean()
    return loss, {"loss": loss, "accuracy": accuracy}


def regression_loss(predictions: jax.Array, targets: jax.Array) -> tuple[jax.Array, Metrics]:
    loss = jnp.mean((predictions - targets) ** 2)
    return loss, {"loss": loss}


def task_loss_fn(kind: str) -> LossFn:
    return classification_loss if kind == "classification" else regression_loss


def sgd_adapt(
    loss: Callable[[Params, Split], jax.Array],
    params: Params,
    support: Split,
    *,
    lr,
    steps: int,
    first_order=False,
    remat: bool = False,
    trajectory: bool = False,
):
    """`steps` gradient steps on the support loss, unrolled with lax.scan.

    lr is a float, a pytree of per-leaf rates (layer-wise rates, 0 for frozen leaves), or a
    function of the step index returning such a pytree (per-step rates).
    Without first_order the result stays differentiable through the inner gradients (MAML);
    with it the inner gradients are constants to the outer derivative. first_order may be a
    traced bool (switched by a schedule during training). remat recomputes the inner steps in
    the backward pass instead of storing their activations (about one more forward pass per
    step): the steps run as ~sqrt(steps) checkpointed segments of ~sqrt(steps) steps, so the
    backward pass keeps ~2 sqrt(steps) copies of the parameters instead of every step's
    activations and parameters. With trajectory the parameters after every step are returned
    too, stacked on a leading axis (which stores every step, so remat then checkpoints single
    steps only).
    """
    if callable(lr):
        lr_at = lr
    else:
        lrs = lr if isinstance(lr, (dict, list, tuple)) else jax.tree.map(lambda _: lr, params)
        lrs = jax.tree.map(jnp.asarray, lrs)  # a scan carry keeps its type: no Python floats

        def lr_at(i):
            return lrs

    def step(p, i):
        g = jax.grad(loss)(p, support)
        if isinstance(first_order, bool):
            g = jax.lax.stop_gradient(g) if first_order else g
        else:
            g = jax.tree.map(lambda g: jnp.where(first_order, jax.lax.stop_gradient(g), g), g)
        new = jax.tree.map(lambda p, g, a: p - a * g, p, g, lr_at(i))
        return new, (new if trajectory else None)

    if steps == 0:
        return (params, jax.tree.map(lambda p: p[None], params)) if trajectory else params
    if remat and not trajectory and steps > 3:
        return _segmented_scan(step, params, steps)
    body = jax.checkpoint(step) if remat else step
    adapted, path = jax.lax.scan(body, params, jnp.arange(steps))
    return (adapted, path) if trajectory else adapted


def _segmented_scan(step, params, steps: int):
    """`steps` applications of step(p, i) as checkpointed segments of checkpointed steps.

    A scan saves its carry at every iteration for the backward pass, so checkpointing single
    steps still stores one parameter copy per step; nesting ceil(sqrt(steps)) segments stores
    one per segment, plus one per step of the segment being differentiated. The last segment
    may overrun `steps`; its extra iterations leave the parameters unchanged.
    """
    seg = math.ceil(math.sqrt(steps))

    def one_step(p, i):
        new, _ = step(p, i)
        return jax.tree.map(lambda a, b: jnp.where(i < steps, a, b), new, p), None

    def segment(p, k):
        p, _ = jax.lax.scan(jax.checkpoint(one_step), p, k * seg + jnp.arange(seg))
        return p, None

    adapted, _ = jax.lax.scan(jax.checkpoint(segment), params, jnp.arange(math.ceil(steps / seg)))
    return adapted
