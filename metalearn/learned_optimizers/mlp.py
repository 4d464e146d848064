"""A per-parameter MLP optimizer (after learned_optimization's small MLP learned optimizers): one
MLP shared across coordinates reads each coordinate's gradient and momenta at several decays
(log-preprocessed) and emits a direction d and a log-magnitude m; the step is scale * d * e^m."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metalearn.learned_optimizers import LearnedOptimizer, register
from metalearn.learned_optimizers._preprocess import log_and_sign

MAX_LOG_STEP = 10.0  # e^m is capped: one bad meta-step must not make an inner step overflow


def make(cfg) -> LearnedOptimizer:
    hidden, layers, p, scale = cfg.hidden, cfg.layers, cfg.preprocess, cfg.output_scale
    decays = jnp.asarray(cfg.decays)
    n_features = 2 * (1 + len(cfg.decays))

    def init(key, params):
        keys = jax.random.split(key, layers + 1)
        dims = [n_features] + [hidden] * layers
        net = [
            {"w": jax.random.normal(k, (a, b)) * jnp.sqrt(2.0 / a), "b": jnp.zeros(b)}
            for k, a, b in zip(keys[:-1], dims[:-1], dims[1:])
        ]
        out = {"w": 0.01 * jax.random.normal(keys[-1], (dims[-1], 2)), "b": jnp.zeros(2)}
        return {"net": net, "out": out}

    def init_state(theta, params):
        # the momenta, [len(decays), *leaf.shape] per leaf
        return jax.tree.map(lambda x: jnp.zeros((len(cfg.decays), *x.shape), x.dtype), params)

    def update(theta, grads, state, params):
        def leaf(g, m):
            d = decays.reshape((-1,) + (1,) * g.ndim).astype(g.dtype)
            m = d * m + (1 - d) * g
            values = jnp.concatenate([g.reshape(1, -1), m.reshape(len(cfg.decays), -1)], 0)
            x = log_and_sign(values.T, p).reshape(values.shape[1], n_features)
            for layer in theta["net"]:
                x = jax.nn.relu(x @ layer["w"] + layer["b"])
            direction, log_step = jnp.moveaxis(x @ theta["out"]["w"] + theta["out"]["b"], -1, 0)
            u = scale * direction * jnp.exp(jnp.minimum(log_step, MAX_LOG_STEP))
            return u.reshape(g.shape).astype(g.dtype), m

        leaves, treedef = jax.tree.flatten(grads)
        out = [leaf(g, m) for g, m in zip(leaves, treedef.flatten_up_to(state))]
        return treedef.unflatten([u for u, _ in out]), treedef.unflatten([m for _, m in out])

    return LearnedOptimizer(init, init_state, update)


register("mlp", make)
