"""Multi-host runs: join the processes of one job through jax.distributed before any JAX work.

Every process runs the same `metalearn train` command; the meta-batch is sharded over the
devices of all processes, and only process 0 writes the run directory.
"""

from __future__ import annotations

import os

import jax

from metalearn.config import ConfigError

# Explicit settings for launchers JAX does not detect by itself (JAX detects Slurm, Open MPI,
# Kubernetes and Cloud TPU from their own environment variables).
ENV = {
    "coordinator_address": "METALEARN_COORDINATOR",  # host:port of process 0
    "num_processes": "METALEARN_NUM_PROCESSES",
    "process_id": "METALEARN_PROCESS_ID",
}


def initialize() -> None:
    kwargs = {name: os.environ[var] for name, var in ENV.items() if var in os.environ}
    for name in ("num_processes", "process_id"):
        if name in kwargs:
            try:
                kwargs[name] = int(kwargs[name])
            except ValueError:
                raise ConfigError(
                    f"{ENV[name]}={kwargs[name]!r} is not allowed: it must be an integer."
                ) from None
    # CPU devices of different processes talk through gloo; accelerators ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as error:  # no launcher detected, or no coordinator
        raise ConfigError(
            f"distributed=true could not join a multi-host job ({str(error).strip()}). JAX "
            "finds the job's processes itself under Slurm, Open MPI, Kubernetes and Cloud TPU; "
            "elsewhere set METALEARN_COORDINATOR=host:port (process 0's address), "
            "METALEARN_NUM_PROCESSES and METALEARN_PROCESS_ID for every process. For one "
            "process, leave distributed=false."
        ) from None


def is_primary() -> bool:
    return jax.process_index() == 0
