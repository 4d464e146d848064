"""Environments as task distributions, in pure JAX: each module defines one family (its schema,
its Env) and registers it as a data option (metalearn/envs/base.py::register_env)."""

from __future__ import annotations

from metalearn.envs.base import Env, EnvConfig, make_env

__all__ = ["Env", "EnvConfig", "make_env"]
