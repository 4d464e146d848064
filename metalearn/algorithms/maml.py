"""MAML (Finn et al. 2017) and the variants that change only its inner loop.

The inner loop is jax.grad inside the outer jax.value_and_grad. Options (each a config field):
- first_order: stop the gradient through the inner gradients (FOMAML);
- adapt: which parameter groups the inner loop changes ("all", or e.g. ["head"] for ANIL,
  Raghu et al. 2020; ["blocks"] for BOIL); the others are only meta-learned;
- learn_inner_lr: meta-learn one inner learning rate per adapted parameter (Meta-SGD,
  Li et al. 2017), starting from inner_lr;
- remat: recompute inner steps in the backward pass (memory ~ sqrt(inner_steps) copies of the
  parameters instead of every step's activations);
- MAML++ (Antoniou et al. 2019): per_step_lr (learned rates per inner step and parameter
  array), multi_step_loss (annealed query losses of every inner step) and first_order_until
  (derivative-order annealing). Its per-step batch-norm statistics and cosine outer schedule
  are not implemented.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metalearn.algorithms.base import LossFn, sgd_adapt
from metalearn.config import ConfigError, MAMLConfig
from metalearn.models import Model
from metalearn.types import Algorithm


def adapt_mask(params, groups: list[str]):
    """True for the leaves the inner loop adapts. Groups name top-level keys ("head",
    "blocks") or single blocks ("blocks.3"); "all" adapts everything."""
    if "all" in groups:
        return jax.tree.map(lambda _: True, params)
    known = {"head", "blocks"} | {f"blocks.{i}" for i in range(len(params["blocks"]))}
    unknown = sorted(set(groups) - known)
    if unknown:
        raise ConfigError(
            f"algo.adapt={list(groups)} names {unknown}, which this model does not have; use "
            f"'all' or any of {sorted(known)}."
        )
    return {
        "head": jax.tree.map(lambda _: "head" in groups, params["head"]),
        "blocks": [
            jax.tree.map(lambda _, i=i: "blocks" in groups or f"blocks.{i}" in groups, block)
            for i, block in enumerate(params["blocks"])
        ],
    }


def partition(params, mask):
    """(adapted, frozen): the same tree twice, with None where a leaf belongs to the other."""
    adapted = jax.tree.map(lambda p, m: p if m else None, params, mask)
    frozen = jax.tree.map(lambda p, m: None if m else p, params, mask)
    return adapted, frozen


def combine(adapted, frozen):
    return jax.tree.map(
        lambda a, f: f if a is None else a, adapted, frozen, is_leaf=lambda x: x is None
    )


def make(cfg: MAMLConfig, model: Model, loss_fn: LossFn, n_out: int, **_) -> Algorithm:
    def model_params(meta_params):
        return meta_params["init"] if cfg.learn_inner_lr else meta_params

    def init(key):
        params = model.init(key, n_out)
        mask = adapt_mask(params, cfg.adapt)  # rejects unknown groups before training starts
        if not cfg.learn_inner_lr:
            return params
        adapted, _ = partition(params, mask)
        if cfg.per_step_lr:  # MAML++: one rate per parameter array and inner step
            lrs = jax.tree.map(lambda p: jnp.full((cfg.inner_steps,), cfg.inner_lr), adapted)
        else:  # Meta-SGD: one rate per parameter entry
            lrs = jax.tree.map(lambda p: jnp.full_like(p, cfg.inner_lr), adapted)
        return {"init": params, "inner_lr": lrs}

    def inner_rates(meta_params):
        if not cfg.learn_inner_lr:
            return cfg.inner_lr
        lrs = meta_params["inner_lr"]
        if not cfg.per_step_lr:
            return lrs
        # Steps beyond the trained ones (eval.inner_steps > inner_steps) reuse the last rates.
        return lambda i: jax.tree.map(lambda r: r[jnp.minimum(i, r.shape[0] - 1)], lrs)

    def inner_loop(meta_params, support, inner_steps, first_order, trajectory=False):
        params = model_params(meta_params)
        adapted, frozen = partition(params, adapt_mask(params, cfg.adapt))

        def support_loss(adapted, split):
            return loss_fn(model.apply(combine(adapted, frozen), split.x), split.y)[0]

        out = sgd_adapt(
            support_loss,
            adapted,
            support,
            lr=inner_rates(meta_params),
            steps=inner_steps,
            first_order=first_order,
            remat=cfg.remat,
            trajectory=trajectory,
        )
        return out, frozen

    def adapt(meta_params, support, key, inner_steps=cfg.inner_steps):
        adapted, frozen = inner_loop(meta_params, support, inner_steps, cfg.first_order)
        return combine(adapted, frozen)

    def predict(meta_params, task_params, x):
        return model.apply(task_params, x)

    def scheduled_meta_loss(meta_params, task, key, step):
        """MAML++: first order early in training; the query loss after every inner step, its
        weights moving linearly from uniform to the last step over multi_step_loss steps."""
        first_order = cfg.first_order
        if cfg.first_order_until:
            first_order = jnp.logical_or(cfg.first_order, step <= cfg.first_order_until)
        (final, path), frozen = inner_loop(
            meta_params, task.support, cfg.inner_steps, first_order, trajectory=True
        )
        final_loss, metrics = loss_fn(
            predict(meta_params, combine(final, frozen), task.query.x), task.query.y
        )
        if not cfg.multi_step_loss:
            return final_loss, metrics
        losses = jax.vmap(
            lambda p: loss_fn(model.apply(combine(p, frozen), task.query.x), task.query.y)[0]
        )(path)
        weights = multi_step_weights(cfg.inner_steps, step, cfg.multi_step_loss)
        return jnp.sum(weights * losses), metrics

    scheduled = cfg.multi_step_loss or cfg.first_order_until
    return Algorithm(
        init=init,
        adapt=adapt,
        predict=predict,
        meta_loss=scheduled_meta_loss if scheduled else None,
    )


def multi_step_weights(inner_steps: int, step, anneal_steps: int) -> jax.Array:
    """Uniform over the inner steps at training step 0, all on the last step from anneal_steps."""
    a = jnp.clip(step / anneal_steps, 0.0, 1.0)
    last = jax.nn.one_hot(inner_steps - 1, inner_steps)
    return (1 - a) * jnp.full((inner_steps,), 1 / inner_steps) + a * last
