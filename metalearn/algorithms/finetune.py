"""Transfer baseline: pre-train one network on all meta-train data, fine-tune it per test task.

Pre-training is plain supervised learning: the tasks the loop draws carry split-wide class
labels, and the loss covers their support and query examples alike. At meta-test, adapt
fine-tunes on the support set with the CS330 options: a new head, frozen early blocks and
layer-wise learning rates (deeper blocks learn faster). Blocks and head are the model's group
labels (metalearn/models/groups.py), whatever its layout.
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
    make_algorithm,
    sgd_adapt,
    split_loss,
    support_loss,
)
from metalearn.checks import (
    MAX_INNER_STEPS,
    MAX_TASKS,
    ConfigError,
    at_most,
    positive,
    require,
)
from metalearn.models import Model
from metalearn.models.groups import HEAD, STATE, block_index, combine, depth, partition
from metalearn.types import Algorithm


@dataclass
class FinetuneConfig(AlgoConfig):
    norms: ClassVar[tuple[str, ...]] = ("transductive", "inductive")
    any_way: ClassVar[bool] = True
    reads_padded: ClassVar[bool] = True
    name: str = "finetune"
    inner_lr: float = 0.01  # fine-tuning learning rate at meta-test
    inner_steps: int = 10  # fine-tuning steps at meta-test
    layer_decay: float = 1.0  # layer-wise lr: block i gets inner_lr * layer_decay**(depth - i)
    freeze: int = 0  # freeze the first `freeze` blocks during fine-tuning
    reinit_head: bool = True  # start fine-tuning from a freshly initialised head
    pretrain_batch: int = 0  # examples per pre-training step; 0 means meta_batch * task size

    def __post_init__(self) -> None:
        positive("algo.inner_lr", self.inner_lr)
        require(self.inner_steps >= 0, f"algo.inner_steps={self.inner_steps} must be >= 0.")
        at_most("algo.inner_steps", self.inner_steps, MAX_INNER_STEPS)
        at_most("algo.pretrain_batch", self.pretrain_batch, MAX_TASKS)
        require(
            0 < self.layer_decay <= 1, f"algo.layer_decay={self.layer_decay} must be in (0, 1]."
        )
        require(self.freeze >= 0, f"algo.freeze={self.freeze} must be >= 0.")
        require(
            self.pretrain_batch >= 0, f"algo.pretrain_batch={self.pretrain_batch} must be >= 0."
        )

    def check_with(self, config) -> None:
        require(
            self.reinit_head or config.data.kind != "classification",
            "algo.reinit_head=false is not allowed with classification data: the pre-trained "
            "head predicts the meta-train classes, so a test task needs a new head "
            "(algo.reinit_head=true).",
        )


def layerwise_lrs(labels, cfg: FinetuneConfig):
    """Block i of n gets inner_lr * layer_decay**(n - i), 0 when frozen; the head (and any leaf
    outside the blocks) gets inner_lr. `labels` is the model's group-label tree."""
    n = depth(labels)

    def rate(label):
        if label == STATE:  # running statistics are not fine-tuned
            return 0.0
        i = block_index(label)
        if i is None:
            return cfg.inner_lr
        return 0.0 if i < cfg.freeze else cfg.inner_lr * cfg.layer_decay ** (n - i)

    return jax.tree.map(rate, labels)


def make(
    cfg: FinetuneConfig, model: Model, loss_fn: LossFn, n_out: int, n_train_classes: int, **_
) -> Algorithm:
    def loss(params, split):
        return support_loss(loss_fn, lambda x: model.apply(params, x), split)

    def meta_loss(params, task, key, step=None):
        """Pre-training: a classifier over all meta-train classes, on support and query alike."""
        both = jax.tree.map(lambda s, q: jnp.concatenate([s, q]), task.support, task.query)
        return split_loss(loss_fn, lambda x: model.apply(params, x), both, None)

    def is_head(params):
        return jax.tree.map(lambda g: g == HEAD, model.groups(params))

    def init(key):
        params = model.init(key, n_train_classes)
        blocks = depth(model.groups(params))
        if cfg.freeze > blocks:
            raise ConfigError(
                f"algo.freeze={cfg.freeze} is more blocks than the model has ({blocks})."
            )
        return params

    def adapt(meta_params, support, key, inner_steps=cfg.inner_steps):
        params = meta_params
        if cfg.reinit_head:  # a new head of the test task's size, the rest pre-trained
            _, trunk = partition(meta_params, is_head(meta_params))
            fresh = model.init(key, n_out)
            head, _ = partition(fresh, is_head(fresh))
            params = combine(head, trunk)
        return sgd_adapt(
            loss,
            params,
            support,
            lr=layerwise_lrs(model.groups(params), cfg),
            steps=inner_steps,
            first_order=True,
        )

    return make_algorithm(
        init,
        adapt,
        lambda meta_params, task_params, x: model.apply(task_params, x),
        loss_fn,
        meta_loss=meta_loss,
        global_labels=True,
    )


registry.register("algo", "finetune", FinetuneConfig, make)
