"""Relation networks (Sung et al. 2018): a learned relation module scores (class, query) pairs.

A class is represented by the sum of its support embeddings (the paper's K-shot pooling); the
relation module g_phi maps the concatenation [class embedding, query embedding] to a score in
(0, 1), and the loss is the mean squared error of the scores against the one-hot match (the
paper's objective; its sum over classes and queries, up to the constant 1 / (N Q)). Accuracy
is the argmax of the scores; the expected calibration error reads the top score as the
confidence (the scores are trained as match probabilities by the squared error).

The paper's g_phi is two conv blocks and two fully connected layers on concatenated feature
maps. metalearn's backbones give flat embeddings [B, D] (conv4's model.pool=flatten flattens
its map, but no model exposes the map itself), so g_phi here is the paper's two fully connected
layers on the flat concatenation: ReLU(W1 [c; q] + b1) of algo.relation_hidden units (the
paper's 8) -> sigmoid(W2 h + b2). Its parameters are meta-learned with the embedding's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from metalearn import registry
from metalearn.algorithms.base import (
    AlgoConfig,
    LossFn,
    calibration_error,
    make_algorithm,
    masked_mean,
    split_outputs,
)
from metalearn.checks import width
from metalearn.models import Model, feature_size, norm
from metalearn.types import Algorithm, Metrics


@dataclass
class RelationConfig(AlgoConfig):
    norms: ClassVar[tuple[str, ...]] = ("transductive", "inductive")
    any_way: ClassVar[bool] = True
    kinds: ClassVar[tuple[str, ...]] = ("classification",)
    reads_padded: ClassVar[bool] = True

    name: str = "relation"
    relation_hidden: int = 8  # the relation module's hidden units (the paper's FC layer)

    def __post_init__(self) -> None:
        width("algo.relation_hidden", self.relation_hidden)


def class_sums(embeddings, labels, n_way: int, mask=None) -> jax.Array:
    """Sum of the real support embeddings per class: [n_way, D] (zero for an absent class)."""
    one_hot = jax.nn.one_hot(labels, n_way)
    if mask is not None:
        one_hot = one_hot * mask[:, None]
    return one_hot.T @ embeddings


def relation_init(key, features: int, hidden: int) -> dict:
    """g_phi's two layers, zero biases. The first starts antisymmetric, W1 = [W; -W] (W
    He-normal), so g_phi starts as a function of c - q: with independent halves it starts by
    ranking the classes by their own term, the same for every query, and on the tiny-image
    test task stays at chance for ~150 Adam steps (measured) before it learns to compare; both
    halves are learned freely from there. The second layer is Glorot-normal."""
    k1, k2 = jax.random.split(key)
    w = jax.nn.initializers.he_normal()(k1, (features, hidden), jnp.float32)
    return {
        "w1": jnp.concatenate([w, -w]),  # rows: the class half, then the query half
        "b1": jnp.zeros((hidden,), jnp.float32),
        "w2": jax.nn.initializers.glorot_normal()(k2, (hidden, 1), jnp.float32),
        "b2": jnp.zeros((1,), jnp.float32),
    }


def relation_scores(p: dict, classes: jax.Array, queries: jax.Array) -> jax.Array:
    """g_phi([c_j; q_i]) for every query i and class j: [Q, N] in (0, 1). The first layer is
    split into its class and query halves, so the [Q, N, 2D] pairs are never built."""
    d = classes.shape[-1]
    pre = (queries @ p["w1"][d:])[:, None, :] + (classes @ p["w1"][:d])[None, :, :] + p["b1"]
    return jax.nn.sigmoid(jax.nn.relu(pre) @ p["w2"][:, 0] + p["b2"][0])


def relation_loss(scores, labels, mask=None, classes=None) -> tuple[jax.Array, Metrics]:
    """Mean squared error of scores [Q, N] against the one-hot labels over the real queries
    (mask) and the classes the episode has (classes), and accuracy; at meta-test also the
    expected calibration error of the top score."""
    targets = jax.nn.one_hot(labels, scores.shape[-1])
    squared = (scores - targets) ** 2
    if classes is None:
        per_query = squared.mean(-1)
    else:
        per_query = jnp.sum(squared * classes, -1) / jnp.maximum(jnp.sum(classes), 1)
        scores = jnp.where(classes, scores, -1.0)  # below any sigmoid: never the argmax
    loss = masked_mean(per_query, mask)
    correct = (jnp.argmax(scores, -1) == labels).astype(jnp.float32)
    metrics = {"loss": loss, "accuracy": masked_mean(correct, mask)}
    if norm.is_testing():
        top = jax.lax.stop_gradient(jnp.max(scores, -1))
        metrics["ece"] = calibration_error(top, jax.lax.stop_gradient(correct), mask)
    return loss, metrics


def make(cfg: RelationConfig, model: Model, loss_fn: LossFn, n_out: int, **_) -> Algorithm:
    def init(key):
        k_embed, k_rel = jax.random.split(key)
        return {
            "embed": model.init(k_embed, None),  # the relation module replaces the classifier
            "relation": relation_init(k_rel, feature_size(model), cfg.relation_hidden),
        }

    def adapt(params, support, key, inner_steps=0):
        embeddings = split_outputs(lambda x: model.embed(params["embed"], x), support)
        return class_sums(embeddings, support.y, n_out, support.mask)

    def predict(params, classes, x):
        return relation_scores(params["relation"], classes, model.embed(params["embed"], x))

    # the paper's squared-error objective replaces the task's cross-entropy (loss_fn)
    return make_algorithm(init, adapt, predict, relation_loss)


registry.register("algo", "relation", RelationConfig, make)
