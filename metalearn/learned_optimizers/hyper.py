"""SGD with momentum whose learning rate (as its log) and momentum per parameter leaf (layer) are
meta-learned by hypergradients through the unroll: the hand-designed rule of optax.sgd(lr,
momentum), v <- g + mu v, update -lr v, with lr and mu as meta-parameters."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from metalearn.learned_optimizers import LearnedOptimizer, register

MAX_MOMENTUM = 0.999  # mu is clipped to [0, this]: a momentum of 1 or more never settles


def make(cfg) -> LearnedOptimizer:
    def init(key, params):
        # jnp.asarray of a Python float takes the default float type (float64 under x64)
        return {
            "log_lr": jax.tree.map(lambda _: jnp.asarray(math.log(cfg.lr)), params),
            "momentum": jax.tree.map(lambda _: jnp.asarray(cfg.momentum), params),
        }

    def init_state(theta, params):
        return jax.tree.map(jnp.zeros_like, params)  # the velocity, as optax's trace

    def update(theta, grads, velocity, params):
        mu = jax.tree.map(lambda m: jnp.clip(m, 0.0, MAX_MOMENTUM), theta["momentum"])
        velocity = jax.tree.map(lambda g, v, m: g + m * v, grads, velocity, mu)
        updates = jax.tree.map(lambda v, lr: -jnp.exp(lr) * v, velocity, theta["log_lr"])
        return updates, velocity

    return LearnedOptimizer(init, init_state, update)


register("hyper", make)
