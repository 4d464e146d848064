"""Inner optimisation problems: task families whose tasks are losses to minimise (for learned
optimizers), and the schema base that declares a data option provides them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import jax

from metalearn.checks import require
from metalearn.data.base import DataConfig
from metalearn.types import Params, Split


class InnerProblem(NamedTuple):
    """One family's inner problem as pure functions of one task (vmap them over a batch).

    init(key) -> params: the starting parameters (a pytree; their shapes do not depend on the task)
    apply(params, x) -> outputs: what the parameters compute on a split's inputs
    loss(params, split) -> scalar: the loss an inner optimizer minimises on a task's split
    minibatch(split, key) -> split: the examples one inner step reads (a fresh minibatch drawn
        from `key` per step, for stochastic problems); None: every step reads the whole split
    """

    init: Callable[[jax.Array], Params]
    apply: Callable[[Params, Any], Any]
    loss: Callable[[Params, Split], jax.Array]
    minibatch: Callable[[Split, jax.Array], Split] | None = None


@dataclass
class ProblemDataConfig(DataConfig):
    """A data option whose tasks are inner problems (its `problem()`), trained by learners that
    declare `needs_inner_problems` (learned optimizers); other learners are refused."""

    inner_problems: ClassVar[bool] = True

    def problem(self) -> InnerProblem:
        raise NotImplementedError(f"{type(self).__name__} must define problem()")

    def check_with(self, config: Any) -> None:
        from metalearn import registry

        if getattr(type(config.algo), "needs_inner_problems", False):
            return
        learners = sorted(
            name
            for name, option in registry.options("algo").items()
            if getattr(option.schema, "needs_inner_problems", False)
        )
        require(
            False,
            f"algo={config.algo.name} cannot train on data={self.name}: its tasks are inner "
            "optimisation problems (a loss over parameters, with no support/query examples to "
            f"adapt to), which only learners of optimizers train on: algo in {learners}.",
        )
