"""algo=learned_optimizer: meta-train an update rule (algo.optimizer) on a batch of vmapped inner
problems by truncated backpropagation through their training runs (Andrychowicz et al. 2016).

Each inner run lasts algo.unroll = T steps, cut into segments of algo.truncation = K steps. A
training step advances every problem of the meta-batch by one segment, from the state the last
step left (carried under stop_gradient, as learned_optimization's truncated_unroll does), and
the outer optimizer (Adam, train.outer_lr) takes the gradient of the segment's mean inner loss;
after T / K steps the problems are replaced by the step's freshly drawn tasks. With K = T this
is full backpropagation through the whole run. Evaluation runs the rule for eval.inner_steps
(default T) steps on held-out problems from the data's test split, beside hand-designed optax
baselines (algo.baselines, at fixed rates) on the very same problems and starting points.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metalearn import registry
from metalearn.algorithms.base import AlgoConfig, make_algorithm
from metalearn.checks import MAX_DEPTH, MAX_INNER_STEPS, ConfigError, at_most, positive, require
from metalearn.checks import width as check_width
from metalearn.learned_optimizers import from_optax, optimizers
from metalearn.learned_optimizers.hyper import MAX_MOMENTUM
from metalearn.learned_optimizers.unroll import segment_loss, unroll
from metalearn.types import Algorithm, Objective, Params, Task

# The hand-designed rules evaluated beside the learned one, by name: make(lr)
BASELINES = {
    "adam": optax.adam,
    "sgd": optax.sgd,
    "rmsprop": optax.rmsprop,
    "nesterov": lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True),
}

BASELINE_LRS = {"adam": 0.3, "sgd": 0.01, "rmsprop": 0.1, "nesterov": 0.01}


@dataclass
class LearnedOptimizerConfig(AlgoConfig):
    # trains on the inner problems a data option provides (data/problems.py), and only on those
    needs_inner_problems: ClassVar[bool] = True

    name: str = "learned_optimizer"
    optimizer: str = "lstm"  # the update rule: lstm | mlp | hyper
    unroll: int = 100  # T: steps of one inner training run
    truncation: int = 20  # K: steps per backpropagation segment (one outer update); divides T
    second_order: bool = False  # differentiate through the inner gradients (exact hypergradients)
    remat: bool = False  # recompute the inner steps in the backward pass (long segments)
    hidden: int = 20  # lstm, mlp: hidden units per layer
    layers: int = 2  # lstm, mlp: layers
    preprocess: float = 10.0  # lstm, mlp: p of the log-gradient preprocessing
    output_scale: float = 0.1  # lstm, mlp: the network's output times this is the update
    decays: list[float] = field(default_factory=lambda: [0.5, 0.9, 0.99])  # mlp: momenta
    lr: float = 0.01  # hyper: the starting learning rate (learned as its log, per leaf)
    momentum: float = 0.9  # hyper: the starting momentum (learned, per leaf)
    # baseline -> its fixed learning rate, evaluated beside the learned rule (BASELINES)
    baselines: dict[str, float] = field(default_factory=lambda: dict(BASELINE_LRS))

    @property
    def inner_steps(self) -> int:
        """The evaluation's default horizon (eval.inner_steps=null): the training unroll."""
        return self.unroll

    def __post_init__(self) -> None:
        names = sorted(optimizers())
        require(
            self.optimizer in names,
            f"algo.optimizer={self.optimizer!r} is not allowed; choose one of {names}.",
        )
        require(self.unroll >= 1, f"algo.unroll={self.unroll} must be >= 1.")
        at_most("algo.unroll", self.unroll, MAX_INNER_STEPS)
        require(
            1 <= self.truncation <= self.unroll and self.unroll % self.truncation == 0,
            f"algo.truncation={self.truncation} is not allowed: it must divide "
            f"algo.unroll={self.unroll} (the segments of one inner run are equal).",
        )
        check_width("algo.hidden", self.hidden)
        require(
            1 <= self.layers <= MAX_DEPTH, f"algo.layers={self.layers} must be 1 to {MAX_DEPTH}."
        )
        for key in ("preprocess", "output_scale", "lr"):
            positive(f"algo.{key}", getattr(self, key))
        require(
            0 <= self.momentum <= MAX_MOMENTUM,
            f"algo.momentum={self.momentum} is not allowed: it must be in [0, {MAX_MOMENTUM}].",
        )
        require(
            len(self.decays) >= 1 and all(0 <= d < 1 for d in self.decays),
            f"algo.decays={list(self.decays)} is not allowed: give one or more momentum decays "
            "in [0, 1).",
        )
        for name, lr in self.baselines.items():
            require(
                name in BASELINES,
                f"algo.baselines.{name} is not allowed: the baselines are {sorted(BASELINES)}.",
            )
            positive(f"algo.baselines.{name}", lr)

    def check_with(self, config: Any) -> None:
        data = config.data
        if not getattr(type(data), "inner_problems", False):
            families = sorted(
                name
                for name, option in registry.options("data").items()
                if getattr(option.schema, "inner_problems", False)
            )
            raise ConfigError(
                f"algo={self.name} cannot train on data={data.name}: a learned optimizer is "
                "meta-trained on inner optimisation problems (a loss over parameters that it "
                f"minimises), and data={data.name} provides none. Use data in {families}."
            )
        require(
            self.init_from is None,
            f"algo.init_from={self.init_from} is not allowed with algo={self.name}: it starts "
            "a model's parameter groups, and a learned optimizer trains no model.",
        )


class UnrollState(NamedTuple):
    """The meta-batch's inner runs between training steps (a leading problem axis [B])."""

    params: Params  # [B, ...] the inner problems' parameters
    opt_state: Any  # [B, ...] the rule's state for them
    tasks: Task  # [B, ...] the problems being trained
    t: jax.Array  # int32 []: steps of the current runs taken; 0 starts new problems


def make(
    cfg: LearnedOptimizerConfig, model, loss_fn, n_out: int, config=None, source=None, **_
) -> Algorithm:
    data = getattr(config, "data", None)
    if not getattr(type(data), "inner_problems", False):
        raise ConfigError(
            f"algo={cfg.name} needs a data option that provides inner problems "
            f"(metalearn/data/problems.py); data={getattr(data, 'name', data)} provides none."
        )
    problem = data.problem()
    rule = optimizers()[cfg.optimizer](cfg)
    template = jax.eval_shape(problem.init, jax.random.PRNGKey(0))
    meta_batch = config.train.meta_batch
    baselines = {name: from_optax(BASELINES[name](lr)) for name, lr in cfg.baselines.items()}

    def init(key):
        return rule.init(key, template)

    def start(theta, keys):
        """Fresh inner runs: each problem's starting parameters and the rule's state for them."""
        params = jax.vmap(problem.init)(keys)
        return params, jax.vmap(rule.init_state, (None, 0))(theta, params)

    def run(theta, params, state, split, steps, differentiated=True):
        return unroll(
            rule, problem, theta, params, state, split, steps,
            second_order=cfg.second_order and differentiated, remat=cfg.remat,
        )  # fmt: skip

    def init_state() -> UnrollState:
        def fresh(key):
            keys = jax.random.split(key, meta_batch)
            tasks = jax.vmap(lambda k: source.sample(k, source.splits["train"], False))(keys)
            return UnrollState(*start(init(key), keys), tasks, jnp.zeros((), jnp.int32))

        shapes = jax.eval_shape(fresh, jax.random.PRNGKey(0))
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def gradient(theta, state: UnrollState, tasks, keys, step, task_mean):
        # task_mean (the per-task chunked path) is unused: a segment vmaps the whole batch
        reset = state.t == 0
        fresh = (*start(jax.lax.stop_gradient(theta), keys), tasks)
        params, opt_state, tasks = jax.tree.map(
            lambda new, old: jnp.where(reset, new, old), fresh, state[:3]
        )

        def loss(theta):
            p, s, losses = jax.vmap(run, (None, 0, 0, 0, None))(
                theta, params, opt_state, tasks.support, cfg.truncation
            )
            return segment_loss(losses), (p, s)

        (value, (p, s)), grads = jax.value_and_grad(loss, has_aux=True)(theta)
        t = (state.t + cfg.truncation) % cfg.unroll
        new = UnrollState(jax.lax.stop_gradient(p), jax.lax.stop_gradient(s), tasks, t)
        return grads, new, {"loss": value, "unroll_step": state.t + cfg.truncation}

    def meta_loss(theta, task, key, step=0):
        """One problem's untruncated objective: the mean loss over a whole T-step run."""
        params = problem.init(key)
        _, _, losses = run(theta, params, rule.init_state(theta, params), task.support, cfg.unroll)
        return segment_loss(losses), {"loss": segment_loss(losses)}

    def adapt(theta, support, key, inner_steps=None):
        params = problem.init(key)
        state = rule.init_state(theta, params)
        return run(theta, params, state, support, inner_steps or cfg.unroll, False)[0]

    def predict(theta, params, x):
        return problem.apply(params, x)

    def trajectory_metrics(prefix, a_rule, theta, task, key, steps) -> dict:
        params = problem.init(key)  # the same start for every rule (the same key)
        state = a_rule.init_state(theta, params)
        losses = unroll(a_rule, problem, theta, params, state, task.support, steps)[2]
        return {f"{prefix}loss": segment_loss(losses), f"{prefix}final_loss": losses[-1]}

    def evaluate(theta, task, key, inner_steps=0):
        steps = inner_steps or cfg.unroll
        metrics = trajectory_metrics("", rule, theta, task, key, steps)
        metrics["initial_loss"] = problem.loss(problem.init(key), task.support)
        for name, baseline in baselines.items():
            metrics.update(trajectory_metrics(f"{name}_", baseline, {}, task, key, steps))
        return metrics["loss"], metrics

    return make_algorithm(
        init,
        adapt,
        predict,
        loss_fn,
        meta_loss=meta_loss,
        evaluate=evaluate,
        objective=Objective(init_state=init_state, gradient=gradient),
    )


registry.register("algo", "learned_optimizer", LearnedOptimizerConfig, make)
