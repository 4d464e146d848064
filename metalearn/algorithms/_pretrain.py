"""The pre-training family's shared parts (algo=finetune, baseline, rfs).

Every member pre-trains one network as a plain classifier (or regressor) over all meta-train
classes: the loop draws tasks with split-wide labels (Algorithm.global_labels) and the loss
covers their support and query examples alike, so the episodes are only batches. The members
differ at meta-test, in what they fit to a test task's support set: finetune fine-tunes the
network with a new head (optionally transductively, with an entropy penalty on the query
inputs), baseline trains a new linear or cosine head on the frozen features, rfs solves a
logistic regression on the frozen, L2-normalised features. This module holds what they share:
the pre-training loss and classifiers, frozen features, the heads fitted on them, and the loss
terms (query entropy, distillation) with their padding masks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from metalearn.algorithms.base import (
    AlgoConfig,
    LossFn,
    masked_mean,
    sgd_adapt,
    split_loss,
    split_outputs,
    support_loss,
)
from metalearn.models import Model, feature_size
from metalearn.types import Params, Split

CLASSIFIERS = ("linear", "cosine")
# A cosine head's features and weights are divided by max(norm, NORM_EPS): exact invariance to
# the norm of any non-degenerate vector, and finite gradients at a zero one (a dead ReLU layer).
NORM_EPS = 1e-12
# Logistic regression stops once the gradient of its (mean-scaled) objective has this norm;
# float32 L-BFGS gets there in tens of iterations on few-shot support sets (against SciPy:
# tests/test_rfs.py); with weak regularisation on raw features (C = 100) it can stall above it
LOGREG_TOL = 1e-6


@dataclass
class PretrainConfig(AlgoConfig):
    """Base of the family's schemas: the capabilities they share. Their parameters are the
    pre-trained network (its head sized for the meta-train classes, whatever the episode's way),
    and every loss, head fit and statistic here reads the padding mask."""

    norms: ClassVar[tuple[str, ...]] = ("transductive", "inductive")
    any_way: ClassVar[bool] = True
    reads_padded: ClassVar[bool] = True


# ------------------------------------------------------------------------------- pre-training


def both_splits(task) -> Split:
    """A task's support and query examples as one batch (their masks too, when padded)."""
    return jax.tree.map(lambda s, q: jnp.concatenate([s, q]), task.support, task.query)


def pretraining_loss(loss_fn: LossFn, logits: Callable[[Params, jax.Array], jax.Array]):
    """meta_loss(params, task, key, step): a classifier over all meta-train classes (outputs),
    on the task's support and query examples alike (its labels are split-wide)."""

    def meta_loss(params, task, key=None, step=None):
        return split_loss(loss_fn, lambda x: logits(params, x), both_splits(task), None)

    return meta_loss


def chen_scale(n_classes: int) -> float:
    """Chen et al. 2019's cosine-classifier scale: 2 for a head of at most 200 classes, 10 for
    more (their Omniglot pre-training, thousands of classes, needs the larger one)."""
    return 2.0 if n_classes <= 200 else 10.0


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """x / ||x|| along axis (x itself where the norm is below NORM_EPS)."""
    squared = jnp.sum(jnp.square(x), axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared, NORM_EPS**2))


def cosine_logits(features: jax.Array, w: jax.Array, scale) -> jax.Array:
    """scale * cos(w_c, f) for features [B, D] and class weights w [D, N]: [B, N]."""
    return scale * (l2_normalize(features) @ l2_normalize(w, axis=0))


class Classifier(NamedTuple):
    """A network with a head of n classes: init(key, n) -> params; features(params, x) -> [B, D]
    (the embedding, which test-time heads read); logits(params, x) -> [B, n]."""

    init: Callable[[jax.Array, int], Params]
    features: Callable[[Params, jax.Array], jax.Array]
    logits: Callable[[Params, jax.Array], jax.Array]


def classifier(model: Model, kind: str = "linear", scale: float | None = None) -> Classifier:
    """The pre-training network. linear: the model itself, its own head (the parameters are the
    model's, so init_from reads them both ways). cosine (Baseline++): the model's embedding and
    class weights w [D, n] under "cosine", logits scale * cos(w_c, f(x)); scale None is
    chen_scale(n)."""
    if kind == "linear":
        return Classifier(model.init, model.embed, model.apply)

    def init(key, n_classes):
        k_embed, k_head = jax.random.split(key)
        d = feature_size(model)
        w = jax.nn.initializers.lecun_normal()(k_head, (d, n_classes), jnp.float32)
        return {"embed": model.init(k_embed, None), "cosine": {"w": w}}

    def features(params, x):
        return model.embed(params["embed"], x)

    def logits(params, x):
        w = params["cosine"]["w"]
        s = chen_scale(w.shape[1]) if scale is None else scale
        return cosine_logits(features(params, x), w, s)

    return Classifier(init, features, logits)


# ----------------------------------------------------------------- heads on frozen features


def frozen_features(features: Callable[[jax.Array], jax.Array], split: Split) -> Split:
    """The split with x replaced by its features (batch statistics over its real examples),
    held constant: nothing a head is fitted with reaches the embedding."""
    return split._replace(x=jax.lax.stop_gradient(split_outputs(features, split)))


def class_means(features: jax.Array, labels: jax.Array, n: int, mask=None) -> jax.Array:
    """[D, n]: each class's mean feature over the real examples (0 for a class without any)."""
    one_hot = jax.nn.one_hot(labels, n)
    if mask is not None:
        one_hot = one_hot * mask[:, None]
    return (features.T @ one_hot) / jnp.maximum(one_hot.sum(0), 1)


def linear_head_logits(head: Params, features: jax.Array) -> jax.Array:
    return features @ head["w"] + head["b"]


def fit_head(
    loss_fn: LossFn, logits: Callable, head: Params, support: Split, *, lr, steps: int
) -> Params:
    """`steps` full-batch gradient steps of rate lr on the support loss of logits(head, x), among
    the episode's classes; support.x holds the (frozen) features."""

    def loss(h, split):
        return support_loss(loss_fn, lambda f: logits(h, f), split)

    return sgd_adapt(loss, head, support, lr=lr, steps=steps, first_order=True)


def logistic_regression(
    features: jax.Array,
    labels: jax.Array,
    n_classes: int,
    *,
    c: float,
    max_steps: int,
    mask: jax.Array | None = None,
    classes: jax.Array | None = None,
    tol: float = LOGREG_TOL,
) -> Params:
    """Multinomial logistic regression {w [D, n], b [n]}, L2-regularised as scikit-learn's
    LogisticRegression (RFS's test classifier): it minimises

        mean_i CE(x_i w + b, y_i) + ||w||^2 / (2 C n)

    over the n real examples (the minimiser of C sum_i CE + ||w||^2 / 2; the bias is not
    penalised, and starting from 0 the solution is the one whose biases sum to 0). Solved by
    L-BFGS (optax) from zero until the gradient's norm is below tol, at most max_steps
    iterations; among the episode's classes (a padded episode's others get w = b = 0)."""
    x = features.astype(jnp.float32)
    targets = jax.nn.one_hot(labels, n_classes)
    n_real = x.shape[0] if mask is None else jnp.maximum(jnp.sum(mask), 1)

    def objective(p):
        logits = x @ p["w"] + p["b"]
        if classes is not None:
            logits = jnp.where(classes, logits, -1e9)
        ce = -jnp.sum(targets * jax.nn.log_softmax(logits), -1)
        return masked_mean(ce, mask) + jnp.sum(jnp.square(p["w"])) / (2 * c * n_real)

    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def iterate(carry):
        p, state = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = solver.update(grad, state, p, value=value, grad=grad, value_fn=objective)
        return optax.apply_updates(p, updates), state

    def running(carry):
        _, state = carry
        count = otu.tree_get(state, "count")
        grad_norm = otu.tree_norm(otu.tree_get(state, "grad"))
        return (count == 0) | ((count < max_steps) & (grad_norm >= tol))

    start = {"w": jnp.zeros((x.shape[1], n_classes)), "b": jnp.zeros((n_classes,))}
    solution, _ = jax.lax.while_loop(running, iterate, (start, solver.init(start)))
    return solution


# ---------------------------------------------------------------------------- loss terms


def mean_entropy(logits: jax.Array, mask=None, classes=None) -> jax.Array:
    """The mean over the real examples of the entropy of softmax(logits) among `classes`."""
    if classes is not None:
        logits = jnp.where(classes, logits, -1e9)  # probability 0, and 0 * finite log p
    log_p = jax.nn.log_softmax(logits)
    return masked_mean(-jnp.sum(jnp.exp(log_p) * log_p, -1), mask)


def distillation_kl(student: jax.Array, teacher: jax.Array, temperature, mask=None):
    """T^2 * mean over the real examples of KL(softmax(teacher / T) || softmax(student / T)),
    Hinton et al.'s distillation term as RFS weighs it (T^2 keeps its gradients' scale)."""
    log_s = jax.nn.log_softmax(student / temperature)
    log_t = jax.nn.log_softmax(teacher / temperature)
    kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), -1)
    return temperature**2 * masked_mean(kl, mask)


def unlabelled(split: Split) -> Split:
    """The split without its labels (all -1), for what may read a split's inputs only."""
    return split._replace(y=jnp.full(split.y.shape[:1], -1, jnp.int32))
