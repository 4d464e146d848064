"""Refuse work that cannot fit in memory before it starts, naming the sizes that ask for it.

Sizes interact (meta_batch x k_query x hidden x inner steps), so no bound per setting can say
whether a step fits; XLA can, from the compiled program, before anything is allocated.
"""

from __future__ import annotations

import resource

import jax
import numpy as np

from metalearn.config import ConfigError


def available_bytes() -> int | None:
    """Memory a program can still get: an accelerator's free memory, else the host's
    (MemAvailable, and no more than an address-space limit leaves); None where unknown."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        return None
    free = [_meminfo("/proc/meminfo", "MemAvailable:")]
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY:  # e.g. `ulimit -v` on a shared login node
        used = _meminfo("/proc/self/status", "VmSize:") or 0
        free.append(max(limit - used, 0))
    known = [f for f in free if f is not None]
    return min(known) if known else None


def _meminfo(path: str, field: str) -> int | None:
    """A `Field:  N kB` line of a /proc file, in bytes."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def tree_bytes(tree) -> int:
    """Bytes of a pytree of arrays or ShapeDtypeStructs."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def compiled_bytes(compiled) -> int | None:
    """Peak bytes of a compiled program per XLA (arguments, outputs and temporaries)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    total = stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
    return total - stats.alias_size_in_bytes


def check_fits(
    needed: int | None,
    what: str,
    sizes: str,
    data_sizes: tuple[str, ...] = ("k_shot", "k_query"),
    lower: str | None = None,
) -> None:
    """ConfigError if `needed` bytes exceed the free memory of the device that runs them;
    `sizes` says what asks for them (e.g. "32 tasks of 5 + 75 examples of shape (28, 28, 1)"),
    data_sizes the data settings that size a task (DataConfig.size_settings), `lower` what to
    lower (by default the training step's sizes)."""
    free = available_bytes()
    if needed is None or free is None or needed <= free:
        return
    data = ", ".join(f"data.{k}" for k in data_sizes)
    if lower is None:
        lower = (
            f"Lower train.meta_batch, {data} or model.hidden, or walk the meta-batch in smaller "
            "chunks (train.task_chunk)"
        )
    else:
        lower = lower.format(data=data)
    raise ConfigError(
        f"{what} needs about {needed / 2**30:.1f} GiB of memory (XLA's estimate for the "
        f"compiled program), more than the {free / 2**30:.1f} GiB free here: {sizes}. "
        f"{lower}, and run again."
    )
