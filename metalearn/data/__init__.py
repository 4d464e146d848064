"""Task sources: a dataset as device arrays per split plus a pure, jittable episode sampler.

Each dataset option is a module of this package that registers its schema and its source
factory (metalearn/registry.py); `make_task_source` builds whichever the config names.
"""

from __future__ import annotations

from metalearn import registry
from metalearn.data.base import SPLITS, DataConfig, EpisodicDataConfig, TaskSource

__all__ = ["SPLITS", "DataConfig", "EpisodicDataConfig", "TaskSource", "make_task_source"]


def make_task_source(cfg: DataConfig) -> TaskSource:
    return registry.make_of("data", cfg)(cfg)
