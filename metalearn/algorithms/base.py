"""What every algorithm shares: the task loss, the inner SGD loop, and the episodic meta-loss."""

from __future__ import annotations

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
    first_order: bool = False,
    remat: bool = False,
) -> Params:
    """`steps` gradient steps on the support loss, unrolled with lax.scan.

    lr is a float or a pytree of per-leaf learning rates (layer-wise rates, 0 for frozen leaves).
    Without first_order the result stays differentiable through the inner gradients (MAML);
    with it the inner gradients are constants to the outer derivative. remat recomputes each
    inner step in the backward pass instead of storing it, so memory no longer grows with the
    number of steps (at the price of one more forward pass per step).
    """
    lrs = lr if isinstance(lr, (dict, list, tuple)) else jax.tree.map(lambda _: lr, params)
    if remat:
        # A scan carry must keep its type: float leaves of a Python lr tree become arrays.
        lrs = jax.tree.map(jnp.asarray, lrs)

    def step(p, _):
        g = jax.grad(loss)(p, support)
        if first_order:
            g = jax.lax.stop_gradient(g)
        return jax.tree.map(lambda p, g, a: p - a * g, p, g, lrs), None

    if steps == 0:
        return params
    adapted, _ = jax.lax.scan(jax.checkpoint(step) if remat else step, params, None, length=steps)
    return adapted
