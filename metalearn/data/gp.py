"""1-D Gaussian-process regression tasks (the ConvCNP benchmark, Gordon et al. 2020), sampled on the
device as padded splits, and the exact GP predictive (the oracle) on the same tasks.

Each task draws a function f ~ GP(0, k) at inputs uniform on x_range, observes y = f + noise, and
splits the points into a context (the support set) and disjoint targets (the query set) whose
sizes are drawn per task uniformly from min_shot..k_shot and min_query..k_query. As in the
ConvCNP code (cambridge-mlg/convcnp, `data.py`, `train.py`): x on [-2, 2], 3..50 context and 3..50
target points, the EQ and Matérn-5/2 kernels with length scale 0.25, and the weakly periodic kernel
EQ(length 0.5) x periodic(period 0.25). Unlike that code (noiseless samples) the observations carry
Gaussian noise of std `noise` (0.05 by default, as Bruinsma et al. 2021's GP benchmarks): a float32
Cholesky of a 100-point EQ covariance without it is unreliable, and the oracle's log-likelihood of
noiseless targets is unbounded.

Every split is padded to k_shot / k_query slots with mask (types.Split.mask) marking the real
points, so tasks of different sizes batch and jit as one shape; padded slots hold x = y = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import jax
import jax.numpy as jnp

from metalearn import registry
from metalearn.checks import choice, require
from metalearn.data.base import SPLITS, DataConfig, TaskSource
from metalearn.types import Split, Task

KERNELS = ("eq", "matern52", "weakly_periodic")
MIN_NOISE = 0.01  # below it the float32 Cholesky of the covariance of 100 points can fail
LOG_2PI = math.log(2 * math.pi)


@dataclass
class GPConfig(DataConfig):
    kind: ClassVar[str] = "regression"
    inputs: ClassVar[str] = "vectors"
    padded: ClassVar[bool] = True

    name: str = "gp"
    kernel: str = "eq"  # eq | matern52 | weakly_periodic
    k_shot: int = 50  # the most context points of a task (the support set's padded size)
    k_query: int = 50  # the most target points of a task (the query set's padded size)
    min_shot: int = 3  # each task draws its context size uniformly from min_shot..k_shot
    min_query: int = 3  # and its number of targets from min_query..k_query
    x_range: tuple[float, float] = (-2.0, 2.0)
    noise: float = 0.05  # std of the Gaussian observation noise on every y

    def __post_init__(self) -> None:
        super().__post_init__()
        choice("data.kernel", self.kernel, KERNELS)
        for low, high in (("min_shot", "k_shot"), ("min_query", "k_query")):
            lo, hi = getattr(self, low), getattr(self, high)
            require(
                1 <= lo <= hi,
                f"data.{low}={lo} is not allowed: it must be from 1 to data.{high}={hi} (each task "
                f"draws its size uniformly from data.{low} to data.{high}).",
            )
        lo, hi = self.x_range
        require(
            lo < hi,
            f"data.x_range=[{lo}, {hi}] is not allowed: the low end must be below the high end.",
        )
        require(
            self.noise >= MIN_NOISE and math.isfinite(self.noise),
            f"data.noise={self.noise} is not allowed: the observation noise std must be at least "
            f"{MIN_NOISE} (with less, float32 Cholesky factors of the covariance fail).",
        )


def kernel_matrix(kernel: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """k(a_i, b_j) [n, m] for 1-D inputs a [n, 1], b [m, 1] (unit variance)."""
    r = a[:, :1] - b[:, :1].T
    if kernel == "eq":
        return jnp.exp(-0.5 * jnp.square(r / 0.25))
    if kernel == "matern52":
        d = math.sqrt(5.0) * jnp.abs(r) / 0.25
        return (1.0 + d + jnp.square(d) / 3.0) * jnp.exp(-d)
    if kernel == "weakly_periodic":  # an EQ envelope times MacKay's periodic kernel
        return jnp.exp(-0.5 * jnp.square(r / 0.5) - 2.0 * jnp.square(jnp.sin(math.pi * r / 0.25)))
    raise ValueError(f"unknown kernel {kernel!r}; the kernels are {list(KERNELS)}")


def sample_gp_task(key: jax.Array, cfg: GPConfig) -> Task:
    """One task: a GP draw at k_shot + k_query uniform inputs, the first n_c the context, the next
    n_t the targets (the inputs are i.i.d., so this is a uniformly random split)."""
    k_x, k_f, k_c, k_t = jax.random.split(key, 4)
    n = cfg.k_shot + cfg.k_query
    x = jax.random.uniform(k_x, (n, 1), minval=cfg.x_range[0], maxval=cfg.x_range[1])
    cov = kernel_matrix(cfg.kernel, x, x) + cfg.noise**2 * jnp.eye(n)
    y = jnp.linalg.cholesky(cov) @ jax.random.normal(k_f, (n, 1))
    n_context = jax.random.randint(k_c, (), cfg.min_shot, cfg.k_shot + 1)
    n_target = jax.random.randint(k_t, (), cfg.min_query, cfg.k_query + 1)

    def padded(x, y, size):
        mask = jnp.arange(len(x)) < size
        return Split(jnp.where(mask[:, None], x, 0.0), jnp.where(mask[:, None], y, 0.0), mask)

    return Task(
        support=padded(x[: cfg.k_shot], y[: cfg.k_shot], n_context),
        query=padded(x[cfg.k_shot :], y[cfg.k_shot :], n_target),
        task_id=jnp.zeros((), jnp.int32),
    )


def make_source(cfg: GPConfig) -> TaskSource:
    sample = partial(sample_gp_task, cfg=cfg)
    # One task distribution: splits differ only by the keys that draw from it.
    return TaskSource(
        kind="regression",
        n_out=1,
        n_train_classes=1,
        input_shape=(1,),
        splits={name: () for name in SPLITS},
        sample=lambda key, arrays, global_labels=False: sample(key),
    )


# ---------------------------------------------------------------------------------------------
# The exact posterior predictive of the GP that drew a task (the oracle: algorithms/gp_oracle.py)


def _masked_cov(k: jax.Array, mask_a: jax.Array, mask_b: jax.Array) -> jax.Array:
    return jnp.where(mask_a[:, None] & mask_b[None, :], k, 0.0)


def gp_posterior(cfg: GPConfig, context: Split, x: jax.Array, mask: jax.Array | None = None):
    """The predictive of y at inputs x [m, 1] given the real context points: mean [m, 1] and
    covariance [m, m] (observation noise included). Padded context slots are cut out of the
    covariance (their rows become those of an isolated unit-variance point with y = 0), so they
    change nothing; padded targets (mask False) get an isolated unit-variance row."""
    mc = context.mask if context.mask is not None else jnp.ones(len(context.x), bool)
    mt = mask if mask is not None else jnp.ones(len(x), bool)
    noise2 = cfg.noise**2
    k_cc = _masked_cov(kernel_matrix(cfg.kernel, context.x, context.x), mc, mc)
    k_cc = k_cc + jnp.diag(jnp.where(mc, noise2, 1.0))
    k_tc = _masked_cov(kernel_matrix(cfg.kernel, x, context.x), mt, mc)
    k_tt = _masked_cov(kernel_matrix(cfg.kernel, x, x), mt, mt)
    k_tt = k_tt + jnp.diag(jnp.where(mt, noise2, 1.0))
    chol = jnp.linalg.cholesky(k_cc)
    solve = partial(jax.scipy.linalg.cho_solve, (chol, True))
    y_c = jnp.where(mc[:, None], context.y, 0.0)
    mean = k_tc @ solve(y_c)
    cov = k_tt - k_tc @ solve(k_tc.T)
    return mean, cov


def joint_log_likelihood(cfg: GPConfig, task: Task) -> jax.Array:
    """log p(y_targets | context) under the GP, jointly over the real targets, per target point."""
    q = task.query
    mt = q.mask if q.mask is not None else jnp.ones(len(q.x), bool)
    mean, cov = gp_posterior(cfg, task.support, q.x, mt)
    return joint_log_density(q.y, mean, cov, mt)


def joint_log_density(y: jax.Array, mean: jax.Array, cov: jax.Array, mask: jax.Array):
    """log N(y | mean, cov) over the real targets (mask) per target point, for a gp_posterior
    whose padded targets are isolated unit-variance rows."""
    resid = jnp.where(mask, (y - mean)[:, 0], 0.0)
    chol = jnp.linalg.cholesky(cov)
    z = jax.scipy.linalg.solve_triangular(chol, resid, lower=True)
    # each padded target is an isolated N(0 | 0, 1) factor: leave its -0.5 log(2 pi) out
    log_p = -0.5 * jnp.sum(z**2) - jnp.sum(jnp.log(jnp.diag(chol))) - 0.5 * LOG_2PI * mask.sum()
    return log_p / jnp.maximum(mask.sum(), 1)


registry.register("data", "gp", GPConfig, make_source)
