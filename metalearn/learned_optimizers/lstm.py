"""The coordinatewise LSTM optimizer (Andrychowicz et al. 2016, section 2.1): a two-layer LSTM
whose weights are shared across every coordinate of every parameter, reading each coordinate's
log-preprocessed gradient and emitting its update; its cells are the per-coordinate state."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

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
        def zeros(leaf):
            shape = (math.prod(leaf.shape), hidden)
            return tuple((jnp.zeros(shape, leaf.dtype),) * 2 for _ in range(layers))

        return jax.tree.map(zeros, params)

    def update(theta, grads, state, params):
        leaves, treedef = jax.tree.flatten(grads)
        states = treedef.flatten_up_to(state)
        updates, new_states = [], []
        for g, s in zip(leaves, states):
            x = log_and_sign(g.reshape(-1), p)  # every coordinate is a batch row
            new_s = []
            for weights, (h, c) in zip(theta["cells"], s):
                h, c = cell(weights, x, h, c)
                new_s.append((h, c))
                x = h
            u = scale * (x @ theta["out"]["w"] + theta["out"]["b"])[:, 0]
            updates.append(u.reshape(g.shape).astype(g.dtype))
            new_states.append(tuple(new_s))
        return treedef.unflatten(updates), treedef.unflatten(new_states)

    return LearnedOptimizer(init, init_state, update)


register("lstm", make)
