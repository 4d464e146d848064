"""RFS (Tian et al. 2020, "Rethinking Few-Shot Image Classification: a Good Embedding Is All
You Need?").

Pre-training is the family's (metalearn/algorithms/_pretrain.py): the model as one classifier
over all meta-train classes, its cross-entropy over the support and query examples of tasks
with split-wide labels. At meta-test the embedding is frozen, the support features are
L2-normalised (algo.normalize; RFS's default) and a multinomial logistic regression is solved on
them, L2-regularised as scikit-learn's LogisticRegression(C=algo.c), which RFS calls with C=1
and max_iter=1000 (here L-BFGS too, until its gradient vanishes: _pretrain.logistic_regression).
Queries are classified by it on their normalised features. Adaptation is a convex solve, not
gradient steps: eval.inner_steps does not apply, and it needs no key.

Not implemented: RFS-distill's self-distillation generations (generation g+1 trained from
scratch against the frozen generation g, _pretrain.distillation_kl). Each generation needs its
teacher trained to the end first: a sequence of trainings, which one run's train loop (a single
objective over train.steps, resumable step by step) cannot express. This is RFS's generation 0,
the simple baseline of their table; a generation would be a second run that reads the first's
checkpoint as its teacher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from metalearn import registry
from metalearn.algorithms._pretrain import (
    PretrainConfig,
    frozen_features,
    l2_normalize,
    logistic_regression,
    pretraining_loss,
)
from metalearn.algorithms.base import LossFn, episode_classes, make_algorithm
from metalearn.checks import MAX_INNER_STEPS, at_most, require
from metalearn.models import Model
from metalearn.types import Algorithm


@dataclass
class RFSConfig(PretrainConfig):
    kinds: ClassVar[tuple[str, ...]] = ("classification",)

    name: str = "rfs"
    c: float = 1.0  # inverse L2 strength of the test-time logistic regression (sklearn's C)
    max_steps: int = 1000  # L-BFGS iterations at most (RFS: scikit-learn's max_iter=1000)
    normalize: bool = True  # L2-normalise the features the logistic regression reads

    def __post_init__(self) -> None:
        require(
            self.c > 0 and math.isfinite(self.c),
            f"algo.c={self.c} is not allowed: it must be a finite positive number (the inverse "
            "strength of the logistic regression's L2 penalty; RFS uses 1).",
        )
        require(self.max_steps >= 1, f"algo.max_steps={self.max_steps} must be >= 1.")
        at_most("algo.max_steps", self.max_steps, MAX_INNER_STEPS)


def make(
    cfg: RFSConfig, model: Model, loss_fn: LossFn, n_out: int, n_train_classes: int, **_
) -> Algorithm:
    def features(meta_params, x):
        f = model.embed(meta_params, x)
        return l2_normalize(f) if cfg.normalize else f

    def adapt(meta_params, support, key=None, inner_steps=None):
        support = frozen_features(lambda x: features(meta_params, x), support)
        return logistic_regression(
            support.x, support.y, n_out, c=cfg.c, max_steps=cfg.max_steps, mask=support.mask,
            classes=episode_classes(support, n_out),
        )  # fmt: skip

    def predict(meta_params, head, x):
        return features(meta_params, x) @ head["w"] + head["b"]

    return make_algorithm(
        lambda key: model.init(key, n_train_classes),
        adapt,
        predict,
        loss_fn,
        meta_loss=pretraining_loss(loss_fn, model.apply),
        global_labels=True,
    )


registry.register("algo", "rfs", RFSConfig, make)
