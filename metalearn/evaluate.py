"""Meta-test: adapt on each task's support set, score its query set, report mean and 95% CI."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from metalearn.algorithms.base import LossFn
from metalearn.data import TaskSource
from metalearn.types import Algorithm


def episode_metrics(algo: Algorithm, loss_fn: LossFn, params, task, key, inner_steps: int):
    """The query loss and metrics after adapting to the support set: shared by training and test,
    so meta-test adaptation cannot drift from what training optimised."""
    task_params = algo.adapt(params, task.support, key, inner_steps)
    return loss_fn(algo.predict(params, task_params, task.query.x), task.query.y)


def make_evaluator(
    algo: Algorithm, source: TaskSource, loss_fn: LossFn, inner_steps: int, batch: int
) -> Callable:
    """evaluate(params, split, num_tasks, seed) -> {metric: mean, metric_ci95: ..., num_tasks}.

    Task i is always drawn from fold_in(PRNGKey(seed), i), so every evaluation of every run with
    the same seed sees the same tasks, whatever the batch size.
    """

    @jax.jit
    def run_batch(params, arrays, indices, base_key):
        def one(i):
            k_task, k_adapt = jax.random.split(jax.random.fold_in(base_key, i))
            task = source.sample(k_task, arrays, False)
            return episode_metrics(algo, loss_fn, params, task, k_adapt, inner_steps)[1]

        return jax.lax.map(one, indices, batch_size=batch)

    def evaluate(params, split: str, num_tasks: int, seed: int) -> dict:
        base_key = jax.random.PRNGKey(seed)
        per_task = run_batch(params, source.splits[split], jnp.arange(num_tasks), base_key)
        return summarize(jax.device_get(per_task))

    return evaluate


def summarize(per_task: dict) -> dict:
    out = {}
    for name, values in per_task.items():
        values = np.asarray(values, dtype=np.float64)
        out[name] = float(values.mean())
        out[f"{name}_ci95"] = float(1.96 * values.std() / np.sqrt(len(values)))
    out["num_tasks"] = int(len(next(iter(per_task.values()))))
    return out
