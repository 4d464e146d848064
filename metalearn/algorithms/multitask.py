"""Multi-task learning: one conditioned model f(y | x, z_i) trained on T tasks at once.

Each step samples a batch of tasks (ids drawn uniformly) and a batch of examples of each, all in
the jitted step; the per-task mean losses are combined by algo.weighting (metalearn.weighting).
With conditioning=separate, algo.soft_sharing adds lambda * sum over task pairs of the squared
distance between their parameters (soft parameter sharing).

Classification tasks may have fewer classes than the shared output layer (alphabets differ in
size); the logits of classes a task does not have are masked out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metalearn.algorithms.base import LossFn
from metalearn.conditioning import make_conditioned_model
from metalearn.config import ConfigError, MultitaskConfig
from metalearn.models import Model
from metalearn.types import Algorithm
from metalearn.weighting import make_weighting, pairwise_distance_penalty

MASKED_LOGIT = -1e9


def make(
    cfg: MultitaskConfig, model: Model, loss_fn: LossFn, n_out: int, *, config, source, **_
) -> Algorithm:
    n_tasks = source.n_tasks
    if n_tasks < 1:
        raise ConfigError(
            f"algo=multitask needs multi-task data (a fixed set of tasks with ids, e.g. "
            f"data=omniglot_alphabets or data=multi_sinusoid); data={config.data.name} is a task "
            "distribution for meta-learning."
        )
    if cfg.soft_sharing and config.conditioning.name != "separate":
        raise ConfigError(
            f"algo.soft_sharing={cfg.soft_sharing} ties per-task networks together, so it needs "
            f"conditioning=separate (got conditioning={config.conditioning.name})."
        )
    cond = make_conditioned_model(
        config.conditioning, config.model, source.input_shape, n_tasks=n_tasks
    )
    # a step holds meta_batch draws, so at most that many distinct tasks
    weighting = make_weighting(cfg, n_tasks, max_present=config.train.meta_batch)
    valid = None
    if source.kind == "classification" and source.classes_per_task:
        valid = jnp.arange(n_out)[None, :] < jnp.asarray(source.classes_per_task)[:, None]

    def outputs(model_params, x, task_id):
        out = cond.apply(model_params, x, task_id)
        return out if valid is None else jnp.where(valid[task_id], out, MASKED_LOGIT)

    def task_loss(model_params, task):
        x = jnp.concatenate([task.support.x, task.query.x])
        y = jnp.concatenate([task.support.y, task.query.y])
        return loss_fn(outputs(model_params, x, task.task_id), y)

    def init(key):
        model_params = cond.init(key, n_out)
        if cfg.init_from:
            model_params = with_pretrained_trunk(model_params, cfg.init_from)
        return {"model": model_params, "weighting": weighting.init_params(n_tasks)}

    def update_scale(updates):
        """Fine-tuning's per-block step sizes: 0 for frozen blocks, decaying with depth."""
        scale = jax.tree.map(lambda _: 1.0, updates)
        blocks = trunk(scale["model"])
        if blocks is None:
            if cfg.freeze or cfg.layer_decay < 1:
                raise ConfigError(
                    f"algo.freeze / algo.layer_decay need one shared trunk; "
                    f"conditioning={config.conditioning.name} has none."
                )
            return scale
        depth = len(blocks)
        for i, block in enumerate(blocks):
            factor = 0.0 if i < cfg.freeze else cfg.layer_decay ** (depth - i)
            blocks[i] = jax.tree.map(lambda _, f=factor: f, block)
        return scale

    def batch_gradient(params, state, tasks, keys, step):
        counts = jax.ops.segment_sum(jnp.ones_like(tasks.task_id), tasks.task_id, n_tasks)
        present = counts > 0

        def task_mean(draw_losses):
            return jax.ops.segment_sum(draw_losses, tasks.task_id, n_tasks) / jnp.maximum(counts, 1)

        def task_losses(model_params):
            losses, metrics = jax.vmap(task_loss, (None, 0))(model_params, tasks)
            return task_mean(losses), metrics

        def draw_gradients(model_params):
            """Per-task mean losses, and each draw's own gradient in one vmapped pass."""
            draw_grad = jax.value_and_grad(task_loss, has_aux=True)
            (losses, metrics), grads = jax.vmap(draw_grad, (None, 0))(model_params, tasks)
            return task_mean(losses), grads, tasks.task_id, metrics

        grads, wgrads, state, wmetrics = weighting.gradient(
            task_losses, params["model"], params["weighting"], state, present, step,
            draw_gradients=draw_gradients if cfg.weighting == "pcgrad" else None,
        )  # fmt: skip
        if cfg.soft_sharing:
            penalty, penalty_grads = jax.value_and_grad(pairwise_distance_penalty)(
                params["model"]["tasks"]
            )
            grads = {
                **grads,
                "tasks": jax.tree.map(
                    lambda g, p: g + cfg.soft_sharing * p, grads["tasks"], penalty_grads
                ),
            }
            wmetrics = {**wmetrics, "soft_sharing_penalty": penalty}
        # Log scalars: the batch's mean metrics, the objective and the worst task's loss.
        metrics = {k: v.mean() for k, v in wmetrics.pop("aux").items()}
        metrics["worst_task_loss"] = jnp.max(jnp.where(present, wmetrics.pop("losses"), -jnp.inf))
        metrics.update({k: v for k, v in wmetrics.items() if jnp.ndim(v) == 0})
        return {"model": grads, "weighting": wgrads}, state, metrics

    def evaluate_task(params, task, key, inner_steps=0):
        return loss_fn(outputs(params["model"], task.query.x, task.task_id), task.query.y)

    def no_adaptation(*_):
        raise NotImplementedError("multi-task models are scored with evaluate_task")

    return Algorithm(
        init=init,
        adapt=no_adaptation,
        predict=no_adaptation,
        batch_gradient=batch_gradient,
        init_state=lambda: weighting.init_state(n_tasks),
        evaluate_task=evaluate_task,
        update_scale=update_scale if (cfg.freeze or cfg.layer_decay < 1) else None,
    )


def trunk(model_params):
    """The shared trunk's block list of a conditioned model's params (None for separate, mmoe)."""
    inner = model_params.get("model")
    return inner.get("blocks") if isinstance(inner, dict) else None


def with_pretrained_trunk(model_params, run_dir: str):
    """model_params with the trunk of the best checkpoint of the multi-task run in run_dir."""
    from metalearn.train import restore  # train imports the algorithms

    _, source_params, _ = restore(run_dir, [], "best")
    source = trunk(source_params.get("model", {})) if isinstance(source_params, dict) else None
    target = trunk(model_params)
    shapes = jax.tree.map(jnp.shape, (source, target))
    if source is None or target is None or shapes[0] != shapes[1]:
        raise ConfigError(
            f"algo.init_from={run_dir} cannot initialise this model: it needs a multi-task run "
            "with one shared trunk (conditioning none, additive, film or multihead) of the "
            "same model and size as this run's (whose conditioning also has one)."
        )
    return {**model_params, "model": {**model_params["model"], "blocks": source}}
