"""Baseline and Baseline++ (Chen et al. 2019, "A Closer Look at Few-shot Classification").

Pre-training is the family's (metalearn/algorithms/_pretrain.py): one classifier over all
meta-train classes. At meta-test the embedding is frozen and a new head of the test task's
classes is trained on its support features by full-batch gradient steps (algo.inner_lr,
algo.inner_steps). algo.classifier picks the head, in pre-training and at test alike:

- linear (Baseline): logits x w + b; pre-training uses the model's own head, so its parameters
  are the model's (init_from reads them both ways); the test head starts at zero.
- cosine (Baseline++): logits scale * cos(w_c, f(x)), invariant to the norms of the features
  and of the class weights; scale is algo.scale, or Chen et al.'s 2 for a head of at most 200
  classes and 10 above (their Omniglot pre-training). The test head starts at the class means
  of the normalised support features (weight imprinting), the cosine head's analogue of zero.

Chen et al. start the test head at random and train it by 100 epochs of batch-4 SGD (rate 0.01,
momentum and dampening 0.9, weight decay 0.001); here a deterministic start and plain
full-batch steps, so adaptation needs no key. Their official Baseline++ also learns a norm per
class weight (weight normalisation); here, as in their paper, the weights are normalised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax.numpy as jnp

from metalearn import registry
from metalearn.algorithms._pretrain import (
    CLASSIFIERS,
    PretrainConfig,
    chen_scale,
    class_means,
    classifier,
    cosine_logits,
    fit_head,
    frozen_features,
    l2_normalize,
    linear_head_logits,
    pretraining_loss,
)
from metalearn.algorithms.base import LossFn, make_algorithm
from metalearn.checks import MAX_INNER_STEPS, at_most, choice, positive, require
from metalearn.models import Model
from metalearn.types import Algorithm


@dataclass
class BaselineConfig(PretrainConfig):
    kinds: ClassVar[tuple[str, ...]] = ("classification",)

    name: str = "baseline"
    classifier: str = "linear"  # linear: Baseline | cosine: Baseline++ (Chen et al. 2019)
    # the cosine logits' scale; null: Chen et al.'s 2 for <= 200 classes, 10 above (per head)
    scale: float | None = None
    inner_lr: float = 0.1  # rate of the test head's full-batch gradient steps
    inner_steps: int = 100  # the test head's steps (Chen et al.: 100 epochs)

    def __post_init__(self) -> None:
        choice("algo.classifier", self.classifier, CLASSIFIERS)
        if self.scale is not None:
            positive("algo.scale", self.scale)
            require(
                self.classifier == "cosine",
                f"algo.scale={self.scale} is not allowed with algo.classifier={self.classifier}: "
                "it scales the cosine classifier's logits (algo.classifier=cosine).",
            )
        positive("algo.inner_lr", self.inner_lr)
        require(self.inner_steps >= 0, f"algo.inner_steps={self.inner_steps} must be >= 0.")
        at_most("algo.inner_steps", self.inner_steps, MAX_INNER_STEPS)


def make(
    cfg: BaselineConfig, model: Model, loss_fn: LossFn, n_out: int, n_train_classes: int, **_
) -> Algorithm:
    net = classifier(model, cfg.classifier, cfg.scale)
    cosine = cfg.classifier == "cosine"
    test_scale = chen_scale(n_out) if cfg.scale is None else cfg.scale

    def head_logits(head, features):
        if cosine:
            return cosine_logits(features, head["w"], test_scale)
        return linear_head_logits(head, features)

    def start(support):
        """The test head before its steps: imprinted class means (cosine) or zero (linear)."""
        if cosine:
            return {"w": class_means(l2_normalize(support.x), support.y, n_out, support.mask)}
        d = support.x.shape[-1]
        return {"w": jnp.zeros((d, n_out)), "b": jnp.zeros((n_out,))}

    def adapt(meta_params, support, key, inner_steps=cfg.inner_steps):
        features = frozen_features(lambda x: net.features(meta_params, x), support)
        return fit_head(
            loss_fn, head_logits, start(features), features, lr=cfg.inner_lr, steps=inner_steps
        )

    def predict(meta_params, head, x):
        return head_logits(head, net.features(meta_params, x))

    return make_algorithm(
        lambda key: net.init(key, n_train_classes),
        adapt,
        predict,
        loss_fn,
        meta_loss=pretraining_loss(loss_fn, net.logits),
        global_labels=True,
    )


registry.register("algo", "baseline", BaselineConfig, make)
