"""MAML (Finn et al. 2017) and the variants that change only its inner loop.

The inner loop is jax.grad inside the outer jax.value_and_grad. Options (each a config field):
- first_order: stop the gradient through the inner gradients (FOMAML);
- adapt: which parameter groups the inner loop changes ("all", or e.g. ["head"] for ANIL,
  Raghu et al. 2020; ["blocks"] for BOIL); the others are only meta-learned;
- learn_inner_lr: meta-learn one inner learning rate per adapted parameter (Meta-SGD,
  Li et al. 2017), starting from inner_lr;
- remat: recompute inner steps in the backward pass (memory independent of inner_steps).
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
        adapt_mask(params, cfg.adapt)  # reject unknown groups before training starts
        if not cfg.learn_inner_lr:
            return params
        adapted, _ = partition(params, adapt_mask(params, cfg.adapt))
        lrs = jax.tree.map(lambda p: jnp.full_like(p, cfg.inner_lr), adapted)
        return {"init": params, "inner_lr": lrs}

    def adapt(meta_params, support, key, inner_steps=cfg.inner_steps):
        params = model_params(meta_params)
        adapted, frozen = partition(params, adapt_mask(params, cfg.adapt))

        def support_loss(adapted, split):
            return loss_fn(model.apply(combine(adapted, frozen), split.x), split.y)[0]

        adapted = sgd_adapt(
            support_loss,
            adapted,
            support,
            lr=meta_params["inner_lr"] if cfg.learn_inner_lr else cfg.inner_lr,
            steps=inner_steps,
            first_order=cfg.first_order,
            remat=cfg.remat,
        )
        return combine(adapted, frozen)

    return Algorithm(
        init=init,
        adapt=adapt,
        predict=lambda meta_params, task_params, x: model.apply(task_params, x),
    )
