"""The coordinatewise LSTM optimizer (Andrychowicz et al. 2016, section 2.1): a two-layer LSTM
whose weights are shared across every coordinate of every parameter, reading each coordinate's
log-preprocessed gradient and emitting its update; its cells are the per-coordinate state."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from metalearn.learned_optimizers import LearnedOptimizer, register
from metalearn.learned_optimizers._preprocess import log_and_sign

INPUTS = 2  # log_and_sign's features per coordinate


def cell(weights: dict, x: jax.Array, h: jax.Array, c: jax.Array):
    """One LSTM cell on a batch of coordinates: x [n, in], h and c [n, hidden]."""
    z = jnp.concatenate([x, h], -1) @ weights["w"] + weights["b"]
    i, f, g, o = jnp.split(z, 4, -1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return jax.nn.sigmoid(o) * jnp.tanh(c), c


def make(cfg) -> LearnedOptimizer:
    hidden, layers, p, scale = cfg.hidden, cfg.layers, cfg.preprocess, cfg.output_scale

    def init(key, params):
        keys = jax.random.split(key, layers + 1)
        cells, fan_in = [], INPUTS
        for k in keys[:-1]:
            w = jax.random.normal(k, (fan_in + hidden, 4 * hidden)) / jnp.sqrt(fan_in + hidden)
            # forget-gate bias 1 (gates i, f, g, o): cells start by keeping their memory
            b = jnp.zeros(4 * hidden).at[hidden : 2 * hidden].set(1.0)
            cells.append({"w": w, "b": b})
            fan_in = hidden
        # small output weights: the untrained optimizer takes small steps
        out = {"w": 0.01 * jax.random.normal(keys[-1], (hidden, 1)), "b": jnp.zeros(1)}
        return {"cells": cells, "out": out}

    def init_state(theta, params):
        # one (h, c) per layer for every coordinate of every leaf, as one [n, hidden] array: the
        # cells run once over all coordinates (one program whatever the number of leaves)
        n = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
        dtype = jnp.result_type(*jax.tree.leaves(params))
        return tuple((jnp.zeros((n, hidden), dtype),) * 2 for _ in range(layers))

    def update(theta, grads, state, params):
        leaves, treedef = jax.tree.flatten(grads)
        g = jnp.concatenate([leaf.reshape(-1) for leaf in leaves])
        x = log_and_sign(g, p)  # every coordinate is a batch row
        new_state = []
        for weights, (h, c) in zip(theta["cells"], state):
            h, c = cell(weights, x, h, c)
            new_state.append((h, c))
            x = h
        u = scale * (x @ theta["out"]["w"] + theta["out"]["b"])[:, 0]
        cuts = np.cumsum([leaf.size for leaf in leaves])[:-1]
        updates = [
            part.reshape(leaf.shape).astype(leaf.dtype)
            for part, leaf in zip(jnp.split(u, cuts), leaves)
        ]
        return treedef.unflatten(updates), tuple(new_state)

    return LearnedOptimizer(init, init_state, update)


register("lstm", make)
