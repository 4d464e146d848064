"""Fully connected ReLU network over a plain parameter pytree."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def init(key: jax.Array, n_out: int, *, in_features: int, hidden: int = 40, layers: int = 2):
    """Blocks of (w, b) then a linear head; truncated-normal weights as the MAML reference."""
    sizes = [in_features] + [hidden] * layers
    keys = jax.random.split(key, layers + 1)
    blocks = [
        _dense(k, fan_in, fan_out) for k, fan_in, fan_out in zip(keys[:-1], sizes[:-1], sizes[1:])
    ]
    return {"blocks": blocks, "head": _dense(keys[-1], sizes[-1], n_out)}


def _dense(key, fan_in: int, fan_out: int):
    w = jax.random.truncated_normal(key, -2.0, 2.0, (fan_in, fan_out)) * 0.01
    return {"w": w, "b": jnp.zeros((fan_out,))}


def embed(params, x: jax.Array) -> jax.Array:
    h = x.reshape(x.shape[0], -1)
    for block in params["blocks"]:
        h = jax.nn.relu(h @ block["w"] + block["b"])
    return h


def apply(params, x: jax.Array) -> jax.Array:
    return embed(params, x) @ params["head"]["w"] + params["head"]["b"]
