"""metalearn: meta-learning and multi-task learning experiments on JAX, configured by Hydra.

`metalearn.load_run(RUN_DIR)` loads a trained run to use on your own data (metalearn/api.py).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Run", "TaskParams", "load_run"]


def __getattr__(name: str) -> Any:
    # Imported on first use: `import metalearn.cli` stays free of JAX until a command needs it.
    if name in __all__:
        from metalearn import api

        return getattr(api, name)
    raise AttributeError(f"module 'metalearn' has no attribute {name!r}")
