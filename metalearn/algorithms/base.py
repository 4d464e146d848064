"""What every algorithm shares: its schema's base, the task loss, the inner SGD loop, and the
episodic objective that `make_algorithm` gives a learner unless it brings its own."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax
from omegaconf import MISSING

from metalearn.models import norm, randomness
from metalearn.types import Algorithm, Metrics, Objective, Params, Split

# loss_fn(outputs, targets, mask=None, classes=None) -> (loss, metrics): mask (bool [n]) marks
# the real examples of a padded split, classes (bool [outputs]) the classes an episode has
LossFn = Callable[..., tuple[jax.Array, Metrics]]


@dataclass
class AlgoConfig:
    """Base of every algorithm's schema. Its capabilities, which the shared checks read
    (metalearn/config.py::check_combination), are class variables:

    kinds: the data kinds it learns from ("classification", "regression");
    multitask_data: trains one model on a fixed set of tasks with ids (multi-task data), not
        on a task distribution;
    conditioned: feeds a task descriptor through the conditioning group;
    norms: the batch-norm modes it supports (metalearn/models/norm.py): inductive needs a
        training objective whose batch norms see each task's batches once, not through a
        learned update rule (Reptile's, iMAML's) or a task weighting.
    any_way: its parameters do not depend on the number of classes of an episode, so it can
        train on episodes of another way than it is tested on (train.n_way).
    reads_padded: it reads padded splits (types.Split.mask) in every loss, prototype, statistic
        and metric (through split_loss / split_outputs / masked_mean), so it can train on
        variable-way, variable-shot episodes (DataConfig.padded).
    predictive: what its predict returns for regression (PREDICTIVES): "point" predictions, or
        a "gaussian" predictive distribution, a pair (mean, std) of arrays shaped as the
        targets, which it is trained and scored by through gaussian_loss (log-likelihood per
        target point, MSE, and at meta-test the coverage of central predictive intervals).
    An algorithm's own cross-group rules go in `check_with(config)`.
    """

    kinds: ClassVar[tuple[str, ...]] = ("classification", "regression")
    multitask_data: ClassVar[bool] = False
    conditioned: ClassVar[bool] = False
    norms: ClassVar[tuple[str, ...]] = ("transductive",)
    any_way: ClassVar[bool] = False
    reads_padded: ClassVar[bool] = False
    predictive: ClassVar[str] = "point"

    name: str = MISSING
    # Start the model's parameter groups `init_groups` (labels: metalearn/models/groups.py) from
    # the best checkpoint of another run of the same model, any algorithm (metalearn/init_from.py).
    init_from: str | None = None
    init_groups: list[str] = field(default_factory=lambda: ["blocks"])

    def __post_init__(self) -> None:
        pass

    def check_with(self, config: Any) -> None:
        """Checks against the other groups' settings (the typed top-level config)."""


def make_algorithm(
    init: Callable,
    adapt: Callable,
    predict: Callable,
    loss_fn: LossFn,
    *,
    meta_loss: Callable | None = None,
    evaluate: Callable | None = None,
    objective: Objective | None = None,
    optimizer: Callable | None = None,
    global_labels: bool = False,
) -> Algorithm:
    """An Algorithm from a learner's init/adapt/predict; by default it is trained on the query
    loss after adapting to the support set (the same function it is tested by, so meta-test
    adaptation cannot drift from what training optimised), by Adam on the mean over tasks."""

    def episodic(params, task, key, inner_steps):
        task_params = adapt(params, task.support, key, inner_steps)
        return query_loss(loss_fn, lambda x: predict(params, task_params, x), task)

    def episodic_loss(params, task, key, step=0):
        task_params = adapt(params, task.support, key)  # the training number of inner steps
        return query_loss(loss_fn, lambda x: predict(params, task_params, x), task)

    meta_loss = meta_loss or episodic_loss
    return Algorithm(
        init=init,
        adapt=adapt,
        predict=predict,
        meta_loss=meta_loss,
        evaluate=evaluate or episodic,
        objective=objective or mean_task_loss(meta_loss),
        optimizer=optimizer or adam,
        global_labels=global_labels,
    )


def adam(train_cfg) -> optax.GradientTransformation:
    return optax.adam(train_cfg.outer_lr)


OUTER_SCHEDULES = ("constant", "cosine")


def scheduled_adam(schedule: str, min_lr: float) -> Callable:
    """Adam whose rate follows `schedule` over train.steps: constant, or cosine-annealed from
    train.outer_lr to min_lr (MAML++). The schedule counts updates (the optimizer state), so a
    resumed run continues it; a run stopped early by train.max_minutes ends before its end."""

    def optimizer(train_cfg) -> optax.GradientTransformation:
        if schedule == "constant":
            return adam(train_cfg)
        lr = optax.cosine_decay_schedule(
            train_cfg.outer_lr, train_cfg.steps, alpha=min(min_lr / train_cfg.outer_lr, 1.0)
        )
        return optax.adam(lr)

    return optimizer


def mean_task_loss(meta_loss: Callable) -> Objective:
    """The objective of most learners: the mean over the batch of each task's meta_loss."""

    def gradient(params, state, tasks, keys, step, task_mean):
        grads, metrics = task_mean(lambda p, task, key: meta_loss(p, task, key, step))
        return grads, state, metrics

    return Objective(init_state=lambda: (), gradient=gradient)


def direction_loss(params: Params, direction: Params) -> jax.Array:
    """A surrogate loss whose gradient with respect to params is `direction` (held constant), for
    learners whose update direction is not the gradient of a loss (Reptile, iMAML): they then
    take the same gradient path, chunking and sharding as every other learner."""
    products = jax.tree.map(lambda p, d: jnp.vdot(p, jax.lax.stop_gradient(d)), params, direction)
    return sum(jax.tree.leaves(products))


def task_gradient(algo: Algorithm, params: Params, task, key, step=0) -> tuple[Params, Metrics]:
    """One task's update direction and metrics: the gradient of its meta_loss."""
    grads, metrics = jax.grad(lambda p: algo.meta_loss(p, task, key, step), has_aux=True)(params)
    return grads, metrics


def classification_loss(
    logits: jax.Array, labels: jax.Array, mask=None, classes=None
) -> tuple[jax.Array, Metrics]:
    """Cross-entropy (the negative log-likelihood) and accuracy over the real examples (mask),
    among the classes the episode has (classes: a head of data.max_way outputs scores episodes
    of fewer ways); at meta-test (validation and test) also the expected calibration error."""
    if classes is not None:
        logits = jnp.where(classes, logits, -1e9)  # not -inf: 0 * inf would be NaN
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
    loss = masked_mean(ce, mask)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    accuracy = masked_mean(correct, mask)
    metrics = {"loss": loss, "accuracy": accuracy}
    if norm.is_testing():  # the evaluator's trace: not in every training step
        confidence = jax.lax.stop_gradient(jnp.max(jax.nn.softmax(logits, -1), -1))
        metrics["ece"] = calibration_error(confidence, jax.lax.stop_gradient(correct), mask)
    return loss, metrics


ECE_BINS = 15  # equal-width confidence bins, as Guo et al. 2017


def calibration_error(confidence: jax.Array, correct: jax.Array, mask=None) -> jax.Array:
    """Expected calibration error of one task's predictions: sum over confidence bins of
    |accuracy - mean confidence| weighted by the bin's share of the examples (Guo et al. 2017),
    computed per task (the evaluation reports its mean over test tasks)."""
    weight = jnp.ones_like(confidence) if mask is None else mask.astype(confidence.dtype)
    bins = jnp.clip(jnp.floor(confidence * ECE_BINS), 0, ECE_BINS - 1).astype(jnp.int32)
    gaps = jax.ops.segment_sum((correct - confidence) * weight, bins, ECE_BINS)
    return jnp.sum(jnp.abs(gaps)) / jnp.maximum(jnp.sum(weight), 1)


def regression_loss(
    predictions: jax.Array, targets: jax.Array, mask=None, classes=None
) -> tuple[jax.Array, Metrics]:
    """Mean squared error over the real examples (classes: classification only, unused)."""
    if mask is None:
        loss = jnp.mean((predictions - targets) ** 2)
    else:
        per_example = jnp.square(predictions - targets).reshape(len(mask), -1).mean(-1)
        loss = masked_mean(per_example, mask)
    return loss, {"loss": loss}


# central predictive intervals whose coverage meta-test reports: level -> the half-width in
# standard deviations, Phi^-1((1 + level) / 2)
COVERAGE_LEVELS = {
    level: statistics.NormalDist().inv_cdf((1 + level / 100) / 2) for level in (50, 90, 95)
}


def gaussian_loss(
    outputs: tuple[jax.Array, jax.Array], targets: jax.Array, mask=None, classes=None
) -> tuple[jax.Array, Metrics]:
    """The negative log-likelihood per target point of a Gaussian predictive, outputs = (mean,
    std) shaped as targets [n, d] (a point's log-likelihood sums over its d outputs), over the
    real examples (mask). Metrics: loss, log_likelihood (its negative), mse of the mean, and at
    meta-test coverage_L: the share of target values inside the central L% interval of their
    predictive (for L in COVERAGE_LEVELS), computed per task (the evaluation reports their mean
    over test tasks). classes: classification only, unused."""
    mean, std = outputs
    z = (targets - mean) / std
    log_p = -0.5 * jnp.square(z) - jnp.log(std) - 0.5 * math.log(2 * math.pi)
    n = len(targets)
    log_likelihood = masked_mean(log_p.reshape(n, -1).sum(-1), mask)
    mse = masked_mean(jnp.square(targets - mean).reshape(n, -1).mean(-1), mask)
    metrics = {"loss": -log_likelihood, "log_likelihood": log_likelihood, "mse": mse}
    if norm.is_testing():  # the evaluator's trace: not in every training step
        abs_z = jax.lax.stop_gradient(jnp.abs(z)).reshape(n, -1)
        for level, half_width in COVERAGE_LEVELS.items():
            inside = (abs_z <= half_width).astype(abs_z.dtype).mean(-1)
            metrics[f"coverage_{level}"] = masked_mean(inside, mask)
    return -log_likelihood, metrics


def masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    """The mean over axis 0 of the real examples (all of them when mask is None)."""
    if mask is None:
        return values.mean(0)
    w = mask.astype(values.dtype).reshape((-1,) + (1,) * (values.ndim - 1))
    return jnp.sum(values * w, 0) / jnp.maximum(jnp.sum(mask), 1)


def split_outputs(apply: Callable[[jax.Array], jax.Array], split: Split) -> jax.Array:
    """apply(split.x), its batch norms' statistics over the split's real examples."""
    with norm.examples(split.mask):
        return apply(split.x)


def episode_classes(support: Split, n_out: int) -> jax.Array | None:
    """bool [n_out]: the classes a padded episode's support set has (None: unpadded, all)."""
    if support.mask is None:
        return None
    counts = jnp.sum(jax.nn.one_hot(support.y, n_out) * support.mask[:, None], 0)
    return counts > 0


def split_loss(
    loss_fn: LossFn, apply: Callable[[jax.Array], jax.Array], split: Split, support: Split | None
) -> tuple[jax.Array, Metrics]:
    """loss_fn of apply(split.x) against split.y over the real examples; with the episode's
    support set, among the classes it has (None: a classifier over all its outputs)."""
    outputs = split_outputs(apply, split)
    # classes name a classifier's outputs; a predictive distribution's outputs are a tuple
    classes = (
        None
        if support is None or isinstance(outputs, tuple)
        else episode_classes(support, outputs.shape[-1])
    )
    if split.mask is None and classes is None:  # unpadded: any loss_fn(outputs, targets) serves
        return loss_fn(outputs, split.y)
    return loss_fn(outputs, split.y, split.mask, classes)


def support_loss(loss_fn: LossFn, apply: Callable, support: Split) -> jax.Array:
    """The loss an inner loop descends: the support set's, among its own classes."""
    return split_loss(loss_fn, apply, support, support)[0]


def query_loss(loss_fn: LossFn, apply: Callable, task) -> tuple[jax.Array, Metrics]:
    """A task's query loss and metrics, among the classes of its support set."""
    return split_loss(loss_fn, apply, task.query, task.support)


PREDICTIVES = ("point", "gaussian")


def task_loss_fn(kind: str, predictive: str = "point") -> LossFn:
    """The loss of a data kind for a learner whose predict returns `predictive` (AlgoConfig)."""
    if kind == "classification":
        return classification_loss
    return gaussian_loss if predictive == "gaussian" else regression_loss


def sgd_adapt(
    loss: Callable[[Params, Split], jax.Array],
    params: Params,
    support: Split,
    *,
    lr,
    steps: int,
    first_order=False,
    remat: bool = False,
    trajectory: bool = False,
    indexed: bool = False,
):
    """`steps` gradient steps on the support loss, unrolled with lax.scan.

    lr is a float, a pytree of per-leaf rates (layer-wise rates, 0 for frozen leaves), or a
    function of the step index returning such a pytree (per-step rates).
    Without first_order the result stays differentiable through the inner gradients (MAML);
    with it the inner gradients are constants to the outer derivative. first_order may be a
    traced bool (switched by a schedule during training). remat recomputes the inner steps in
    the backward pass instead of storing their activations (about one more forward pass per
    step): the steps run as ~sqrt(steps) checkpointed segments of ~sqrt(steps) steps, so the
    backward pass keeps ~2 sqrt(steps) copies of the parameters instead of every step's
    activations and parameters. With trajectory the parameters after every step are returned
    too, stacked on a leading axis (which stores every step, so remat then checkpoints single
    steps only). With indexed the loss is called as loss(params, support, i) at step i (traced),
    for a model that changes with the step (MAML++'s per-step batch-norm weights).
    """
    if callable(lr):
        lr_at = lr
    else:
        lrs = lr if isinstance(lr, (dict, list, tuple)) else jax.tree.map(lambda _: lr, params)
        lrs = jax.tree.map(jnp.asarray, lrs)  # a scan carry keeps its type: no Python floats

        def lr_at(i):
            return lrs

    def step(p, i):
        with randomness.step(i):  # each inner step its own dropout masks
            g = jax.grad(loss)(p, support, *((i,) if indexed else ()))
        if isinstance(first_order, bool):
            g = jax.lax.stop_gradient(g) if first_order else g
        else:
            g = jax.tree.map(lambda g: jnp.where(first_order, jax.lax.stop_gradient(g), g), g)
        new = jax.tree.map(lambda p, g, a: p - a * g, p, g, lr_at(i))
        return new, (new if trajectory else None)

    if steps == 0:
        return (params, jax.tree.map(lambda p: p[None], params)) if trajectory else params
    if remat and not trajectory and steps > 3:
        return _segmented_scan(step, params, steps)
    body = jax.checkpoint(step) if remat else step
    adapted, path = jax.lax.scan(body, params, jnp.arange(steps))
    return (adapted, path) if trajectory else adapted


def _segmented_scan(step, params, steps: int):
    """`steps` applications of step(p, i) as checkpointed segments of checkpointed steps.

    A scan saves its carry at every iteration for the backward pass, so checkpointing single
    steps still stores one parameter copy per step; nesting ceil(sqrt(steps)) segments stores
    one per segment, plus one per step of the segment being differentiated. The last segment
    may overrun `steps`; its extra iterations leave the parameters unchanged.
    """
    seg = math.ceil(math.sqrt(steps))

    def one_step(p, i):
        new, _ = step(p, i)
        return jax.tree.map(lambda a, b: jnp.where(i < steps, a, b), new, p), None

    def segment(p, k):
        p, _ = jax.lax.scan(jax.checkpoint(one_step), p, k * seg + jnp.arange(seg))
        return p, None

    adapted, _ = jax.lax.scan(jax.checkpoint(segment), params, jnp.arange(math.ceil(steps / seg)))
    return adapted
