"""Multi-task learning: one conditioned model f(y | x, z_i) trained on T tasks at once.

Each step samples a batch of tasks (ids drawn uniformly) and a batch of examples of each, all in
the jitted step; the per-task mean losses are combined by algo.weighting (metalearn.weighting).
With conditioning=separate, algo.soft_sharing adds lambda * sum over task pairs of the squared
distance between their parameters (soft parameter sharing).

Classification tasks may have fewer classes than the shared output layer (alphabets differ in
size); the logits of classes a task does not have are masked out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import jax
import jax.numpy as jnp
import optax

from metalearn import registry
from metalearn.algorithms.base import AlgoConfig, LossFn, make_algorithm
from metalearn.checks import ConfigError, choice, positive, require
from metalearn.conditioning import make_conditioned_model
from metalearn.models import Model
from metalearn.models.groups import block_index, depth
from metalearn.types import Algorithm, Objective
from metalearn.weighting import WEIGHTINGS, make_weighting, pairwise_distance_penalty

MASKED_LOGIT = -1e9


@dataclass
class MultitaskConfig(AlgoConfig):
    """Multi-task learning: one conditioned model trained on T tasks at once (CS330 lecture 2)."""

    multitask_data: ClassVar[bool] = True
    conditioned: ClassVar[bool] = True

    name: str = "multitask"
    weighting: str = "uniform"  # how per-task losses combine: see WEIGHTINGS
    task_weights: list[float] = field(default_factory=list)  # weighting=static: one w_i per task
    dwa_temperature: float = 2.0  # weighting=dwa: softmax temperature over loss ratios
    minmax_temperature: float = 0.0  # weighting=minmax: 0 is the hard max, > 0 a log-sum-exp
    soft_sharing: float = 0.0  # lambda of the pairwise parameter distance (conditioning=separate)
    # Transfer: start the trunk from another run's best checkpoint (algo.init_from, a run
    # directory), then fine-tune with the first `freeze` blocks fixed and block i's steps scaled
    # by layer_decay**(depth - i); the heads and conditioning start fresh.
    freeze: int = 0
    layer_decay: float = 1.0

    def __post_init__(self) -> None:
        choice("algo.weighting", self.weighting, WEIGHTINGS)
        positive("algo.dwa_temperature", self.dwa_temperature)
        require(
            self.minmax_temperature >= 0 and math.isfinite(self.minmax_temperature),
            f"algo.minmax_temperature={self.minmax_temperature} must be a finite number >= 0.",
        )
        require(
            self.soft_sharing >= 0 and math.isfinite(self.soft_sharing),
            f"algo.soft_sharing={self.soft_sharing} must be a finite number >= 0.",
        )
        require(self.freeze >= 0, f"algo.freeze={self.freeze} must be >= 0.")
        require(
            0 < self.layer_decay <= 1, f"algo.layer_decay={self.layer_decay} must be in (0, 1]."
        )
        require(
            self.weighting == "static" or not self.task_weights,
            "algo.task_weights is only used with algo.weighting=static.",
        )
        require(
            all(w >= 0 and math.isfinite(w) for w in self.task_weights),
            f"algo.task_weights={list(self.task_weights)} is not allowed: weights must be >= 0.",
        )


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

    def labels(params):
        return {"model": cond.groups(params["model"]), "weighting": jax.tree.map(
            lambda _: "other", params["weighting"])}  # fmt: skip

    def init(key):
        model_params = cond.init(key, n_out)
        if (cfg.freeze or cfg.layer_decay < 1) and not depth(cond.groups(model_params)):
            raise ConfigError(
                f"algo.freeze / algo.layer_decay need one shared trunk; "
                f"conditioning={config.conditioning.name} has none."
            )
        return {"model": model_params, "weighting": weighting.init_params(n_tasks)}

    def step_factors(params):
        """Fine-tuning's per-block step sizes: 0 for frozen blocks, decaying with depth."""
        groups = labels(params)
        n = depth(groups)

        def factor(label):
            i = block_index(label)
            if i is None:
                return 1.0
            return 0.0 if i < cfg.freeze else cfg.layer_decay ** (n - i)

        return jax.tree.map(factor, groups)

    def optimizer(train_cfg):
        adam = optax.adam(train_cfg.outer_lr)
        if not (cfg.freeze or cfg.layer_decay < 1):
            return adam
        return optax.chain(adam, scale_by_tree(step_factors))

    def gradient(params, state, tasks, keys, step, task_mean):
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

    def evaluate(params, task, key, inner_steps=0):
        return loss_fn(outputs(params["model"], task.query.x, task.task_id), task.query.y)

    def no_adaptation(*_):
        raise NotImplementedError("multi-task models are scored by evaluate (with the task id)")

    return make_algorithm(
        init,
        no_adaptation,
        no_adaptation,
        loss_fn,
        meta_loss=no_adaptation,
        evaluate=evaluate,
        objective=Objective(init_state=lambda: weighting.init_state(n_tasks), gradient=gradient),
        optimizer=optimizer,
    )


def scale_by_tree(factors_of) -> optax.GradientTransformation:
    """Multiply each step by a per-leaf factor (after Adam, whose steps ignore gradient scale)."""

    def update(updates, state, params=None):
        return jax.tree.map(lambda u, f: u * f, updates, factors_of(updates)), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


registry.register("algo", "multitask", MultitaskConfig, make)
