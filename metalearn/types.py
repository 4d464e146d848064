"""The pytrees every layer shares: a split of examples, a task, and an algorithm's functions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

Params = Any  # a pytree of arrays
Metrics = dict[str, jax.Array]


class Split(NamedTuple):
    """Examples of one task: x [n, ...features], y [n] int32 labels or [n, d] regression targets."""

    x: jax.Array
    y: jax.Array


class Task(NamedTuple):
    """One task; a task batch is the same pytree with a leading task axis."""

    support: Split
    query: Split
    task_id: jax.Array  # int32 scalar; used by multi-task conditioning


class Algorithm(NamedTuple):
    """Per-task maths of a learner, as pure functions (no optimizer, loop or I/O).

    init(key) -> meta_params
    adapt(meta_params, support, key, inner_steps) -> task_params   (sees the support set only)
    predict(meta_params, task_params, x) -> predictions
    meta_loss(meta_params, task, key, step) -> (loss, metrics): the training objective for one
        task at training step `step`; None means the episodic loss of predict(adapt(support))
        on the query set.
    meta_gradient(meta_params, task, key) -> (update direction, metrics): for learners such as
        Reptile whose outer update is not the gradient of a loss; None means grad of meta_loss.
    global_labels: train on tasks labelled with split-wide class indices (pre-training).
    Learners whose objective couples the tasks of a batch (multi-task weighting) replace the
    per-task path with:
    batch_gradient(meta_params, algo_state, tasks, keys, step) -> (grads, algo_state, metrics),
        algo_state being what the objective carries between steps (init_state() at step 0);
    evaluate_task(meta_params, task, key, inner_steps) -> (loss, metrics): the task's test
        metrics, for learners that need the task's id rather than adapt/predict.
    update_scale(updates) -> a tree of factors for the optimizer's steps (fine-tuning's frozen
        and layer-wise learning rates).
    """

    init: Callable[[jax.Array], Params]
    adapt: Callable[..., Params]
    predict: Callable[[Params, Params, jax.Array], jax.Array]
    meta_loss: Callable[..., tuple[jax.Array, Metrics]] | None = None
    meta_gradient: Callable[[Params, Task, jax.Array], tuple[Params, Metrics]] | None = None
    global_labels: bool = False
    batch_gradient: Callable[..., tuple[Params, Any, Metrics]] | None = None
    init_state: Callable[[], Any] | None = None
    evaluate_task: Callable[..., tuple[jax.Array, Metrics]] | None = None
    update_scale: Callable[[Params], Params] | None = None
