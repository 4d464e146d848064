"""The one jitted training step: sample a meta-batch, take the algorithm's objective gradient
over chunks of tasks (sharded over devices), apply the optimizer; buffers donated."""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from metalearn.config import ConfigError
from metalearn.models import randomness
from metalearn.models.groups import path_name
from metalearn.models.norm import is_state
from metalearn.task_chunks import auto_chunk_for, mean_over_chunks

log = logging.getLogger("metalearn")


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    algo_state: Any = ()  # what an algorithm's objective carries between steps (e.g. DWA)


def _per_task_state_steps(grads, n_tasks: int):
    """A chunk's running-statistics steps are summed over its tasks (norm.track ignores the
    loss's 1/n weighting); divide them so they are the mean over tasks like every gradient."""
    return jax.tree_util.tree_map_with_path(
        lambda path, g: g / n_tasks if is_state(path_name(path)) else g, grads
    )


def task_mesh(meta_batch: int) -> Mesh | None:
    """A 1-D mesh over all devices for the meta-batch's task axis; None on one device.

    Tasks are independent until the mean over the meta-batch, so sharding them needs nothing
    but an all-reduce of the gradients, which XLA inserts. The same code runs on 1 CPU, several
    GPUs or a TPU slice (all processes' devices, after jax.distributed.initialize).
    """
    n = jax.device_count()
    if n == 1:
        return None
    if meta_batch % n:
        log.warning(
            "train.meta_batch=%d does not divide over %d devices; running unsharded.", meta_batch, n
        )
        return None
    return jax.make_mesh((n,), ("tasks",), axis_types=(jax.sharding.AxisType.Auto,))


def make_train_step(
    exp: Any,  # metalearn.experiment.Experiment (which imports this module)
    meta_batch: int,
    mesh: Mesh | None = None,
    task_chunk: int | None = None,
):
    """One jitted (state, split arrays, key) -> (state, metrics); the state's buffers are donated.

    This is the single place where the per-task maths is vmapped over the meta-batch; with a
    mesh, the task axis is sharded over its devices. Each device walks its tasks in chunks of
    `task_chunk` (None: auto_task_chunk), a chunk at a time. Every algorithm takes this one path:
    its objective gets the batch and `task_mean`, the chunked mean gradient of a per-task loss.
    """
    algo = exp.train_algo or exp.algo  # the training episodes' algorithm (experiment.build)
    sample = exp.train_sample or exp.source.sample
    n_devices = 1 if mesh is None else mesh.size
    if task_chunk is not None and (meta_batch // n_devices) % task_chunk:
        raise ConfigError(
            f"train.task_chunk={task_chunk} must divide the tasks each device gets "
            f"(train.meta_batch={meta_batch} over {n_devices} device(s): "
            f"{meta_batch // n_devices})."
        )

    def over_tasks(tree):
        if mesh is None:
            return tree
        return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, P("tasks")))

    def task_mean_gradient(params, tasks, keys):
        """task_mean for the objective: the mean gradient of loss(params, task, key) over the
        batch, walked in chunks of tasks."""
        per_device = meta_batch // n_devices
        one_task = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), tasks)
        chunk = task_chunk or auto_chunk_for(per_device, one_task)

        def task_mean(loss):
            def task_loss(p, task, key):
                with randomness.training(key):  # the task's dropout masks come from its key
                    return loss(p, task, key)

            def chunk_gradient(p, chunk_batch):
                chunk_tasks, chunk_keys = chunk_batch

                def mean_loss(p):
                    losses, metrics = jax.vmap(task_loss, (None, 0, 0))(p, chunk_tasks, chunk_keys)
                    return losses.mean(), metrics

                (_, metrics), grads = jax.value_and_grad(mean_loss, has_aux=True)(p)
                n_tasks = jax.tree.leaves(chunk_tasks)[0].shape[0]
                return _per_task_state_steps(grads, n_tasks), metrics

            return mean_over_chunks(chunk_gradient, params, (tasks, keys), chunk * n_devices)

        return task_mean

    def train_step(state: TrainState, arrays, key, step=0):
        """`step` (the 1-based training step) is for algorithms whose objective has a schedule."""
        k_tasks, k_algo = jax.random.split(key)
        task_keys = over_tasks(jax.random.split(k_tasks, meta_batch))
        tasks = over_tasks(jax.vmap(lambda k: sample(k, arrays, algo.global_labels))(task_keys))
        algo_keys = over_tasks(jax.random.split(k_algo, meta_batch))
        with randomness.training(k_algo):  # for objectives that run the model on the batch
            grads, algo_state, metrics = algo.objective.gradient(
                state.params,
                state.algo_state,
                tasks,
                algo_keys,
                step,
                task_mean_gradient(state.params, tasks, algo_keys),
            )
        updates, opt_state = exp.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state, algo_state), jax.tree.map(jnp.mean, metrics)

    return jax.jit(train_step, donate_argnums=0)
