"""Black-box meta-learners: a sequence model reads the labelled support set and answers queries.

MANN / SNAIL style (Santoro et al. 2016; Mishra et al. 2018). The episode is a sequence of
tokens [embed(x_i), label_i, 1]: the one-hot label for classification, the raw target for
regression, and a flag saying the token carries a label. A query is [embed(x), 0, 0], its label
blank. `adapt` reads the support set; `predict` answers every query from what was read. No
query sees another one: each is answered as if it were the only token after the support set,
all of them in parallel.

Every core runs as two streams. The support stream (in adapt) never sees a query; the query
stream (in predict) has one row per query, and at each layer it reads the support stream's
activations of that layer. For the causal cores this equals running [support; query] once per
query and keeping the last position (tests/test_blackbox.py checks it), at the cost of one run.

Cores (algo.core):
- lstm: stacked LSTM cells read the support tokens in order (lax.scan); a query is one more
  step from the final state. It depends on the support order.
- snail: attention blocks and temporal-convolution blocks (dense blocks of gated, dilated,
  causal convolutions), interleaved as in SNAIL; the query is the last position. Causal, so it
  depends on the support order.
- transformer: pre-LN self-attention blocks over the support tokens with no positional encoding;
  the query attends to the support tokens and itself. Invariant to the support order.

The episodic sampler lists the support set sorted by label (0, 0, 1, 1, ...). With
algo.shuffle_support (the default) adapt shuffles it with its key, so the order-dependent cores
cannot read labels off positions and must read the label inputs.

The encoder is the model's embedding (conv4 for images, mlp for sinusoids). conv4's batch norm
uses the statistics of the batch it embeds (support set, query set), as for every algorithm
here; the core itself never mixes queries.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from metalearn import registry
from metalearn.algorithms.base import AlgoConfig, LossFn, make_algorithm
from metalearn.checks import MAX_DEPTH, MAX_WIDTH, ConfigError, at_most, choice, require
from metalearn.models import Model, feature_size
from metalearn.types import Algorithm, Split

BLACKBOX_CORES = ("lstm", "snail", "transformer")


@dataclass
class BlackBoxConfig(AlgoConfig):
    """A sequence model that reads the labelled support set (metalearn/algorithms/blackbox.py).
    It has no inner loop, so no inner_steps."""

    name: str = "blackbox"
    core: str = "transformer"  # lstm | snail | transformer
    hidden: int = 128  # lstm: state size; transformer: width; snail: filters per dense block
    layers: int = 2  # lstm: stacked cells; transformer: blocks; snail: (TC, attention) pairs
    heads: int = 4  # transformer: attention heads (hidden must be a multiple)
    tc_layers: int = 0  # snail: dense blocks per TC block; 0: ceil(log2(support size + 1))
    shuffle_support: bool = True  # shuffle the (label-sorted) support sequence in every episode

    def __post_init__(self) -> None:
        choice("algo.core", self.core, BLACKBOX_CORES)
        require(self.hidden >= 4, f"algo.hidden={self.hidden} must be >= 4.")
        require(self.layers >= 1, f"algo.layers={self.layers} must be >= 1.")
        require(self.heads >= 1, f"algo.heads={self.heads} must be >= 1.")
        at_most("algo.hidden", self.hidden, MAX_WIDTH)
        at_most("algo.layers", self.layers, MAX_DEPTH)
        at_most("algo.heads", self.heads, MAX_WIDTH)
        at_most("algo.tc_layers", self.tc_layers, MAX_DEPTH)
        require(
            self.core != "transformer" or self.hidden % self.heads == 0,
            f"algo.hidden={self.hidden} with algo.heads={self.heads} is not allowed: the "
            "transformer splits its width evenly over the heads, so hidden must be a multiple "
            "of heads.",
        )
        require(self.tc_layers >= 0, f"algo.tc_layers={self.tc_layers} must be >= 0.")


LN_EPS = 1e-5


class Core(NamedTuple):
    """A sequence learner over tokens, as pure functions.

    init(key, d_in, n_out) -> params
    read(params, support_tokens [S, d_in]) -> memory: what the queries need from the support
    answer(params, memory, query_tokens [Q, d_in]) -> outputs [Q, n_out], queries independent
    sequence(params, tokens [T, d_in]) -> outputs [T, n_out] at every position: the plain
        causal run that read + answer reproduce for a query at the end (causal cores only)
    """

    init: Callable[[jax.Array, int, int], Any]
    read: Callable[[Any, jax.Array], Any]
    answer: Callable[[Any, Any, jax.Array], jax.Array]
    sequence: Callable[[Any, jax.Array], jax.Array] | None = None


# ------------------------------------------------------------------------------- shared pieces


def dense_init(key, fan_in: int, fan_out: int) -> dict:
    w = jax.nn.initializers.lecun_normal()(key, (fan_in, fan_out), jnp.float32)
    return {"w": w, "b": jnp.zeros((fan_out,), jnp.float32)}


def dense(p: dict, x: jax.Array) -> jax.Array:
    return x @ p["w"] + p["b"]


def layer_norm_init(width: int) -> dict:
    return {"scale": jnp.ones((width,), jnp.float32), "offset": jnp.zeros((width,), jnp.float32)}


def layer_norm(p: dict, x: jax.Array) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + LN_EPS) * p["scale"] + p["offset"]


def attend(q, k, v, causal: bool) -> jax.Array:
    """Support stream: q, k [S, H, dk], v [S, H, dv] -> [S, H, dv]; causal: i sees j <= i."""
    logits = jnp.einsum("ihd,jhd->hij", q, k) / math.sqrt(q.shape[-1])
    if causal:
        n = q.shape[0]
        logits = jnp.where(jnp.tril(jnp.ones((n, n), bool)), logits, -jnp.inf)
    return jnp.einsum("hij,jhd->ihd", jax.nn.softmax(logits, -1), v)


def attend_support_and_self(q, k_support, v_support, k_self, v_self) -> jax.Array:
    """Query stream: each query [Q, H, dk] attends to the support keys [S, H, dk] and to its own
    key, never to another query's: -> [Q, H, dv]."""
    scale = 1 / math.sqrt(q.shape[-1])
    to_support = jnp.einsum("qhd,shd->qhs", q, k_support) * scale
    to_self = jnp.sum(q * k_self, -1, keepdims=True) * scale  # [Q, H, 1]
    weights = jax.nn.softmax(jnp.concatenate([to_support, to_self], -1), -1)
    return jnp.einsum("qhs,shd->qhd", weights[..., :-1], v_support) + weights[..., -1:] * v_self


# ----------------------------------------------------------------------------------------- lstm


def lstm_core(cfg: BlackBoxConfig) -> Core:
    hidden = cfg.hidden

    def init(key, d_in, n_out):
        keys = jax.random.split(key, 2 * cfg.layers + 1)
        cells = []
        for i in range(cfg.layers):
            fan_in = d_in if i == 0 else hidden
            b = jnp.zeros((4 * hidden,), jnp.float32).at[hidden : 2 * hidden].set(1.0)
            cells.append(
                {
                    "wx": jax.nn.initializers.lecun_normal()(keys[2 * i], (fan_in, 4 * hidden)),
                    "wh": jax.nn.initializers.orthogonal()(keys[2 * i + 1], (hidden, 4 * hidden)),
                    "b": b,  # forget-gate bias 1: remember by default early in training
                }
            )
        return {"cells": cells, "readout": dense_init(keys[-1], hidden, n_out)}

    def step(cells, state, x):
        """One token through the stacked cells; state is a list of (h, c) per cell."""
        new_state = []
        for cell, (h, c) in zip(cells, state):
            i, f, g, o = jnp.split(x @ cell["wx"] + h @ cell["wh"] + cell["b"], 4, -1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            new_state.append((h, c))
            x = h
        return new_state

    def scan(params, tokens):
        """(final state, top hidden state at every position)."""
        zeros = jnp.zeros((hidden,), tokens.dtype)
        state = [(zeros, zeros) for _ in params["cells"]]

        def body(state, x):
            state = step(params["cells"], state, x)
            return state, state[-1][0]

        return jax.lax.scan(body, state, tokens)

    def read(params, tokens):
        return scan(params, tokens)[0]

    def answer(params, state, queries):
        def one(q):
            return dense(params["readout"], step(params["cells"], state, q)[-1][0])

        return jax.vmap(one)(queries)

    def sequence(params, tokens):
        return dense(params["readout"], scan(params, tokens)[1])

    return Core(init, read, answer, sequence)


# ---------------------------------------------------------------------------------------- snail


def snail_plan(cfg: BlackBoxConfig, support_size: int | None) -> list[tuple]:
    """The block sequence: attention, then `layers` x (TC block, attention).

    Attention i has key size hidden/2 for i = 0 and hidden * 2^i after, values half that:
    (64, 32), (256, 128), (512, 256) at hidden=128, layers=2, SNAIL's Omniglot sizes. A TC block
    is tc_layers dense blocks of `hidden` filters with dilations 2, 4, 8, ...; tc_layers=0 means
    ceil(log2 T), T = support size + 1, as in the paper.
    """
    tc_layers = cfg.tc_layers
    if tc_layers == 0:
        if support_size is None:
            raise ConfigError(
                "algo.core=snail with algo.tc_layers=0 sizes its TC blocks from the episode length "
                "(data.n_way * data.k_shot + 1), which is unknown here; set algo.tc_layers >= 1."
            )
        tc_layers = max(1, math.ceil(math.log2(support_size + 1)))

    def attention(i):
        key_size = cfg.hidden // 2 if i == 0 else cfg.hidden * 2**i
        return ("attention", key_size, max(1, key_size // 2))

    plan = [attention(0)]
    for i in range(1, cfg.layers + 1):
        plan += [("dense", 2**j) for j in range(1, tc_layers + 1)]
        plan.append(attention(i))
    return plan


def snail_core(cfg: BlackBoxConfig, support_size: int | None) -> Core:
    plan = snail_plan(cfg, support_size)

    def init(key, d_in, n_out):
        keys = jax.random.split(key, len(plan) + 1)
        blocks, width = [], d_in
        for k, (kind, *sizes) in zip(keys, plan):
            if kind == "attention":
                key_size, value_size = sizes
                kq, kk, kv = jax.random.split(k, 3)
                blocks.append(
                    {
                        "q": dense_init(kq, width, key_size),
                        "k": dense_init(kk, width, key_size),
                        "v": dense_init(kv, width, value_size),
                    }
                )
                width += value_size
            else:  # a dense block: filter and gate of a kernel-2 causal conv, both taps
                k_now, k_past = jax.random.split(k)
                blocks.append(
                    {
                        "now": dense_init(k_now, width, 2 * cfg.hidden),
                        "past": dense_init(k_past, width, 2 * cfg.hidden)["w"],
                    }
                )
                width += cfg.hidden
        return {"blocks": blocks, "readout": dense_init(keys[-1], width, n_out)}

    def gated(z):
        f, g = jnp.split(z, 2, -1)
        return jnp.tanh(f) * jax.nn.sigmoid(g)

    def support_block(kind, dilation, p, h):
        """One block on the support sequence h [S, C] (causal) -> [S, C + added]."""
        if kind == "attention":
            q, k, v = (dense(p[n], h)[:, None, :] for n in ("q", "k", "v"))
            return jnp.concatenate([h, attend(q, k, v, causal=True)[:, 0]], -1)
        past = jnp.concatenate([jnp.zeros((dilation,) + h.shape[1:], h.dtype), h])[: len(h)]
        return jnp.concatenate([h, gated(dense(p["now"], h) + past @ p["past"])], -1)

    def query_block(kind, dilation, p, hs, hq):
        """The same block for queries hq [Q, C], each at position S after the support hs."""
        if kind == "attention":
            q, k, v = (dense(p[n], hq)[:, None, :] for n in ("q", "k", "v"))
            ks, vs = (dense(p[n], hs)[:, None, :] for n in ("k", "v"))
            return jnp.concatenate([hq, attend_support_and_self(q, ks, vs, k, v)[:, 0]], -1)
        z = dense(p["now"], hq)
        if dilation <= len(hs):  # the tap `dilation` steps back lands on a support token
            z = z + hs[len(hs) - dilation] @ p["past"]
        return jnp.concatenate([hq, gated(z)], -1)

    def support_stream(params, tokens):
        """(each block's input, the last block's output), all causal over the positions."""
        inputs, h = [], tokens
        for (kind, *sizes), p in zip(plan, params["blocks"]):
            inputs.append(h)
            h = support_block(kind, sizes[0], p, h)
        return inputs, h

    def read(params, tokens):
        return support_stream(params, tokens)[0]

    def answer(params, support_inputs, queries):
        h = queries
        for (kind, *sizes), p, hs in zip(plan, params["blocks"], support_inputs):
            h = query_block(kind, sizes[0], p, hs, h)
        return dense(params["readout"], h)

    def sequence(params, tokens):
        return dense(params["readout"], support_stream(params, tokens)[1])

    return Core(init, read, answer, sequence)


# ---------------------------------------------------------------------------------- transformer


def transformer_core(cfg: BlackBoxConfig) -> Core:
    width, heads = cfg.hidden, cfg.heads

    def init(key, d_in, n_out):
        keys = jax.random.split(key, 4 * cfg.layers + 2)
        blocks = []
        for i in range(cfg.layers):
            k = keys[4 * i : 4 * i + 4]
            blocks.append(
                {
                    "ln_attention": layer_norm_init(width),
                    "qkv": dense_init(k[0], width, 3 * width),
                    "out": dense_init(k[1], width, width),
                    "ln_mlp": layer_norm_init(width),
                    "mlp_in": dense_init(k[2], width, 2 * width),
                    "mlp_out": dense_init(k[3], 2 * width, width),
                }
            )
        return {
            "embed": dense_init(keys[-2], d_in, width),
            "blocks": blocks,
            "ln_final": layer_norm_init(width),
            "readout": dense_init(keys[-1], width, n_out),
        }

    def qkv(p, h):
        a = layer_norm(p["ln_attention"], h)
        return jnp.split(dense(p["qkv"], a).reshape(len(h), heads, 3 * (width // heads)), 3, -1)

    def mlp(p, h):
        return h + dense(p["mlp_out"], jax.nn.gelu(dense(p["mlp_in"], layer_norm(p["ln_mlp"], h))))

    def support_block(p, h):
        q, k, v = qkv(p, h)
        return mlp(p, h + dense(p["out"], attend(q, k, v, causal=False).reshape(h.shape)))

    def query_block(p, hs, hq):
        q, k, v = qkv(p, hq)
        _, ks, vs = qkv(p, hs)
        read = attend_support_and_self(q, ks, vs, k, v).reshape(hq.shape)
        return mlp(p, hq + dense(p["out"], read))

    def read(params, tokens):
        inputs, h = [], dense(params["embed"], tokens)
        for p in params["blocks"]:
            inputs.append(h)
            h = support_block(p, h)
        return inputs

    def answer(params, support_inputs, queries):
        h = dense(params["embed"], queries)
        for p, hs in zip(params["blocks"], support_inputs):
            h = query_block(p, hs, h)
        return dense(params["readout"], layer_norm(params["ln_final"], h))

    return Core(init, read, answer)


# ------------------------------------------------------------------------------------ algorithm


def make_core(cfg: BlackBoxConfig, support_size: int | None) -> Core:
    if cfg.core == "lstm":
        return lstm_core(cfg)
    if cfg.core == "snail":
        return snail_core(cfg, support_size)
    return transformer_core(cfg)


def support_size_of(config) -> int | None:
    """Support examples per episode from the data config (None when not given)."""
    data = getattr(config, "data", None)
    if data is None:
        return None
    return data.k_shot * (data.n_way if data.kind == "classification" else 1)


def make(
    cfg: BlackBoxConfig, model: Model, loss_fn: LossFn, n_out: int, *, config=None, **_
) -> Algorithm:
    core = make_core(cfg, support_size_of(config))

    def tokens(meta_params, x, y=None):
        """[embed(x), label, has_label]; y None gives blank-label query tokens."""
        features = model.embed(meta_params["encoder"], x)
        if y is None:
            label = jnp.zeros((len(x), n_out + 1), features.dtype)
        else:  # integer class labels are one-hot; regression targets go in as they are
            classes = jnp.issubdtype(y.dtype, jnp.integer)
            target = jax.nn.one_hot(y, n_out) if classes else y.reshape(len(y), n_out)
            label = jnp.concatenate([target, jnp.ones((len(y), 1))], -1)
        return jnp.concatenate([features, label.astype(features.dtype)], -1)

    def init(key):
        k_encoder, k_core = jax.random.split(key)
        encoder = model.init(k_encoder, None)
        features = feature_size(model)
        return {"encoder": encoder, "core": core.init(k_core, features + n_out + 1, n_out)}

    def adapt(meta_params, support: Split, key, inner_steps=0):
        del inner_steps  # nothing to step: reading the support set is the adaptation
        if cfg.shuffle_support:
            order = jax.random.permutation(key, len(support.y))
            support = Split(support.x[order], support.y[order])
        return core.read(meta_params["core"], tokens(meta_params, support.x, support.y))

    def predict(meta_params, memory, x):
        return core.answer(meta_params["core"], memory, tokens(meta_params, x))

    return make_algorithm(init, adapt, predict, loss_fn)


registry.register("algo", "blackbox", BlackBoxConfig, make)
