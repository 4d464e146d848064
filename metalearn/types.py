"""The pytrees every layer shares: a split of examples, a task, and an algorithm's functions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

Params = Any  # a pytree of arrays
Metrics = dict[str, jax.Array]


class Split(NamedTuple):
    """Examples of one task: x [n, ...features], y [n] int32 labels or [n, d] regression targets.

    mask (bool [n]) marks the real examples of a padded split (variable-way, variable-shot
    episodes such as Meta-Dataset's, padded to one shape so they batch and jit): padded slots
    have mask False and label -1, and every loss, prototype, statistic and metric skips them.
    None (the default) means every example is real; None is no pytree leaf, so fixed-shape
    episodes are the pytrees they always were.
    """

    x: jax.Array
    y: jax.Array
    mask: jax.Array | None = None


class Task(NamedTuple):
    """One task; a task batch is the same pytree with a leading task axis."""

    support: Split
    query: Split
    task_id: jax.Array  # int32 scalar; used by multi-task conditioning


class Objective(NamedTuple):
    """What the train step differentiates for a batch of tasks, and what it carries between steps.

    init_state() -> state (e.g. a multi-task weighting's loss history; () when none)
    gradient(params, state, tasks, keys, step, task_mean) -> (grads, state, metrics)
        tasks and keys carry a leading task axis. task_mean(loss) -> (grads, metrics) is the
        step's own per-task path: the mean gradient over the batch of loss(params, task, key),
        chunked and sharded as the step is; most objectives are just that
        (algorithms/base.py::mean_task_loss), and those that couple tasks use the batch directly.
    """

    init_state: Callable[[], Any]
    gradient: Callable[..., tuple[Params, Any, Metrics]]


class Algorithm(NamedTuple):
    """A learner: per-task maths as pure functions, the objective it is trained by and the
    optimizer that applies its updates (build one with algorithms/base.py::make_algorithm).

    init(key) -> meta_params
    adapt(meta_params, support, key, inner_steps) -> task_params   (sees the support set only)
    predict(meta_params, task_params, x) -> predictions
    meta_loss(meta_params, task, key, step) -> (loss, metrics): the training loss of one task at
        training step `step`, whose gradient is the update direction (a surrogate with that
        gradient for learners such as Reptile, whose direction is not a loss's gradient).
    evaluate(meta_params, task, key, inner_steps) -> (loss, metrics): the task's test metrics.
    objective: how the per-task losses become the batch's gradient (Objective).
    optimizer(train_cfg) -> optax.GradientTransformation for the outer updates.
    global_labels: train on tasks labelled with split-wide class indices (pre-training).
    """

    init: Callable[[jax.Array], Params]
    adapt: Callable[..., Params]
    predict: Callable[[Params, Params, jax.Array], jax.Array]
    meta_loss: Callable[..., tuple[jax.Array, Metrics]]
    evaluate: Callable[..., tuple[jax.Array, Metrics]]
    objective: Objective
    optimizer: Callable[[Any], Any]
    global_labels: bool = False
