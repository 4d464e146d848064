"""Transfer baseline: pre-train one network on all meta-train data, fine-tune it per test task.

Pre-training is plain supervised learning (metalearn/algorithms/_pretrain.py, shared with the
baseline and rfs learners): the tasks the loop draws carry split-wide class labels, and the loss
covers their support and query examples alike. At meta-test, adapt fine-tunes on the support
set with the CS330 options: a new head, frozen early blocks and layer-wise learning rates
(deeper blocks learn faster). Blocks and head are the model's group labels
(metalearn/models/groups.py), whatever its layout.

Transductive fine-tuning (Dhillon et al. 2020, algo.transductive_weight=W > 0) adds W times the
mean entropy of the predictions on the task's query inputs to the fine-tuning loss; their
labels are never read. It needs the query inputs, which adapt (support set only) does not get,
so the learner's evaluate fine-tunes on the whole task instead; adapt, as the public API calls
it, stays inductive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import jax

from metalearn import registry
from metalearn.algorithms._pretrain import (
    PretrainConfig,
    mean_entropy,
    pretraining_loss,
    unlabelled,
)
from metalearn.algorithms.base import (
    LossFn,
    episode_classes,
    make_algorithm,
    query_loss,
    sgd_adapt,
    split_outputs,
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
from metalearn.types import Algorithm, Split


@dataclass
class FinetuneConfig(PretrainConfig):
    kinds: ClassVar[tuple[str, ...]] = ("classification", "regression")
    name: str = "finetune"
    inner_lr: float = 0.01  # fine-tuning learning rate at meta-test
    inner_steps: int = 10  # fine-tuning steps at meta-test
    layer_decay: float = 1.0  # layer-wise lr: block i gets inner_lr * layer_decay**(depth - i)
    freeze: int = 0  # freeze the first `freeze` blocks during fine-tuning
    reinit_head: bool = True  # start fine-tuning from a freshly initialised head
    pretrain_batch: int = 0  # examples per pre-training step; 0 means meta_batch * task size
    # Dhillon et al. 2020's transductive fine-tuning: W * the mean entropy of the query inputs'
    # predictions joins the support loss (their paper weighs both terms 1); 0: inductive
    transductive_weight: float = 0.0

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
        require(
            self.transductive_weight == 0
            or (self.transductive_weight > 0 and math.isfinite(self.transductive_weight)),
            f"algo.transductive_weight={self.transductive_weight} is not allowed: it must be 0 "
            "(inductive fine-tuning) or a positive number (the weight of the query entropy).",
        )

    def check_with(self, config) -> None:
        require(
            self.reinit_head or config.data.kind != "classification",
            "algo.reinit_head=false is not allowed with classification data: the pre-trained "
            "head predicts the meta-train classes, so a test task needs a new head "
            "(algo.reinit_head=true).",
        )
        require(
            not self.transductive_weight or config.data.kind == "classification",
            f"algo.transductive_weight={self.transductive_weight} is not allowed with "
            f"data={config.data.name}: the entropy penalty is on class predictions, and "
            f"{config.data.name} is {config.data.kind}; use algo.transductive_weight=0.",
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


def transductive_loss(loss_fn: LossFn, apply, support: Split, queries: Split, weight):
    """The support loss plus weight * the mean entropy of apply's predictions on the queries'
    real inputs (queries: a split whose labels are not read), among the support set's classes."""
    logits = split_outputs(apply, queries)
    classes = episode_classes(support, logits.shape[-1])
    entropy = mean_entropy(logits, queries.mask, classes)
    return support_loss(loss_fn, apply, support) + weight * entropy


def fine_tuning(cfg: FinetuneConfig, model: Model, loss_fn: LossFn, n_out: int):
    """(adapt, adapt_task): fine-tuning from the pre-trained parameters on a support set, and on
    a task (transductive with cfg.transductive_weight: also the entropy of its query inputs)."""

    def is_head(params):
        return jax.tree.map(lambda g: g == HEAD, model.groups(params))

    def start(meta_params, key):
        if not cfg.reinit_head:
            return meta_params
        # a new head of the test task's size, the rest pre-trained
        _, trunk = partition(meta_params, is_head(meta_params))
        fresh = model.init(key, n_out)
        head, _ = partition(fresh, is_head(fresh))
        return combine(head, trunk)

    def tune(loss, meta_params, data, key, inner_steps):
        params = start(meta_params, key)
        lrs = layerwise_lrs(model.groups(params), cfg)
        return sgd_adapt(loss, params, data, lr=lrs, steps=inner_steps, first_order=True)

    def loss(params, support):
        return support_loss(loss_fn, lambda x: model.apply(params, x), support)

    def task_loss(params, data):
        support, queries = data
        apply = lambda x: model.apply(params, x)  # noqa: E731
        return transductive_loss(loss_fn, apply, support, queries, cfg.transductive_weight)

    def adapt(meta_params, support, key, inner_steps=cfg.inner_steps):
        return tune(loss, meta_params, support, key, inner_steps)

    def adapt_task(meta_params, task, key, inner_steps=cfg.inner_steps):
        data = (task.support, unlabelled(task.query))  # the query labels are never seen
        return tune(task_loss, meta_params, data, key, inner_steps)

    return adapt, adapt_task


def make(
    cfg: FinetuneConfig, model: Model, loss_fn: LossFn, n_out: int, n_train_classes: int, **_
) -> Algorithm:
    def init(key):
        params = model.init(key, n_train_classes)
        blocks = depth(model.groups(params))
        if cfg.freeze > blocks:
            raise ConfigError(
                f"algo.freeze={cfg.freeze} is more blocks than the model has ({blocks})."
            )
        return params

    adapt, adapt_task = fine_tuning(cfg, model, loss_fn, n_out)
    evaluate = None  # inductive: make_algorithm's, adapt on the support set then score

    if cfg.transductive_weight:

        def evaluate(meta_params, task, key, inner_steps=cfg.inner_steps):
            params = adapt_task(meta_params, task, key, inner_steps)
            return query_loss(loss_fn, lambda x: model.apply(params, x), task)

    return make_algorithm(
        init,
        adapt,
        lambda meta_params, task_params, x: model.apply(task_params, x),
        loss_fn,
        meta_loss=pretraining_loss(loss_fn, model.apply),
        evaluate=evaluate,
        global_labels=True,
    )


registry.register("algo", "finetune", FinetuneConfig, make)
