"""The checks every option's schema runs on its values, and the error they raise."""

from __future__ import annotations

import math


class ConfigError(ValueError):
    """A configuration value that is out of range; the message is shown to the user as is."""


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def positive(name: str, value: float) -> None:
    require(
        value is not None and value > 0 and math.isfinite(value),
        f"{name}={value} is not allowed: it must be a positive number.",
    )


# Upper bounds on sizes that allocate arrays or unroll loops: far beyond any published setting,
# low enough that what they ask for is refused here, not by the allocator or an int32 overflow.
# (Sizes that only interact, such as meta_batch x k_query x hidden, are checked on the compiled
# step's memory instead: metalearn/memory.py.)
MAX_EXAMPLES = 100_000  # support or query examples per class or task
MAX_WIDTH = 65_536  # hidden units or filters
MAX_DEPTH = 1_000  # layers
MAX_TASKS = 1_000_000  # tasks per meta-batch, per evaluation, in a multi-task set
MAX_INNER_STEPS = 100_000  # adaptation steps of an inner loop
INT32_MAX = 2**31 - 1  # JAX's default integers are 32-bit


def at_most(name: str, value: int, limit: int) -> None:
    require(
        value <= limit,
        f"{name}={value} is not allowed: it must be at most {limit:,} (metalearn's bound for this "
        "size, far beyond any published setting; it keeps a typo from exhausting memory).",
    )


def check_seed(name: str, value: int) -> None:
    require(
        0 <= value <= INT32_MAX,
        f"{name}={value} is not allowed: a seed must be an integer from 0 to {INT32_MAX} "
        "(JAX keys are built from 32-bit integers, so larger seeds would repeat smaller ones).",
    )


def choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    require(value in allowed, f"{name}={value!r} is not allowed; choose one of {list(allowed)}.")


def check_inner_steps(value: int, minimum: int = 1) -> None:
    """algo.inner_steps: the number of adaptation steps an inner loop unrolls."""
    require(value >= minimum, f"algo.inner_steps={value} must be >= {minimum}.")
    at_most("algo.inner_steps", value, MAX_INNER_STEPS)


def width(name: str, value: int, minimum: int = 1) -> None:
    """A number of hidden units, filters, experts or the like."""
    require(value >= minimum, f"{name}={value} must be >= {minimum}.")
    at_most(name, value, MAX_WIDTH)
