"""algo=learned_optimizer: meta-train an update rule (algo.optimizer) on a batch of vmapped inner
problems by truncated backpropagation through their training runs (Andrychowicz et al. 2016).

Each inner run lasts algo.unroll = T steps, cut into segments of algo.truncation = K steps. A
training step advances every problem of the meta-batch by one segment, from the state the last
step left (carried under stop_gradient, as learned_optimization's truncated_unroll does), and
the outer optimizer (Adam, train.outer_lr) takes the gradient of the segment's mean inner loss;
after T / K steps the problems are replaced by the step's freshly drawn tasks. With K = T this
is full backpropagation through the whole run. algo.estimator=es | pes replaces backprop by
evolution strategies over each segment (estimators.py): truncated antithetic ES, or PES, whose
estimate is unbiased for the whole run's gradient. Evaluation runs the rule for eval.inner_steps
(default T) steps on held-out problems from the data's test split (or, with algo.eval_data, from
another family's), beside hand-designed optax baselines (algo.baselines, at fixed rates) on the
very same problems, starting points and minibatches.
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
from metalearn.learned_optimizers import estimators, from_optax, optimizers
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
MAX_ES_SAMPLES = 4096  # perturbation pairs: each holds its own copy of the batch's inner runs
MINIBATCHES = 0x4D42  # folded into a problem's key for its minibatch draws
PERTURBATIONS = 0x5E5  # folded into the first problem's key for the ES / PES perturbations


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
    estimator: str = "backprop"  # backprop | es (truncated antithetic ES) | pes (persistent ES)
    es_sigma: float = 0.01  # es, pes: the perturbations' standard deviation
    es_samples: int = 8  # es, pes: antithetic pairs of perturbations per segment
    # evaluate on this data option's inner problems (its default settings) instead of the run's:
    # a learned optimizer applied to a task family it was not trained on
    eval_data: str | None = None
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
        require(
            self.estimator in estimators.ESTIMATORS,
            f"algo.estimator={self.estimator!r} is not allowed; choose one of "
            f"{list(estimators.ESTIMATORS)}.",
        )
        positive("algo.es_sigma", self.es_sigma)
        require(
            1 <= self.es_samples <= MAX_ES_SAMPLES,
            f"algo.es_samples={self.es_samples} is not allowed: give 1 to {MAX_ES_SAMPLES} "
            "antithetic pairs.",
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
        if self.eval_data is not None:
            option = registry.options("data").get(self.eval_data)
            families = sorted(
                name
                for name, o in registry.options("data").items()
                if getattr(o.schema, "inner_problems", False)
            )
            require(
                option is not None and getattr(option.schema, "inner_problems", False),
                f"algo.eval_data={self.eval_data} is not allowed: it names the family of inner "
                f"problems to evaluate on, one of {families} (or null: the run's own data).",
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
    pes: Any = None  # estimator=pes: the pairs' own runs (estimators.PESState); else None


def eval_family(cfg: LearnedOptimizerConfig, data, rule, template):
    """(problem, source) of the inner problems evaluation draws: the run's own (None), or those of
    algo.eval_data at its default settings, which the rule must be able to run on."""
    if cfg.eval_data is None or cfg.eval_data == data.name:
        return None
    option = registry.options("data")[cfg.eval_data]
    other = option.schema()
    problem = other.problem()
    other_template = jax.eval_shape(problem.init, jax.random.PRNGKey(0))
    key = jax.random.PRNGKey(0)
    mine = jax.tree.structure(jax.eval_shape(rule.init, key, template))
    theirs = jax.tree.structure(jax.eval_shape(rule.init, key, other_template))
    require(
        mine == theirs,
        f"algo.eval_data={cfg.eval_data} is not allowed with algo.optimizer={cfg.optimizer}: "
        f"its meta-parameters are per parameter of data={data.name}'s problem, and "
        f"data={cfg.eval_data}'s problem has other parameters. Only the coordinatewise rules "
        "(lstm, mlp) carry over to another family.",
    )
    return problem, option.make(other)


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
    other = eval_family(cfg, data, rule, template)

    def init(key):
        return rule.init(key, template)

    def start(theta, keys):
        """Fresh inner runs: each problem's starting parameters and the rule's state for them."""
        params = jax.vmap(problem.init)(keys)
        return params, jax.vmap(rule.init_state, (None, 0))(theta, params)

    def run(theta, params, state, split, steps, key, differentiated=True):
        return unroll(
            rule, problem, theta, params, state, split, steps,
            second_order=cfg.second_order and differentiated, remat=cfg.remat, key=key,
        )  # fmt: skip

    def init_state() -> UnrollState:
        def fresh(key):
            keys = jax.random.split(key, meta_batch)
            tasks = jax.vmap(lambda k: source.sample(k, source.splits["train"], False))(keys)
            theta = init(key)
            carry = start(theta, keys)
            pes = None
            if cfg.estimator == "pes":
                pes = estimators.pes_start(carry, theta, cfg.es_samples)
            return UnrollState(*carry, tasks, jnp.zeros((), jnp.int32), pes)

        shapes = jax.eval_shape(fresh, jax.random.PRNGKey(0))
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def gradient(theta, state: UnrollState, tasks, keys, step, task_mean):
        # task_mean (the per-task chunked path) is unused: a segment vmaps the whole batch
        reset = state.t == 0
        fresh = (*start(jax.lax.stop_gradient(theta), keys), tasks)
        params, opt_state, tasks = jax.tree.map(
            lambda new, old: jnp.where(reset, new, old), fresh, state[:3]
        )
        # this segment's minibatches (one key per problem; fresh keys every step)
        batch_keys = jax.vmap(lambda k: jax.random.fold_in(k, MINIBATCHES))(keys)

        def segment(theta, carry):
            p, s, losses = jax.vmap(run, (None, 0, 0, 0, None, 0))(
                theta, *carry, tasks.support, cfg.truncation, batch_keys
            )
            return segment_loss(losses), (p, s)

        pes = state.pes
        if cfg.estimator == "backprop":
            (value, carry), grads = jax.value_and_grad(segment, has_aux=True)(
                theta, (params, opt_state)
            )
        else:
            noise = jax.random.fold_in(keys[0], PERTURBATIONS)  # fresh keys every step
            sigma, pairs = cfg.es_sigma, cfg.es_samples
            theta = jax.lax.stop_gradient(theta)
            if cfg.estimator == "es":
                grads, value, carry, _ = estimators.es_segment(
                    segment, theta, (params, opt_state), noise, sigma, pairs
                )
            else:
                begun = estimators.pes_start((params, opt_state), theta, pairs)
                pes = jax.tree.map(lambda new, old: jnp.where(reset, new, old), begun, pes)
                grads, value, pes, _ = estimators.pes_segment(
                    segment, theta, pes, noise, sigma, pairs
                )
                # the runs the logs and evaluation follow: the unperturbed ones are not run,
                # so carry the first pair's positive run (theta + eps, eps ~ sigma)
                carry = jax.tree.map(lambda x: x[0], pes.pos)
        p, s = carry
        t = (state.t + cfg.truncation) % cfg.unroll
        new = UnrollState(jax.lax.stop_gradient(p), jax.lax.stop_gradient(s), tasks, t, pes)
        return grads, new, {"loss": value, "unroll_step": state.t + cfg.truncation}

    def meta_loss(theta, task, key, step=0):
        """One problem's untruncated objective: the mean loss over a whole T-step run."""
        params = problem.init(key)
        state = rule.init_state(theta, params)
        losses = run(theta, params, state, task.support, cfg.unroll, minibatch_key(key))[2]
        return segment_loss(losses), {"loss": segment_loss(losses)}

    def minibatch_key(key):
        return jax.random.fold_in(key, MINIBATCHES)

    def adapt(theta, support, key, inner_steps=None):
        params = problem.init(key)
        state = rule.init_state(theta, params)
        steps = inner_steps or cfg.unroll
        return run(theta, params, state, support, steps, minibatch_key(key), False)[0]

    def predict(theta, params, x):
        return problem.apply(params, x)

    def trajectory_metrics(prefix, a_problem, a_rule, theta, task, key, steps) -> dict:
        params = a_problem.init(key)  # the same start and minibatches for every rule
        state = a_rule.init_state(theta, params)
        losses = unroll(
            a_rule, a_problem, theta, params, state, task.support, steps, key=minibatch_key(key)
        )[2]
        return {f"{prefix}loss": segment_loss(losses), f"{prefix}final_loss": losses[-1]}

    def evaluate(theta, task, key, inner_steps=0):
        steps = inner_steps or cfg.unroll
        on = problem
        if other is not None:
            # another family's held-out problem, drawn from the key (the task given is the
            # run's own family's); its source's split arrays are constants of the program
            on, other_source = other
            task = other_source.sample(
                jax.random.fold_in(key, 1), other_source.splits["test"], False
            )
        metrics = trajectory_metrics("", on, rule, theta, task, key, steps)
        metrics["initial_loss"] = on.loss(on.init(key), task.support)
        for name, baseline in baselines.items():
            metrics.update(trajectory_metrics(f"{name}_", on, baseline, {}, task, key, steps))
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
