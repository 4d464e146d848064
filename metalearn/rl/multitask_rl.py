"""Multi-task, goal-conditioned RL: one policy pi(a | s, z) for every task of an environment's
distribution, z the task's descriptor, trained by PPO (Schulman et al. 2017) with GAE.

z is the task's parameters flattened (point navigation's goal; a bandit's arm means), fed through
the conditioning group's vector options (conditioning=concat, additive, film; none ignores z,
the unconditioned policy); the options that pick parameters by a task index (multihead, mmoe,
separate) have no index to pick by on a task distribution, and are refused. The policy
(a categorical, or a Gaussian with a learned state-independent log-std) and the value function
are two conditioned networks of model=<model> over the observation.

A training step samples algo.trajectories episodes of each of the train.meta_batch tasks with
the current policy, computes GAE per episode, then takes algo.epochs passes of algo.minibatches
minibatches of episodes through the clipped loss (rl/ppo.py). As for RL² (rl/rl2.py), the PPO
updates use their own Adam (train.outer_lr, clipped at algo.max_grad_norm), whose state is the
objective's state, and the step's optimizer applies their sum. The test metric is the mean
return on held-out tasks (their goals never trained on).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from metalearn import registry
from metalearn.algorithms.base import AlgoConfig
from metalearn.checks import ConfigError, require
from metalearn.conditioning import VECTOR_CONDITIONINGS, make_conditioned_model
from metalearn.envs.base import KIND, Env, make_env
from metalearn.models import Model
from metalearn.rl.maml_rl import Policy, episode_return
from metalearn.rl.policy_mlp import check_feedforward
from metalearn.rl.ppo import check_ppo_settings, gae, ppo_epochs, ppo_loss
from metalearn.rl.trial import observation_input, run_trial
from metalearn.types import Algorithm, Objective


@dataclass
class MultitaskRLConfig(AlgoConfig):
    kinds: ClassVar[tuple[str, ...]] = (KIND,)
    conditioned: ClassVar[bool] = True
    continuous_actions: ClassVar[bool] = True  # Gaussian policies (data=point_nav)

    name: str = "multitask_rl"
    trajectories: int = 4  # episodes of each task per step
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.2
    epochs: int = 4
    minibatches: int = 4  # per pass, each a slice of the step's episodes
    value_coef: float = 0.5
    entropy_coef: float = 0.0
    max_grad_norm: float = 0.5

    def __post_init__(self) -> None:
        require(
            1 <= self.trajectories <= 100_000,
            f"algo.trajectories={self.trajectories} is not allowed: give 1 to 100,000.",
        )
        check_ppo_settings(self)

    def check_with(self, config: Any) -> None:
        check_feedforward(config)
        episodes = config.train.meta_batch * self.trajectories
        require(
            episodes % self.minibatches == 0,
            f"algo.minibatches={self.minibatches} must divide train.meta_batch x "
            f"algo.trajectories = {episodes} (a step's episodes are split into that many PPO "
            "minibatches).",
        )
        require(
            config.conditioning is None or config.conditioning.name in VECTOR_CONDITIONINGS,
            f"conditioning={config.conditioning.name} is not allowed with algo=multitask_rl: it "
            "picks parameters by task id, and a task distribution has none; the policy is "
            f"conditioned on the task's parameters through one of {list(VECTOR_CONDITIONINGS)}.",
        )


def descriptor(task) -> jax.Array:
    """z: the task's parameters as one float vector."""
    return ravel_pytree(task)[0].astype(jnp.float32)


def make(
    cfg: MultitaskRLConfig, model: Model, loss_fn=None, n_out: int = 0, *, config=None, **_
) -> Algorithm:
    if config is None:
        raise ConfigError(
            "algo=multitask_rl is built from the whole config (data.* names the env)."
        )
    env: Env = make_env(config.data)._replace(episodes=1)  # a trajectory is one episode
    z_dim = int(
        jax.eval_shape(lambda k: descriptor(env.sample_task(k)), jax.random.PRNGKey(0)).size
    )
    net = make_conditioned_model(config.conditioning, config.model, (env.n_obs,), z_dim=z_dim)
    ppo_optimizer = optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm), optax.adam(config.train.outer_lr)
    )

    def conditioned(z):
        """The policy over the network conditioned on z (params: {"net", "log_std"?})."""
        return Policy(env, lambda p, x: net.apply_vector(p, x, z))

    def init(key):
        k_pi, k_v = jax.random.split(key)
        params = {"net": net.init(k_pi, env.n_actions), "value": net.init(k_v, 1)}
        if env.continuous_actions:
            params["log_std"] = jnp.zeros(env.n_actions)
        return params

    def sample(params, task, key):
        """cfg.trajectories episodes [n, T, ...] of the policy on the task, with log-probs and
        values, GAE advantages and returns."""
        params = jax.lax.stop_gradient(params)
        z = descriptor(task)
        policy = conditioned(z)
        keys = jax.random.split(key, cfg.trajectories)
        steps = jax.vmap(lambda k: run_trial(env, policy.agent(params), (), task, k))(keys)
        x = jax.vmap(jax.vmap(lambda o: observation_input(env, o)))(steps["obs"])
        steps["x"], steps["z"] = x, jnp.broadcast_to(z, (*x.shape[:2], z_dim))
        logp, values = evaluate_steps(params, steps)
        adv, returns = jax.vmap(episode_gae)(steps["reward"], values)
        return {**steps, "logp": logp, "advantage": adv, "returns": returns}

    def episode_gae(rewards, values):
        ends = jnp.zeros_like(rewards, bool)  # an episode's last step: no bootstrap past it
        return gae(rewards, values, ends, 0.0, cfg.gamma, cfg.gae_lambda)

    def evaluate_steps(params, steps):
        """Log-probabilities and values [n, T] of params along recorded episodes."""
        n, t_len = steps["reward"].shape
        flat = lambda a: a.reshape(n * t_len, *a.shape[2:])  # noqa: E731

        def one(x, z, action):  # a single step, so each step reads its own z
            logp = conditioned(z).log_prob(params, x[None], action[None])[0]
            return logp, net.apply_vector(params["value"], x[None], z)[0, 0]

        logp, values = jax.vmap(one)(flat(steps["x"]), flat(steps["z"]), flat(steps["action"]))
        return logp.reshape(n, t_len), values.reshape(n, t_len)

    def loss(params, batch):
        logp, values = evaluate_steps(params, batch)
        adv = batch["advantage"]
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)  # per minibatch, as PPO's reference code
        entropy = entropy_of(params, batch, logp)
        return ppo_loss(
            logp, batch["logp"], adv, values, batch["returns"], entropy,
            clip=cfg.clip, value_coef=cfg.value_coef, entropy_coef=cfg.entropy_coef,
        )  # fmt: skip

    def entropy_of(params, batch, logp):
        if env.continuous_actions:  # a diagonal Gaussian's, the same at every state
            log_std = params["log_std"]
            return jnp.broadcast_to((log_std + 0.5 * jnp.log(2 * jnp.pi * jnp.e)).sum(), logp.shape)
        return -logp  # a one-sample estimate for categoricals

    def gradient(params, opt_state, tasks, keys, step, task_mean):
        batch = jax.vmap(sample, (None, 0, 0))(params, tasks, keys)  # [B, n, T, ...]
        batch = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), batch)  # [B n, T, ...]
        n = keys.shape[0] * cfg.trajectories
        new_params, opt_state, metrics = ppo_epochs(
            loss, ppo_optimizer, params, opt_state, batch, n, jax.random.fold_in(keys[0], 1),
            epochs=cfg.epochs, minibatches=cfg.minibatches,
        )  # fmt: skip
        metrics["return"] = episode_return(batch)
        direction = jax.tree.map(jnp.subtract, params, new_params)  # sgd(1) applies it
        return direction, opt_state, metrics

    def init_state():
        shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
        return ppo_optimizer.init(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))

    def meta_loss(params, task, key, step=0):
        """One task's on-policy PPO loss (ratio 1: the policy gradient with GAE)."""
        return loss(params, sample(params, task, key))

    def evaluate(params, task, key, inner_steps=0):
        ret = episode_return(sample(params, task, key))
        return -ret, {"return": ret, "loss": -ret}

    def not_episodic(*_):
        raise ConfigError(
            "algo=multitask_rl acts on tasks it is told; it has no support-set adaptation or "
            "query prediction (use its evaluate)."
        )

    return Algorithm(
        init=init,
        adapt=not_episodic,
        predict=not_episodic,
        meta_loss=meta_loss,
        evaluate=evaluate,
        objective=Objective(init_state=init_state, gradient=gradient),
        optimizer=lambda train_cfg: optax.sgd(1.0),
    )


registry.register("algo", "multitask_rl", MultitaskRLConfig, make)
