"""Walk a meta-batch in chunks of tasks, so that on a CPU a chunk's activations stay in cache.

Vmapping the whole meta-batch makes every intermediate meta-batch-sized (481 MB for conv4's
first-layer activations of 32 Omniglot 5-way tasks): each elementwise pass and each matmul then
streams from main memory. A `lax.scan` over chunks of a few tasks, each chunk vmapped, keeps a
chunk's working set in the cache: the Omniglot MAML step is 1.3-1.6x faster on 2 CPU cores
(scripts/BENCHMARKS.md, "Current standing"). The gradient is the same mean over tasks.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from metalearn.types import Task

# On a CPU, the chunk of image tasks holds about this many examples (support + query): fewer
# leaves the cores too little work per operation, more spills the cache. Measured for conv4 on
# Omniglot 5-way 1-shot (80 images per task): 2 tasks per chunk beat 1, 4, 8, 16 and 32.
CPU_EXAMPLES_PER_CHUNK = 160


def auto_task_chunk(n_tasks: int, examples_per_task: int, image_data: bool) -> int:
    """Tasks per chunk when train.task_chunk is unset: every task at once on accelerators and
    for vector data (small activations); on a CPU, the largest divisor of n_tasks that keeps a
    chunk near CPU_EXAMPLES_PER_CHUNK examples."""
    if jax.default_backend() != "cpu" or not image_data:
        return n_tasks
    target = max(1, round(CPU_EXAMPLES_PER_CHUNK / examples_per_task))
    return max(d for d in range(1, min(target, n_tasks) + 1) if n_tasks % d == 0)


def auto_chunk_for(n_tasks: int, task) -> int:
    """auto_task_chunk for tasks shaped like `task`: one task's arrays or shapes, no task axis.
    A task that is no episode of examples (an environment's parameters, metalearn/envs/) is
    small: all at once."""
    if not isinstance(task, Task):
        return n_tasks
    x = task.support.x  # [examples, H, W, C] for images, [examples, features] otherwise
    examples = x.shape[0] + task.query.x.shape[0]
    return auto_task_chunk(n_tasks, examples, image_data=x.ndim >= 4)


def mean_over_chunks(chunk_gradient: Callable, params, batch, chunk: int):
    """chunk_gradient(params, chunk_batch) -> (gradient averaged over the chunk, metrics).

    Returns the gradient averaged over all of `batch` (a pytree with a leading task axis) and
    the metrics stacked [n_chunks, chunk, ...]. Chunk j holds tasks j, j + n_chunks, ..., so a
    task axis sharded over devices in contiguous blocks splits into chunks without moving data.
    """
    n_tasks = jax.tree.leaves(batch)[0].shape[0]
    if chunk >= n_tasks:
        return chunk_gradient(params, batch)
    n_chunks = n_tasks // chunk
    chunks = jax.tree.map(lambda a: a.reshape(chunk, n_chunks, *a.shape[1:]).swapaxes(0, 1), batch)
    first = jax.tree.map(lambda a: a[0], chunks)
    grad_shapes = jax.eval_shape(chunk_gradient, params, first)[0]

    def accumulate(total, chunk_batch):
        grads, metrics = chunk_gradient(params, chunk_batch)
        return jax.tree.map(jnp.add, total, grads), metrics

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), grad_shapes)
    total, metrics = jax.lax.scan(accumulate, zeros, chunks)
    return jax.tree.map(lambda g: g / n_chunks, total), metrics
