"""Meta-test: adapt on each task's support set, score its query set, report mean and 95% CI."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from metalearn.algorithms.base import LossFn
from metalearn.data import TaskSource
from metalearn.models import norm
from metalearn.task_chunks import auto_chunk_for
from metalearn.types import Algorithm

log = logging.getLogger("metalearn")

# eval.batch=null: at most this many tasks at once (the fixed default before it was automatic);
# evaluation draws hundreds of tasks, far more than a training meta-batch.
MAX_AUTO_EVAL_BATCH = 50


def make_evaluator(
    algo: Algorithm, source: TaskSource, loss_fn: LossFn, inner_steps: int, batch: int | None
) -> Callable:
    """evaluate(params, split, num_tasks, seed, tasks=None) -> {metric: mean, metric_ci95: ...,
    num_tasks}; a dict given as `tasks` receives every task's metrics ({metric: [values]}, task i
    at position i), which pair up task by task between runs on the same tasks (compare).

    Task i is always drawn from fold_in(PRNGKey(seed), i), so every evaluation of every run with
    the same seed sees the same tasks, whatever the batch size. A multi-task source's draw i is
    a batch of task i mod T, and the result also holds each task's metrics, their mean and the
    worst task (summarize_tasks).
    """
    n_tasks = source.n_tasks

    def draw(key, arrays, i):
        if n_tasks:
            return source.sample_task(key, arrays, i % n_tasks)
        return source.sample(key, arrays, False)

    @jax.jit
    def run_batch(params, arrays, indices, base_key):
        def one(i):
            k_task, k_adapt = jax.random.split(jax.random.fold_in(base_key, i))
            task = draw(k_task, arrays, i)
            with norm.testing():  # inductive batch norm: the running statistics
                return algo.evaluate(params, task, k_adapt, inner_steps)[1]

        return jax.lax.map(one, indices, batch_size=batch_size(arrays, len(indices)))

    def batch_size(arrays, n: int) -> int:
        if batch is not None:
            return batch
        # as a training step's chunk (metalearn/task_chunks.py), capped
        task = jax.eval_shape(draw, jax.random.PRNGKey(0), arrays, 0)
        return min(auto_chunk_for(n, task), MAX_AUTO_EVAL_BATCH)

    def draws(num_tasks: int) -> int:
        if n_tasks:
            return n_tasks * max(1, round(num_tasks / n_tasks))  # every task equally often
        return num_tasks

    def lower(params, split: str, num_tasks: int):
        """The evaluation of `num_tasks` tasks of `split`, lowered: compiled, it gives XLA's
        memory analysis, and jit keeps the compiled program for the evaluation that follows."""
        indices = jnp.arange(draws(num_tasks))
        return run_batch.lower(params, source.splits[split], indices, jax.random.PRNGKey(0))

    def evaluate(params, split: str, num_tasks: int, seed: int, tasks: dict | None = None) -> dict:
        base_key = jax.random.PRNGKey(seed)
        num_tasks = draws(num_tasks)
        per_task = run_batch(params, source.splits[split], jnp.arange(num_tasks), base_key)
        per_task = jax.device_get(per_task)
        if tasks is not None:
            tasks.update({k: np.asarray(v, np.float64).tolist() for k, v in per_task.items()})
        if n_tasks:
            return summarize_tasks(per_task, source.task_names)
        return summarize(per_task)

    # for experiment.prepare, which checks an evaluation's memory before a run starts
    evaluate.lower = lower
    evaluate.batch_size = lambda split, num_tasks: min(
        batch_size(source.splits[split], draws(num_tasks)), draws(num_tasks)
    )
    return evaluate


def summarize(per_task: dict) -> dict:
    out = {}
    for name, values in per_task.items():
        values = np.asarray(values, dtype=np.float64)
        out[name] = float(values.mean())
        out[f"{name}_ci95"] = float(1.96 * values.std() / np.sqrt(len(values)))
    out["num_tasks"] = int(len(next(iter(per_task.values()))))
    return out


def summarize_tasks(per_draw: dict, task_names: tuple[str, ...]) -> dict:
    """Multi-task results: each task's mean metrics (draw i belongs to task i mod T), the mean
    over tasks with a 95% CI across tasks (across batches for a single task), and the worst
    task (lowest accuracy, else highest loss)."""
    n_tasks = len(task_names)
    per_task = {
        name: {k: float(np.mean(np.asarray(v)[t::n_tasks])) for k, v in per_draw.items()}
        for t, name in enumerate(task_names)
    }
    # With one task, the CI is over its evaluation batches instead of across tasks.
    out = summarize(
        {k: [per_task[name][k] for name in task_names] for k in per_draw}
        if n_tasks > 1
        else per_draw
    )
    out["num_tasks"] = n_tasks
    out["num_batches"] = int(len(next(iter(per_draw.values()))))
    out["per_task"] = per_task
    metric = "accuracy" if "accuracy" in per_draw else "loss"
    pick = min if metric == "accuracy" else max
    worst = pick(task_names, key=lambda name: per_task[name][metric])
    out["worst"] = {"task": worst, metric: per_task[worst][metric]}
    return out


def non_finite(metrics: dict, prefix: str = "") -> list[str]:
    """`name=value` of each NaN or infinite number in metrics (nested per-task ones as
    per_task.TASK.name)."""
    bad = []
    for key, value in metrics.items():
        if isinstance(value, dict):
            bad += non_finite(value, f"{prefix}{key}.")
        elif not isinstance(value, str) and not math.isfinite(value):
            bad.append(f"{prefix}{key}={value}")
    return bad


def finite_params(params) -> bool:
    return all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(params))


def warn_if_not_finite(metrics: dict, checkpoint, params, inner_steps: int) -> bool:
    """Warn once, naming the checkpoint file and the metrics, when an evaluation of it is NaN
    or infinite (numbers that are no result); True if it warned."""
    bad = non_finite(metrics)
    if not bad:
        return False
    why = (
        "its parameters hold NaN or infinite values"
        if not finite_params(params)
        else f"its parameters are finite, so the adaptation diverges (eval.inner_steps="
        f"{inner_steps}): try fewer eval.inner_steps or a lower algo.inner_lr"
    )
    log.warning(
        "The checkpoint %s evaluates to non-finite metrics (%s): %s.", checkpoint,
        ", ".join(bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6 else ""), why,
    )  # fmt: skip
    return True
