"""RL² (Duan et al. 2016): a recurrent policy whose hidden state, carried across the episodes of
one trial on one task, is the learning algorithm; trained by PPO on batches of trials.

The GRU (model=gru) reads each step's transition record (rl/trial.py::transition_input) and its
head gives n_actions policy logits and a value. The hidden state starts at zero for every trial
and is never reset between the trial's episodes. A training step rolls out train.meta_batch
trials (vmapped, each a lax.scan), computes GAE over each trial as one trajectory (discounting
runs across its episodes, as in the paper), then takes algo.epochs passes of algo.minibatches
minibatches of trials through PPO's clipped loss, replaying the GRU over each trial. The PPO
updates use their own Adam (train.outer_lr, clipped at algo.max_grad_norm), whose state is the
objective's state, so a resumed run continues it; the step's optimizer applies their sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax

from metalearn import registry
from metalearn.algorithms.base import AlgoConfig
from metalearn.checks import ConfigError, require
from metalearn.envs.base import KIND, Env, make_env
from metalearn.models import Model, feature_size
from metalearn.rl.ppo import check_ppo_settings, gae, ppo_epochs, ppo_loss
from metalearn.rl.trial import run_trial, transition_input
from metalearn.types import Algorithm, Objective


@dataclass
class RL2Config(AlgoConfig):
    kinds: ClassVar[tuple[str, ...]] = (KIND,)

    name: str = "rl2"
    gamma: float = 0.99
    gae_lambda: float = 0.3  # low: less variance from the noisy bandit rewards, more bias
    clip: float = 0.2
    epochs: int = 4  # PPO passes over each batch of trials
    minibatches: int = 4  # per pass, each a slice of the meta-batch's trials
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    max_grad_norm: float = 0.5
    normalize_advantages: bool = True  # per minibatch, as PPO's reference code does

    def __post_init__(self) -> None:
        check_ppo_settings(self)

    def check_with(self, config: Any) -> None:
        batch = config.train.meta_batch
        require(
            batch % self.minibatches == 0,
            f"algo.minibatches={self.minibatches} must divide train.meta_batch={batch} (the "
            "trials of a step are split into that many PPO minibatches).",
        )


class Policy:
    """The GRU policy's pieces: one step, a trial's rollout and the replay the loss takes."""

    def __init__(self, model: Model, env: Env):
        self.model, self.env = model, env
        self.hidden = feature_size(model)

    def step(self, params, h, inputs):
        """(h', logits [A], value) from h [H] and one transition record."""
        h = self.model.embed(params, jnp.concatenate([h, inputs])[None])
        out = self.model.head(params, h)[0]
        return h[0], out[: self.env.n_actions], out[self.env.n_actions]

    def initial_state(self) -> jax.Array:
        return jnp.zeros(self.hidden)  # every trial starts here: RL²'s reset between trials

    def agent(self, params):
        def act(h, key, obs, prev_action, prev_reward, prev_done):
            inputs = transition_input(self.env, obs, prev_action, prev_reward, prev_done)
            h, logits, value = self.step(params, h, inputs)
            action = jax.random.categorical(key, logits)
            logp = jax.nn.log_softmax(logits)[action]
            return h, action, {"logp": logp, "value": value}

        return act

    def trial(self, params, task, key) -> dict:
        return run_trial(self.env, self.agent(params), self.initial_state(), task, key)

    def replay(self, params, steps: dict):
        """Logits [T, A] and values [T] of the policy `params` along a recorded trial."""
        inputs = jax.vmap(lambda *a: transition_input(self.env, *a))(
            steps["obs"], steps["prev_action"], steps["prev_reward"], steps["prev_done"]
        )

        def body(h, x):
            h, logits, value = self.step(params, h, x)
            return h, (logits, value)

        _, (logits, values) = jax.lax.scan(body, self.initial_state(), inputs)
        return logits, values


def trial_metrics(steps: dict, env: Env) -> dict:
    """A trial's test metrics: its return, the loss minimised (minus the return: validation and
    sweeps take the lowest loss, as for regression), and its expected regret where defined."""
    total = steps["reward"].sum(axis=-1)
    metrics = {"return": total, "loss": -total}
    if env.regret is not None:
        metrics["regret"] = steps["regret"].sum(axis=-1)
    return metrics


def make(
    cfg: RL2Config, model: Model, loss_fn=None, n_out: int = 0, *, config=None, **_
) -> Algorithm:
    if config is None:
        raise ConfigError("algo=rl2 is built from the whole config (its data.* names the env).")
    env = make_env(config.data)
    policy = Policy(model, env)
    ppo_optimizer = optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm), optax.adam(config.train.outer_lr)
    )

    def init(key):
        return model.init(key, env.n_actions + 1)  # policy logits and the value

    def advantages(steps):
        # One trajectory per trial: no bootstrap after its last step, none between episodes.
        no_ends = jnp.zeros_like(steps["reward"], bool)
        return gae(steps["reward"], steps["value"], no_ends, 0.0, cfg.gamma, cfg.gae_lambda)

    def loss(params, batch):
        steps, adv, returns = batch
        logits, values = jax.vmap(policy.replay, (None, 0))(params, steps)
        logp_all = jax.nn.log_softmax(logits)
        logp = jnp.take_along_axis(logp_all, steps["action"][..., None], -1)[..., 0]
        entropy = -(jnp.exp(logp_all) * logp_all).sum(-1)
        if cfg.normalize_advantages:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        return ppo_loss(
            logp, steps["logp"], adv, values, returns, entropy,
            clip=cfg.clip, value_coef=cfg.value_coef, entropy_coef=cfg.entropy_coef,
        )  # fmt: skip

    def rollouts(params, tasks, keys):
        steps = jax.vmap(policy.trial, (None, 0, 0))(jax.lax.stop_gradient(params), tasks, keys)
        adv, returns = jax.vmap(advantages)(steps)
        return steps, adv, returns

    def gradient(params, opt_state, tasks, keys, step, task_mean):
        batch = rollouts(params, tasks, keys)
        n = keys.shape[0]
        new_params, opt_state, metrics = ppo_epochs(
            loss, ppo_optimizer, params, opt_state, batch, n, jax.random.fold_in(keys[0], 1),
            epochs=cfg.epochs, minibatches=cfg.minibatches,
        )  # fmt: skip
        metrics.update(
            {k: v.mean() for k, v in trial_metrics(batch[0], env).items() if k != "loss"}
        )
        direction = jax.tree.map(jnp.subtract, params, new_params)  # sgd(1) applies it
        return direction, opt_state, metrics

    def init_state():
        shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
        return ppo_optimizer.init(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))

    def meta_loss(params, task, key, step=0):
        """One trial's on-policy PPO loss (ratio 1: the policy gradient with GAE)."""
        batch = jax.tree.map(lambda a: a[None], rollouts(params, task[None], key[None]))
        return loss(params, batch)

    def evaluate(params, task, key, inner_steps=0):
        metrics = trial_metrics(policy.trial(params, task, key), env)
        return metrics["loss"], metrics

    def not_episodic(*_):
        raise ConfigError(
            "algo=rl2 adapts in its hidden state while it acts in a trial; it has no support-set "
            "adaptation or query prediction (use its evaluate)."
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


registry.register("algo", "rl2", RL2Config, make)
