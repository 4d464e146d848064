"""Learned optimizers (Andrychowicz et al. 2016; learned_optimization): inner update rules whose
own parameters are meta-learned, each a module of this package registering its factory here, and
`algo=learned_optimizer` (algorithm.py), which meta-trains whichever `algo.optimizer` names."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any, NamedTuple

import optax

from metalearn.types import Params


class LearnedOptimizer(NamedTuple):
    """An update rule in optax's shape whose hyperparameters `theta` are an explicit argument.

    init(key, params) -> theta: the rule's meta-parameters (params: the inner parameters or
        their shapes, for rules with a hyperparameter per leaf)
    init_state(theta, params) -> state: the rule's per-problem state (LSTM cells, momenta)
    update(theta, grads, state, params) -> (updates, state): params + updates is the next step
    """

    init: Callable[[Any, Params], Params]
    init_state: Callable[[Params, Params], Any]
    update: Callable[[Params, Params, Any, Params], tuple[Params, Any]]


# name -> make(algo_cfg) -> LearnedOptimizer; each optimizer module registers itself
_OPTIMIZERS: dict[str, Callable[[Any], LearnedOptimizer]] = {}
_loaded = False


def register(name: str, make: Callable[[Any], LearnedOptimizer]) -> None:
    """Make `name` a choice of algo.optimizer (called by the optimizer's module on import)."""
    if name in _OPTIMIZERS and _OPTIMIZERS[name] is not make:
        raise ValueError(f"algo.optimizer={name} is registered twice; rename one of them.")
    _OPTIMIZERS[name] = make


def optimizers() -> dict[str, Callable[[Any], LearnedOptimizer]]:
    """Every registered learned optimizer, by name (importing this package's modules once)."""
    global _loaded
    if not _loaded:
        _loaded = True
        for info in pkgutil.iter_modules(__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{__name__}.{info.name}")
    return _OPTIMIZERS


def from_optax(tx: optax.GradientTransformation) -> LearnedOptimizer:
    """A hand-designed optax rule in the same shape (no meta-parameters): the baselines."""
    return LearnedOptimizer(
        init=lambda key, params: {},
        init_state=lambda theta, params: tx.init(params),
        update=lambda theta, grads, state, params: tx.update(grads, state, params),
    )
