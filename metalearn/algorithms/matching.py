"""Matching networks (Vinyals et al. 2016): attention over the support set by cosine similarity.

A query x gets the label distribution p(y | x, S) = sum_i a(x, x_i) y_i, with y_i the one-hot
support labels and a the softmax over the support set of scale * cos(f(x), g(x_i)). The loss is
the NLL of that mixture: predict returns log max(p, EPS) as logits, whose softmax is p again (p
sums to 1), so the shared cross-entropy is -log p(y | x, S) and accuracy and calibration read p.
The paper has no scale (algo.scale=1, fixed); algo.learn_scale=true learns it (as a log), which
many reimplementations do to sharpen the bounded cosine logits.

f = g = the model's embedding unless algo.fce=true, the full context embeddings of the paper's
appendix: g(x_i, S) = h_fwd_i + h_bwd_i + g'(x_i), a bidirectional LSTM over the support
embeddings g' in the support set's order, and f(x, S) = attLSTM(f'(x), g(S), K): K steps of
    r = sum_i softmax_i(h . g(x_i)) g(x_i);  h_hat, c = LSTM(f'(x), [h, r], c);  h = h_hat + f'(x)
from h = c = 0, with f = the last h (K = algo.fce_steps; the paper does not state it). The LSTM
skips padding slots, so a padded episode is read as the unpadded one; FCE depends on the
support set's order (the bidirectional LSTM), the plain attention does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from metalearn import registry
from metalearn.algorithms.base import AlgoConfig, LossFn, make_algorithm, split_outputs
from metalearn.checks import MAX_INNER_STEPS, at_most, positive, require
from metalearn.models import Model, feature_size
from metalearn.types import Algorithm

EPS = 1e-8  # the floor of p before its log: a class with (numerically) no attention
MASKED = -1e9  # the logit of a padding slot: exp underflows to exactly 0 (not -inf: no NaN)


@dataclass
class MatchingConfig(AlgoConfig):
    norms: ClassVar[tuple[str, ...]] = ("transductive", "inductive")
    any_way: ClassVar[bool] = True
    kinds: ClassVar[tuple[str, ...]] = ("classification",)
    reads_padded: ClassVar[bool] = True

    name: str = "matching"
    scale: float = 1.0  # cosine similarities are multiplied by it before the softmax
    learn_scale: bool = False  # the paper: no scale
    fce: bool = False  # full context embeddings (bidirectional LSTM g, attention LSTM f)
    fce_steps: int = 1  # K, the attention LSTM's processing steps

    def __post_init__(self) -> None:
        positive("algo.scale", self.scale)
        require(self.fce_steps >= 1, f"algo.fce_steps={self.fce_steps} must be >= 1.")
        at_most("algo.fce_steps", self.fce_steps, MAX_INNER_STEPS)


def unit(x: jax.Array) -> jax.Array:
    """x / |x| along the last axis (a zero vector stays zero)."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-12))


def masked_softmax(logits: jax.Array, mask: jax.Array | None) -> jax.Array:
    """softmax over the last axis (the support set), padding slots (mask False) weighted 0."""
    if mask is not None:
        logits = jnp.where(mask, logits, MASKED)
    return jax.nn.softmax(logits, -1)


def attention_log_probs(queries, support, labels, n_way: int, scale, mask=None) -> jax.Array:
    """log p(y | x, S) [Q, n_way] of the cosine attention of queries [Q, D] over support [S, D]
    with labels [S] (padding slots: mask False), floored at log EPS."""
    attention = masked_softmax(scale * unit(queries) @ unit(support).T, mask)  # [Q, S]
    probs = attention @ jax.nn.one_hot(labels, n_way)  # label -1 (padding): a zero row
    return jnp.log(jnp.maximum(probs, EPS))


# ------------------------------------------------------------------ full context embeddings


def lstm_init(key, n_in: int, n_state_in: int, n_hidden: int) -> dict:
    """An LSTM cell's weights: Glorot-uniform, forget-gate bias 1 (the usual start)."""
    kx, kh = jax.random.split(key)
    glorot = jax.nn.initializers.glorot_uniform()
    bias = jnp.zeros((4 * n_hidden,), jnp.float32).at[n_hidden : 2 * n_hidden].set(1.0)
    return {
        "wx": glorot(kx, (n_in, 4 * n_hidden), jnp.float32),
        "wh": glorot(kh, (n_state_in, 4 * n_hidden), jnp.float32),
        "b": bias,
    }


def lstm_cell(p: dict, x, h, c):
    """One LSTM step: (input x, state input h, cell c) -> (h', c'); gates i, f, g, o."""
    i, f, g, o = jnp.split(x @ p["wx"] + h @ p["wh"] + p["b"], 4, -1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return jax.nn.sigmoid(o) * jnp.tanh(c), c


def lstm_sequence(p: dict, xs, mask, reverse: bool):
    """The LSTM's outputs over xs [S, D] in order (or reversed); a padding slot leaves the
    state as it is, so the real examples see each other as in the unpadded sequence."""
    zeros = jnp.zeros(p["wh"].shape[0], xs.dtype)

    def step(carry, inputs):
        x, real = inputs
        h, c = lstm_cell(p, x, *carry)
        carry = (jnp.where(real, h, carry[0]), jnp.where(real, c, carry[1]))
        return carry, carry[0]

    real = jnp.ones(len(xs), bool) if mask is None else mask
    return jax.lax.scan(step, (zeros, zeros), (xs, real), reverse=reverse)[1]


def support_context(p: dict, support, mask):
    """g(x_i, S) = h_fwd_i + h_bwd_i + g'(x_i): [S, D]."""
    return (
        lstm_sequence(p["fwd"], support, mask, False)
        + lstm_sequence(p["bwd"], support, mask, True)
        + support
    )


def query_context(p: dict, query, g, mask, steps: int):
    """f(x, S) = attLSTM(f'(x), g(S), K) for one query f'(x) [D]."""
    h = c = jnp.zeros_like(query)
    for _ in range(steps):
        r = masked_softmax(g @ h, mask) @ g  # read with h_{k-1}
        h_hat, c = lstm_cell(p, query, jnp.concatenate([h, r]), c)
        h = h_hat + query
    return h


def make(cfg: MatchingConfig, model: Model, loss_fn: LossFn, n_out: int, **_) -> Algorithm:
    def init(key):
        k_embed, k_fwd, k_bwd, k_att = jax.random.split(key, 4)
        params = {
            "embed": model.init(k_embed, None),  # attention replaces the classifier
            "log_scale": jnp.asarray(math.log(cfg.scale), jnp.float32),
        }
        if cfg.fce:
            d = feature_size(model)
            params["fce"] = {
                "fwd": lstm_init(k_fwd, d, d, d),
                "bwd": lstm_init(k_bwd, d, d, d),
                "att": lstm_init(k_att, d, 2 * d, d),  # its state input is [h, r]
            }
        return params

    def scale(params):
        log_scale = params["log_scale"]
        return jnp.exp(log_scale if cfg.learn_scale else jax.lax.stop_gradient(log_scale))

    def adapt(params, support, key, inner_steps=0):
        g = split_outputs(lambda x: model.embed(params["embed"], x), support)
        if cfg.fce:
            g = support_context(params["fce"], g, support.mask)
        return g, support.y, support.mask

    def predict(params, task_params, x):
        g, labels, mask = task_params
        f = model.embed(params["embed"], x)
        if cfg.fce:
            f = jax.vmap(lambda q: query_context(params["fce"]["att"], q, g, mask, cfg.fce_steps))(
                f
            )
        return attention_log_probs(f, g, labels, n_out, scale(params), mask)

    return make_algorithm(init, adapt, predict, loss_fn)


registry.register("algo", "matching", MatchingConfig, make)
