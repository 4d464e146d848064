"""MAML for reinforcement learning (Finn et al. 2017, section 5.3), with the DiCE estimator.

Per task, the inner loop takes algo.inner_steps vanilla policy-gradient steps (REINFORCE with a
baseline), each on algo.trajectories episodes sampled with the current adapted policy; the
outer loss is the policy-gradient surrogate on fresh episodes of the adapted policy,
differentiated through the inner steps.

Both surrogates are DiCE objectives (Foerster et al. 2018): each reward r_t is weighted by the
magic box exp(L_t - stop_gradient(L_t)) of the cumulative log-probability L_t of the actions up
to t (value 1), so that differentiating the inner gradient again gives the sampling
distribution's second-order terms (grad log p grad log p^T) that a per-step REINFORCE
surrogate would drop; a baseline b_t enters as (1 - magic(log p_t)) b_t (Mao et al. 2019),
value 0, leaving the estimator unbiased. The first-order variant (algo.first_order) stops the
gradient through the inner gradients. Rewards are weighted by gamma^t (the discounted
objective's exact gradient) and the surrogate is a mean over steps, not a sum (as the MAML
reference code's mean over time steps, so its inner_lr=0.1 keeps its scale).

The baseline is the linear feature baseline (Duan et al. 2016, as the MAML-RL reference code):
per inner batch, a ridge least-squares fit of the discounted returns-to-go on the features
[obs, obs^2, t/100, (t/100)^2, (t/100)^3, 1]; or none.

Policies: model=policy_mlp over the observation, a categorical over discrete actions or a
diagonal Gaussian with a learned, state-independent log-std for continuous ones. Meta-test
reports the return after 0, 1, ..., max(3, eval.inner_steps) inner steps (return_0, ...; the
MAML paper's figure), each measured on the episodes the next step adapts on; the test metric
is the return after eval.inner_steps steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from metalearn import registry
from metalearn.algorithms.base import AlgoConfig, adam, mean_task_loss
from metalearn.checks import ConfigError, check_inner_steps, choice, positive, require
from metalearn.envs.base import KIND, Env, make_env
from metalearn.models import Model, make_model
from metalearn.rl.policy_mlp import check_feedforward
from metalearn.rl.trial import observation_input, run_trial
from metalearn.types import Algorithm

BASELINES = ("linear", "none")
CURVE_STEPS = 3  # meta-test reports the return after 0..3 inner steps at least
RIDGE = 1e-5  # the reference LinearFeatureBaseline's first regulariser


@dataclass
class MAMLRLConfig(AlgoConfig):
    kinds: ClassVar[tuple[str, ...]] = (KIND,)
    continuous_actions: ClassVar[bool] = True  # Gaussian policies (data=point_nav)

    name: str = "maml_rl"
    inner_lr: float = 0.1  # the MAML paper's rate for 2D navigation
    inner_steps: int = 1
    first_order: bool = False
    trajectories: int = 20  # episodes per inner step and for the outer loss (paper: 20)
    gamma: float = 0.99
    baseline: str = "linear"  # linear | none

    def __post_init__(self) -> None:
        positive("algo.inner_lr", self.inner_lr)
        check_inner_steps(self.inner_steps, minimum=0)
        require(
            1 <= self.trajectories <= 100_000,
            f"algo.trajectories={self.trajectories} is not allowed: give 1 to 100,000.",
        )
        require(0 <= self.gamma <= 1, f"algo.gamma={self.gamma} must lie in [0, 1].")
        choice("algo.baseline", self.baseline, BASELINES)

    def check_with(self, config) -> None:
        check_feedforward(config)


def magic(x: jax.Array) -> jax.Array:
    """DiCE's magic box: 1 in value, d/dx magic(x) = magic(x)."""
    return jnp.exp(x - jax.lax.stop_gradient(x))


def discounted_returns(rewards: jax.Array, gamma: float) -> jax.Array:
    """G_t = sum_{t' >= t} gamma^(t' - t) r_t' along the last axis."""

    def back(g, r):
        g = r + gamma * g
        return g, g

    _, out = jax.lax.scan(back, jnp.zeros(rewards.shape[:-1]), jnp.moveaxis(rewards, -1, 0),
                          reverse=True)  # fmt: skip
    return jnp.moveaxis(out, 0, -1)


def baseline_features(obs: jax.Array) -> jax.Array:
    """rllab's LinearFeatureBaseline features [n, T, 2 d + 4] of observations [n, T, d]."""
    n, t_len = obs.shape[:2]
    obs = jnp.clip(obs, -10, 10)
    t = jnp.broadcast_to((jnp.arange(t_len) / 100.0)[None, :, None], (n, t_len, 1))
    return jnp.concatenate([obs, obs**2, t, t**2, t**3, jnp.ones_like(t)], -1)


def linear_baseline(obs: jax.Array, returns: jax.Array) -> jax.Array:
    """The baseline's values [n, T]: ridge least squares of returns [n, T] on the features."""
    f = baseline_features(obs).reshape(-1, 2 * obs.shape[-1] + 4)
    a = f.T @ f + RIDGE * jnp.eye(f.shape[1])
    w = jnp.linalg.solve(a, f.T @ returns.reshape(-1))
    return (f @ w).reshape(returns.shape)


class Policy:
    """A stochastic policy from a network apply(net, x [N, n_obs]) -> outputs [N, n_actions]:
    categorical logits, or a Gaussian mean with params["log_std"] where actions are continuous.
    Its parameters are {"net": ..., "log_std": [n_actions] (continuous only)}."""

    def __init__(self, env: Env, apply):
        self.env, self.apply = env, apply

    def log_prob(self, params, x, actions) -> jax.Array:
        out = self.apply(params["net"], x)
        if not self.env.continuous_actions:
            return jnp.take_along_axis(jax.nn.log_softmax(out), actions[:, None], -1)[:, 0]
        log_std = params["log_std"]
        z = (actions - out) / jnp.exp(log_std)
        return (-0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def sample(self, params, key, x) -> jax.Array:
        out = self.apply(params["net"], x)
        if not self.env.continuous_actions:
            return jax.random.categorical(key, out)
        return out + jnp.exp(params["log_std"]) * jax.random.normal(key, out.shape)

    def agent(self, params):
        params = jax.lax.stop_gradient(params)  # sampled actions carry no gradient

        def act(state, key, obs, prev_action, prev_reward, prev_done):
            return state, self.sample(params, key, observation_input(self.env, obs)[None])[0], {}

        return act


class Learner:
    """MAML-RL's pieces on one env with one policy (built from the model by `make`; the tests
    build one over a hand-written policy)."""

    def __init__(self, env: Env, policy: Policy, cfg: MAMLRLConfig):
        self.env = env._replace(episodes=1)  # a trajectory is one episode
        self.policy, self.cfg = policy, cfg

    def sample(self, params, task, key) -> dict:
        """cfg.trajectories episodes of the policy `params`, each field [n, T, ...], with the
        baseline's values fitted to them."""
        keys = jax.random.split(key, self.cfg.trajectories)
        trial = lambda k: run_trial(self.env, self.policy.agent(params), (), task, k)  # noqa: E731
        steps = jax.vmap(trial)(keys)
        steps["baseline"] = self.baseline(steps)
        return steps

    def observations(self, steps) -> jax.Array:
        """The policy's inputs [n, T, n_obs]."""
        return jax.vmap(jax.vmap(lambda o: observation_input(self.env, o)))(steps["obs"])

    def baseline(self, steps) -> jax.Array:
        if self.cfg.baseline == "none":
            return jnp.zeros_like(steps["reward"])
        returns = discounted_returns(steps["reward"], self.cfg.gamma)
        return jax.lax.stop_gradient(linear_baseline(self.observations(steps), returns))

    def surrogate(self, params, steps) -> jax.Array:
        """The DiCE objective (to maximise): value the mean discounted reward per step, gradient
        the policy gradient with the baseline, and its own gradient the second-order terms."""
        x = self.observations(steps)
        n, t_len = steps["reward"].shape
        actions = steps["action"].reshape(n * t_len, *steps["action"].shape[2:])
        logp = self.policy.log_prob(params, x.reshape(n * t_len, -1), actions).reshape(n, t_len)
        discount = self.cfg.gamma ** jnp.arange(t_len)
        rewards = discount * steps["reward"] * magic(jnp.cumsum(logp, -1))
        baseline = discount * (1 - magic(logp)) * steps["baseline"]
        return (rewards + baseline).sum(-1).mean() / t_len

    def inner_step(self, params, steps):
        """One REINFORCE ascent step on the sampled episodes."""
        grads = jax.grad(self.surrogate)(params, steps)
        if self.cfg.first_order:
            grads = jax.lax.stop_gradient(grads)
        return jax.tree.map(lambda p, g: p + self.cfg.inner_lr * g, params, grads)

    def adapt(self, params, task, key, inner_steps: int):
        """(adapted params, the batch sampled before each step [inner_steps])."""
        batches = []
        for i in range(inner_steps):
            steps = self.sample(params, task, jax.random.fold_in(key, i))
            batches.append(steps)
            params = self.inner_step(params, steps)
        return params, batches

    def meta_loss(self, params, task, key, step=0):
        """Minus the DiCE surrogate of fresh episodes after the inner steps."""
        k_inner, k_outer = jax.random.split(key)
        adapted, batches = self.adapt(params, task, k_inner, self.cfg.inner_steps)
        steps = self.sample(adapted, task, k_outer)
        loss = -self.surrogate(adapted, steps)
        metrics = {"loss": loss, "return": episode_return(steps)}
        if batches:
            metrics["return_pre"] = episode_return(batches[0])
        return loss, metrics

    def evaluate(self, params, task, key, inner_steps: int):
        """The return after 0..max(CURVE_STEPS, inner_steps) steps; "return" after inner_steps."""
        last = max(CURVE_STEPS, inner_steps)
        adapted, batches = self.adapt(params, task, key, last)
        batches.append(self.sample(adapted, task, jax.random.fold_in(key, last)))
        metrics = {f"return_{i}": episode_return(b) for i, b in enumerate(batches)}
        metrics["return"] = metrics[f"return_{inner_steps}"]
        metrics["loss"] = -metrics["return"]
        return metrics["loss"], metrics


def episode_return(steps) -> jax.Array:
    """The mean undiscounted return of a batch's episodes."""
    return steps["reward"].sum(-1).mean()


def policy_params(model: Model, env: Env, key) -> dict:
    """The policy's initial parameters: the network, and a log-std of 0 for continuous actions
    (the MAML reference's initial std of 1)."""
    params = {"net": model.init(key, env.n_actions)}
    if env.continuous_actions:
        params["log_std"] = jnp.zeros(env.n_actions)
    return params


def make(
    cfg: MAMLRLConfig, model: Model, loss_fn=None, n_out: int = 0, *, config=None, **_
) -> Algorithm:
    if config is None:
        raise ConfigError("algo=maml_rl is built from the whole config (data.* names the env).")
    env = make_env(config.data)
    # the policy reads the observation only (the model was built for the transition record)
    net = make_model(config.model, (env.n_obs,))
    learner = Learner(env, Policy(env, net.apply), cfg)

    def not_episodic(*_):
        raise ConfigError(
            "algo=maml_rl adapts on episodes it samples from a task; it has no support-set "
            "adaptation or query prediction (use its evaluate)."
        )

    return Algorithm(
        init=lambda key: policy_params(net, env, key),
        adapt=not_episodic,
        predict=not_episodic,
        meta_loss=learner.meta_loss,
        evaluate=learner.evaluate,
        objective=mean_task_loss(learner.meta_loss),
        optimizer=adam,
    )


registry.register("algo", "maml_rl", MAMLRLConfig, make)
