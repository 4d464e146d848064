"""Random quadratics f(theta) = |W theta - y|^2, W and y ~ N(0, 1) per task (Andrychowicz et al.
2016, section 3.1): the inner problems of learned optimizers, sampled on the device from a key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from metalearn import registry
from metalearn.checks import require
from metalearn.data.base import SPLITS, TaskSource
from metalearn.data.problems import InnerProblem, ProblemDataConfig
from metalearn.types import Split, Task


@dataclass
class QuadraticConfig(ProblemDataConfig):
    kind: ClassVar[str] = "regression"
    inputs: ClassVar[str] = "vectors"
    size_settings: ClassVar[tuple[str, ...]] = ("dim",)

    name: str = "quadratic"
    dim: int = 10  # theta, y in R^dim and W in R^{dim x dim}
    init_scale: float = 1.0  # theta_0 ~ N(0, init_scale^2) per coordinate

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            1 <= self.dim <= 4096,
            f"data.dim={self.dim} is not allowed: give the quadratics' dimension, 1 to 4096.",
        )
        require(
            self.init_scale >= 0,
            f"data.init_scale={self.init_scale} is not allowed: it must be >= 0.",
        )

    def problem(self) -> InnerProblem:
        dim, scale = self.dim, self.init_scale

        def init(key):
            return {"theta": scale * jax.random.normal(key, (dim,))}

        def apply(params, x):
            return x @ params["theta"]

        def loss(params, split):
            return jnp.sum(jnp.square(apply(params, split.x) - split.y))

        return InnerProblem(init, apply, loss)


def sample_quadratic(key: jax.Array, dim: int) -> Task:
    """One quadratic as a task: W in split.x, y in split.y; support and query are the same
    function (an optimisation problem has no held-out examples; held-out tasks are new W, y)."""
    k_w, k_y = jax.random.split(key)
    split = Split(jax.random.normal(k_w, (dim, dim)), jax.random.normal(k_y, (dim,)))
    return Task(support=split, query=split, task_id=jnp.zeros((), jnp.int32))


def make_source(cfg: QuadraticConfig) -> TaskSource:
    # Each split folds its own index into every task key, so meta-train, meta-validation and
    # meta-test quadratics are drawn from disjoint key streams whatever keys the loop passes.
    splits = {name: jnp.asarray(i, jnp.uint32) for i, name in enumerate(SPLITS)}
    return TaskSource(
        kind="regression",
        n_out=cfg.dim,
        n_train_classes=1,
        input_shape=(cfg.dim,),
        splits=splits,
        sample=lambda key, split_id, global_labels=False: sample_quadratic(
            jax.random.fold_in(key, split_id), cfg.dim
        ),
    )


registry.register("data", "quadratic", QuadraticConfig, make_source)
