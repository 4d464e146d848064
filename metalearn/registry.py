"""The options of each config group: every option module registers its schema and factory here.

Adding an option (an algorithm, a model, a dataset, a conditioning) is one module that calls
`register` when imported, plus its YAML in conf/<group>/: the modules of metalearn's option
packages are imported on first use, and so are the modules that installed packages name under the
`metalearn.plugins` entry point. Nothing here knows an option by name.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
from collections.abc import Callable
from typing import Any, NamedTuple

GROUPS = ("data", "model", "conditioning", "algo")
PACKAGES = (
    "metalearn.data",
    "metalearn.models",
    "metalearn.conditioning",
    "metalearn.algorithms",
    "metalearn.envs",
    "metalearn.rl",
    "metalearn.learned_optimizers",
)


class Option(NamedTuple):
    schema: type  # the dataclass its settings must fit; its ClassVars declare capabilities
    make: Callable[..., Any] | None  # the factory that builds it from a config of that schema


_OPTIONS: dict[str, dict[str, Option]] = {group: {} for group in GROUPS}
_loaded = False


def register(group: str, name: str, schema: type, make: Callable[..., Any] | None = None) -> None:
    """Make `name` an option of `group` (called by the option's own module when imported)."""
    if group not in _OPTIONS:
        raise ValueError(f"unknown config group {group!r}; the groups are {list(GROUPS)}")
    known = _OPTIONS[group].get(name)
    if known is not None and known.schema is not schema:
        raise ValueError(
            f"{group}={name} is registered twice, by {known.schema.__module__} and "
            f"{schema.__module__}; rename one of them."
        )
    _OPTIONS[group][name] = Option(schema, make)


def options(group: str) -> dict[str, Option]:
    """Every registered option of `group`, by name."""
    _load()
    return _OPTIONS[group]


def make_of(group: str, cfg: Any) -> Callable[..., Any]:
    """The factory registered for the schema of `cfg` (a typed config of `group`)."""
    for option in options(group).values():
        if type(cfg) is option.schema and option.make is not None:
            return option.make
    raise ValueError(f"no {group} factory is registered for {type(cfg).__name__}")


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for package in PACKAGES:
        module = importlib.import_module(package)
        for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
            if not info.name.startswith("_"):  # private modules are loaded by their users
                importlib.import_module(f"{package}.{info.name}")
    for entry in importlib.metadata.entry_points(group="metalearn.plugins"):
        entry.load()
