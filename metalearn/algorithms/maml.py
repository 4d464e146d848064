"""MAML (Finn et al. 2017) and the variants that change only its inner loop.

The inner loop is jax.grad inside the outer jax.value_and_grad. Options (each a config field):
- first_order: stop the gradient through the inner gradients (FOMAML);
- adapt: which parameter groups the inner loop changes ("all", or e.g. ["head"] for ANIL,
  Raghu et al. 2020; ["blocks"] for BOIL; groups are the model's labels,
  metalearn/models/groups.py); the others are only meta-learned;
- learn_inner_lr: meta-learn one inner learning rate per adapted parameter (Meta-SGD,
  Li et al. 2017), starting from inner_lr;
- remat: recompute inner steps in the backward pass (memory ~ sqrt(inner_steps) copies of the
  parameters instead of every step's activations);
- MAML++ (Antoniou et al. 2019): per_step_lr (learned rates per inner step and parameter
  array), multi_step_loss (annealed query losses of every inner step) and first_order_until
  (derivative-order annealing), per_step_norm (per-step batch-norm weights and biases: the
  normalisation layers' scale and offset, one set per inner step, meta-learned and not
  adapted; the statistics are per step too, as each step normalises its own batch), and
  outer_lr_schedule=cosine (the outer rate annealed from
  train.outer_lr to min_outer_lr over train.steps).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import jax
import jax.numpy as jnp

from metalearn import registry
from metalearn.algorithms.base import (
    OUTER_SCHEDULES,
    AlgoConfig,
    LossFn,
    make_algorithm,
    query_loss,
    scheduled_adam,
    sgd_adapt,
    support_loss,
)
from metalearn.checks import check_inner_steps, choice, positive, require
from metalearn.models import Model, norm
from metalearn.models.groups import combine, names, partition, select
from metalearn.types import Algorithm


@dataclass
class MAMLConfig(AlgoConfig):
    norms: ClassVar[tuple[str, ...]] = ("transductive", "inductive")
    reads_padded: ClassVar[bool] = True
    # what only the meta-gradient or the outer update reads: adapted parameters are the same
    # values without them, so `metalearn eval` refuses them (metalearn/eval_overrides.py)
    training_only: ClassVar[tuple[str, ...]] = (
        "first_order", "first_order_until", "multi_step_loss", "remat", "outer_lr_schedule",
        "min_outer_lr",
    )  # fmt: skip
    name: str = "maml"
    inner_lr: float = 0.4
    inner_steps: int = 1
    first_order: bool = False
    adapt: list[str] = field(
        default_factory=lambda: ["all"]
    )  # parameter groups the inner loop adapts
    learn_inner_lr: bool = False  # Meta-SGD: a meta-learned inner rate per adapted parameter
    remat: bool = False  # recompute inner steps in the backward pass (long inner loops)
    per_step_lr: bool = False  # MAML++: with learn_inner_lr, one learned rate set per inner step
    multi_step_loss: int = (
        0  # MAML++: query loss after every inner step, annealed to the last over N steps
    )
    first_order_until: int = 0  # MAML++: first-order meta-gradients for the first N training steps
    per_step_norm: bool = False  # MAML++: batch-norm weights and biases of their own per step
    outer_lr_schedule: str = "constant"  # or cosine: to min_outer_lr at train.steps (MAML++)
    min_outer_lr: float = 1e-5

    def __post_init__(self) -> None:
        positive("algo.inner_lr", self.inner_lr)
        check_inner_steps(self.inner_steps)
        choice("algo.outer_lr_schedule", self.outer_lr_schedule, OUTER_SCHEDULES)
        positive("algo.min_outer_lr", self.min_outer_lr)
        require(
            not self.per_step_lr or self.learn_inner_lr,
            "algo.per_step_lr=true needs algo.learn_inner_lr=true (the rates it learns per step).",
        )
        require(
            self.multi_step_loss >= 0, f"algo.multi_step_loss={self.multi_step_loss} must be >= 0."
        )
        require(
            self.first_order_until >= 0,
            f"algo.first_order_until={self.first_order_until} must be >= 0.",
        )

    def check_with(self, config) -> None:
        norm_mode = getattr(config.model, "norm", "transductive")
        require(
            not self.per_step_norm or norm_mode == "transductive",
            f"algo.per_step_norm=true is not allowed with model.norm={norm_mode}: per-step "
            "batch-norm weights are learned with each inner step's own batch statistics "
            "(model.norm=transductive, as MAML++ evaluates); running statistics per inner step "
            "are not kept.",
        )


@dataclass
class ANILConfig(MAMLConfig):
    name: str = "anil"
    adapt: list[str] = field(default_factory=lambda: ["head"])


@dataclass
class MetaSGDConfig(MAMLConfig):
    name: str = "metasgd"
    learn_inner_lr: bool = True


@dataclass
class MAMLPPConfig(MAMLConfig):
    name: str = "mamlpp"
    inner_steps: int = 5
    learn_inner_lr: bool = True
    per_step_lr: bool = True
    multi_step_loss: int = 10000
    first_order_until: int = 5000
    per_step_norm: bool = True
    outer_lr_schedule: str = "cosine"


def adapt_mask(model: Model, params, groups: list[str]):
    """True for the leaves the inner loop adapts: those whose group label algo.adapt selects."""
    return select(model.groups(params), groups, "algo.adapt")


def make(cfg: MAMLConfig, model: Model, loss_fn: LossFn, n_out: int, **_) -> Algorithm:
    wrapped = cfg.learn_inner_lr or cfg.per_step_norm  # meta-parameters beside the model's

    def model_params(meta_params):
        return meta_params["init"] if wrapped else meta_params

    def norm_mask(params):
        return jax.tree.map(norm.is_affine, names(params))

    def inner_mask(params):  # per-step normalisation weights are meta-learned, not adapted
        mask = adapt_mask(model, params, cfg.adapt)
        if cfg.per_step_norm:
            mask = jax.tree.map(lambda m, n: m and not n, mask, norm_mask(params))
        return mask

    def init(key):
        params = model.init(key, n_out)
        mask = inner_mask(params)  # rejects unknown groups before training starts
        if not wrapped:
            return params
        meta_params = {"init": params}
        if cfg.learn_inner_lr:
            adapted, _ = partition(params, mask)
            if cfg.per_step_lr:  # MAML++: one rate per parameter array and inner step
                lrs = jax.tree.map(lambda p: jnp.full((cfg.inner_steps,), cfg.inner_lr), adapted)
            else:  # Meta-SGD: one rate per parameter entry
                lrs = jax.tree.map(lambda p: jnp.full_like(p, cfg.inner_lr), adapted)
            meta_params["inner_lr"] = lrs
        if cfg.per_step_norm:  # the initial weights serve step 0; these steps 1..inner_steps
            norms, _ = partition(params, norm_mask(params))
            meta_params["step_norms"] = jax.tree.map(
                lambda p: jnp.stack([p] * cfg.inner_steps), norms
            )
        return meta_params

    def inner_rates(meta_params):
        if not cfg.learn_inner_lr:
            return cfg.inner_lr
        lrs = meta_params["inner_lr"]
        if not cfg.per_step_lr:
            return lrs
        # Steps beyond the trained ones (eval.inner_steps > inner_steps) reuse the last rates.
        return lambda i: jax.tree.map(lambda r: r[jnp.minimum(i, r.shape[0] - 1)], lrs)

    def at_step(meta_params, params, i):
        """params with the normalisation weights of inner step i (traced; 0: the initial
        weights; steps beyond the trained ones reuse the last)."""
        if not cfg.per_step_norm:
            return params
        mask = norm_mask(params)
        initial, _ = partition(model_params(meta_params), mask)
        step_weights = jax.tree.map(
            lambda w, later: jnp.concatenate([w[None], later])[jnp.minimum(i, len(later))],
            initial,
            meta_params["step_norms"],
        )
        return combine(step_weights, partition(params, mask)[1])

    def inner_loop(meta_params, support, inner_steps, first_order, trajectory=False):
        params = model_params(meta_params)
        adapted, frozen = partition(params, inner_mask(params))

        def inner_loss(adapted, split, i):
            step_params = at_step(meta_params, combine(adapted, frozen), i)
            return support_loss(loss_fn, lambda x: model.apply(step_params, x), split)

        out = sgd_adapt(
            inner_loss,
            adapted,
            support,
            lr=inner_rates(meta_params),
            steps=inner_steps,
            first_order=first_order,
            remat=cfg.remat,
            trajectory=trajectory,
            indexed=True,
        )
        return out, frozen

    def adapt(meta_params, support, key, inner_steps=cfg.inner_steps):
        adapted, frozen = inner_loop(meta_params, support, inner_steps, cfg.first_order)
        return at_step(meta_params, combine(adapted, frozen), inner_steps)

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
        final_params = at_step(meta_params, combine(final, frozen), cfg.inner_steps)
        final_loss, metrics = query_loss(
            loss_fn, lambda x: predict(meta_params, final_params, x), task
        )
        if not cfg.multi_step_loss:
            return final_loss, metrics

        def loss_after(p, steps):  # the query loss after `steps` inner steps
            step_params = at_step(meta_params, combine(p, frozen), steps)
            return query_loss(loss_fn, lambda x: model.apply(step_params, x), task)[0]

        losses = jax.vmap(loss_after)(path, jnp.arange(1, cfg.inner_steps + 1))
        weights = multi_step_weights(cfg.inner_steps, step, cfg.multi_step_loss)
        return jnp.sum(weights * losses), metrics

    scheduled = cfg.multi_step_loss or cfg.first_order_until
    return make_algorithm(
        init,
        adapt,
        predict,
        loss_fn,
        meta_loss=scheduled_meta_loss if scheduled else None,
        optimizer=scheduled_adam(cfg.outer_lr_schedule, cfg.min_outer_lr),
    )


def multi_step_weights(inner_steps: int, step, anneal_steps: int) -> jax.Array:
    """Uniform over the inner steps at training step 0, all on the last step from anneal_steps."""
    a = jnp.clip(step / anneal_steps, 0.0, 1.0)
    last = jax.nn.one_hot(inner_steps - 1, inner_steps)
    return (1 - a) * jnp.full((inner_steps,), 1 / inner_steps) + a * last


registry.register("algo", "maml", MAMLConfig, make)
registry.register("algo", "anil", ANILConfig, make)
registry.register("algo", "metasgd", MetaSGDConfig, make)
registry.register("algo", "mamlpp", MAMLPPConfig, make)
