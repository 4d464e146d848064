"""The latent-variable Neural Process (Garnelo et al. 2018b), with the deterministic path of Kim
et al. 2019 (ANP) and Le et al. 2018's bounded stds, trained by its ELBO.

Two encoders read the context pairs, each mean-aggregated over the real points: the
deterministic one gives r (as the CNP's), the latent one the Gaussian q(z | set) =
N(mu, (0.1 + 0.9 sigmoid(raw))^2) of a global latent z. The decoder maps (r, z, x) to a Gaussian
over y. Training maximises, per target point, with the targets T = context + query points and
z ~ q(z | T) (one reparameterised sample):

    ELBO = (1 / |T|) [ sum_t log N(y_t | decoder(r_C, z, x_t)) - KL(q(z | T) || q(z | C)) ]

At meta-test z is drawn `samples` times from q(z | C); predict returns the moment-matched
Gaussian of that mixture (so the shared Gaussian metrics and coverage apply), and evaluation
adds joint_log_likelihood, log (1/K) sum_k prod_t p(y_t | z_k) per target point: the Monte
Carlo estimate (a lower bound in expectation) comparable with the GP oracle's joint one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from metalearn import registry
from metalearn.algorithms.base import (
    AlgoConfig,
    make_algorithm,
    masked_mean,
    query_loss,
    task_loss_fn,
)
from metalearn.algorithms.cnp import all_targets, bounded_std, mlp_apply, mlp_init, pairs
from metalearn.checks import MAX_DEPTH, at_most, require, width
from metalearn.models import Model
from metalearn.types import Algorithm, Split

LOG_2PI = math.log(2 * math.pi)
MAX_SAMPLES = 10_000


@dataclass
class NPConfig(AlgoConfig):
    kinds: ClassVar[tuple[str, ...]] = ("regression",)
    reads_padded: ClassVar[bool] = True
    predictive: ClassVar[str] = "gaussian"

    name: str = "np"
    hidden: int = 128  # units of every hidden layer
    encoder_layers: int = 3  # hidden layers of each encoder MLP of (x, y)
    decoder_layers: int = 2  # hidden layers of the decoder MLP of (r, z, x)
    representation: int = 128  # size of the deterministic r (0: no deterministic path)
    latent: int = 128  # size of z
    min_std: float = 0.1  # the predictive std's lower bound (Le et al. 2018)
    samples: int = 16  # draws of z at meta-test

    def __post_init__(self) -> None:
        width("algo.hidden", self.hidden)
        width("algo.representation", self.representation, minimum=0)
        width("algo.latent", self.latent)
        for key in ("encoder_layers", "decoder_layers"):
            value = getattr(self, key)
            require(value >= 0, f"algo.{key}={value} is not allowed: it must be >= 0.")
            at_most(f"algo.{key}", value, MAX_DEPTH)
        require(
            0 <= self.min_std < 1,
            f"algo.min_std={self.min_std} is not allowed: the predictive std is min_std + "
            "(1 - min_std) softplus(.), so min_std must be in [0, 1).",
        )
        width("algo.samples", self.samples)
        at_most("algo.samples", self.samples, MAX_SAMPLES)


def gaussian_kl(mu_q, sigma_q, mu_p, sigma_p) -> jax.Array:
    """KL(N(mu_q, sigma_q^2) || N(mu_p, sigma_p^2)), summed over the last axis (diagonal)."""
    ratio = jnp.square(sigma_q / sigma_p)
    return 0.5 * jnp.sum(ratio + jnp.square((mu_q - mu_p) / sigma_p) - 1 - jnp.log(ratio), -1)


def log_normal(y, mean, std) -> jax.Array:
    return -0.5 * jnp.square((y - mean) / std) - jnp.log(std) - 0.5 * LOG_2PI


class NPFunctions(NamedTuple):
    init: Callable  # key -> params
    deterministic: Callable  # (params, split) -> r
    latent: Callable  # (params, split) -> q(z | split)'s mean and std
    decode: Callable  # (params, r, z, x) -> the Gaussian of y at x: mean, std
    elbo: Callable  # (params, task, eps) -> the ELBO per target point, z = mu + sigma eps


def functions(cfg: NPConfig, x_dim: int, y_dim: int) -> NPFunctions:
    """The NP's networks and ELBO for inputs of x_dim and targets of y_dim features."""
    hidden = [cfg.hidden]

    def init(key):
        k_det, k_lat, k_dec = jax.random.split(key, 3)
        params = {
            "latent_encoder": mlp_init(
                k_lat, [x_dim + y_dim] + hidden * cfg.encoder_layers + [2 * cfg.latent]
            ),
            "decoder": mlp_init(
                k_dec,
                [cfg.representation + cfg.latent + x_dim]
                + hidden * cfg.decoder_layers
                + [2 * y_dim],
            ),
        }
        if cfg.representation:
            params["encoder"] = mlp_init(
                k_det, [x_dim + y_dim] + hidden * cfg.encoder_layers + [cfg.representation]
            )
        return params

    def deterministic(params, split: Split) -> jax.Array:
        if not cfg.representation:
            return jnp.zeros((0,))
        return masked_mean(mlp_apply(params["encoder"], pairs(split)), split.mask)

    def latent(params, split: Split):
        """q(z | split): mean and std [latent], the two halves of the mean encoding of the real
        points."""
        s = masked_mean(mlp_apply(params["latent_encoder"], pairs(split)), split.mask)
        mu, raw = jnp.split(s, 2, -1)
        return mu, 0.1 + 0.9 * jax.nn.sigmoid(raw)

    def decode(params, r, z, x):
        """The Gaussian of y at x [m, ...] given r [R] and one z [latent]: mean, std [m, d]."""
        x = x.reshape(len(x), -1)
        rz = jnp.broadcast_to(jnp.concatenate([r, z]), (len(x), len(r) + len(z)))
        mean, raw = jnp.split(mlp_apply(params["decoder"], jnp.concatenate([rz, x], -1)), 2, -1)
        return mean, bounded_std(raw, cfg.min_std)

    def elbo(params, task, eps) -> jax.Array:
        """The ELBO per target point with the standard normal draw eps [latent] for z."""
        targets = all_targets(task)
        r = deterministic(params, task.support)
        mu_c, sigma_c = latent(params, task.support)
        mu_t, sigma_t = latent(params, targets)
        z = mu_t + sigma_t * eps
        mean, std = decode(params, r, z, targets.x)
        log_p = log_normal(targets.y, mean, std).reshape(len(mean), -1).sum(-1)
        n = jnp.maximum(jnp.sum(targets.mask), 1)
        kl = gaussian_kl(mu_t, sigma_t, mu_c, sigma_c)
        return (jnp.sum(jnp.where(targets.mask, log_p, 0.0)) - kl) / n

    return NPFunctions(init, deterministic, latent, decode, elbo)


def make(cfg: NPConfig, model: Model, loss_fn, n_out: int, *, source, **_) -> Algorithm:
    loss_fn = task_loss_fn(source.kind, cfg.predictive)
    init, deterministic, latent, decode, elbo = functions(cfg, math.prod(source.input_shape), n_out)

    def meta_loss(params, task, key, step=0):
        value = elbo(params, task, jax.random.normal(key, (cfg.latent,)))
        return -value, {"loss": -value, "elbo": value}

    def adapt(params, support, key, inner_steps=0):
        mu, sigma = latent(params, support)
        z = mu + sigma * jax.random.normal(key, (cfg.samples, cfg.latent))
        return deterministic(params, support), z

    def sampled(params, task_params, x):
        """Each z draw's Gaussian at x: means and stds [samples, m, d]."""
        r, z = task_params
        return jax.vmap(lambda z: decode(params, r, z, x))(z)

    def predict(params, task_params, x):
        """The moment-matched Gaussian of the mixture over the z draws."""
        means, stds = sampled(params, task_params, x)
        mean = means.mean(0)
        var = jnp.mean(jnp.square(stds) + jnp.square(means), 0) - jnp.square(mean)
        return mean, jnp.sqrt(jnp.maximum(var, jnp.square(stds).min(0)))

    def evaluate(params, task, key, inner_steps=0):
        task_params = adapt(params, task.support, key)
        loss, metrics = query_loss(loss_fn, lambda x: predict(params, task_params, x), task)
        q = task.query
        mask = jnp.ones(len(q.x), bool) if q.mask is None else q.mask
        means, stds = sampled(params, task_params, q.x)
        log_p = log_normal(q.y, means, stds).reshape(cfg.samples, len(q.x), -1).sum(-1)
        joint = jnp.sum(jnp.where(mask, log_p, 0.0), -1)  # [samples]
        joint = (logsumexp(joint) - math.log(cfg.samples)) / jnp.maximum(mask.sum(), 1)
        return loss, {**metrics, "joint_log_likelihood": joint}

    return make_algorithm(init, adapt, predict, loss_fn, meta_loss=meta_loss, evaluate=evaluate)


registry.register("algo", "np", NPConfig, make)
