"""model=gru: a GRU cell (Cho et al. 2014) as a model over (hidden state, input) pairs.

A recurrent core fits the model protocol as the feed-forward map it is for one step: embed
reads x = [h, input] [B, hidden + input] and returns the next hidden state h' [B, hidden], and
head maps h' to the outputs (RL²'s policy logits and value). The learner carries h.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from metalearn import registry
from metalearn.checks import width
from metalearn.models import Model, ModelConfig
from metalearn.models.groups import label_by_names


@dataclass
class GRUConfig(ModelConfig):
    inputs: ClassVar[tuple[str, ...]] = ("transitions",)  # an agent's per-step records
    name: str = "gru"
    hidden: int = 256  # RL²'s GRU width

    def __post_init__(self) -> None:
        width("model.hidden", self.hidden)


def init(key: jax.Array, n_out: int | None, *, in_features: int, hidden: int):
    """Gates stacked [reset | update | candidate]; Glorot input weights, orthogonal recurrent
    weights (the usual GRU initialisation), zero biases; the head small, so the first policy is
    near uniform and the first values near 0."""
    k_in, k_rec, k_head = jax.random.split(key, 3)
    w_in = jax.nn.initializers.glorot_uniform()(k_in, (in_features, 3 * hidden))
    w_rec = jnp.concatenate(
        [jax.nn.initializers.orthogonal()(k, (hidden, hidden)) for k in jax.random.split(k_rec, 3)],
        axis=1,
    )
    cell = {
        "w_in": w_in,
        "w_rec": w_rec,
        "b_in": jnp.zeros(3 * hidden),
        "b_rec": jnp.zeros(3 * hidden),
    }
    if n_out is None:
        return {"blocks": [cell]}
    w = 0.01 * jax.random.normal(k_head, (hidden, n_out))
    return {"blocks": [cell], "head": {"w": w, "b": jnp.zeros(n_out)}}


def cell_step(cell, h: jax.Array, x: jax.Array) -> jax.Array:
    """h' from h [B, H] and x [B, I] (PyTorch's GRU equations)."""
    gi = x @ cell["w_in"] + cell["b_in"]
    gh = h @ cell["w_rec"] + cell["b_rec"]
    i_r, i_z, i_n = jnp.split(gi, 3, axis=-1)
    h_r, h_z, h_n = jnp.split(gh, 3, axis=-1)
    r = jax.nn.sigmoid(i_r + h_r)
    z = jax.nn.sigmoid(i_z + h_z)
    n = jnp.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h


def make(cfg: GRUConfig, input_shape: tuple[int, ...]) -> Model:
    in_features = int(np.prod(input_shape))

    def embed(params, x, hook=None):
        h, inputs = x[:, : cfg.hidden], x[:, cfg.hidden :]
        return cell_step(params["blocks"][0], h, inputs)

    def head(params, features):
        return features @ params["head"]["w"] + params["head"]["b"]

    return Model(
        init=lambda key, n_out: init(key, n_out, in_features=in_features, hidden=cfg.hidden),
        apply=lambda params, x: head(params, embed(params, x)),
        embed=embed,
        head=head,
        groups=label_by_names,
        # one example is [h, input]: what embed reads (models/__init__.py::feature_size)
        input_shape=(cfg.hidden + in_features,),
    )


registry.register("model", "gru", GRUConfig, make)
