"""The learners: each module of this package defines one (or a family), with its schema, and
registers it (metalearn/registry.py); `ALGORITHMS` is the name -> make view of them."""

from __future__ import annotations


def __getattr__(name: str):
    if name == "ALGORITHMS":
        from metalearn import registry

        return {option: o.make for option, o in registry.options("algo").items()}
    raise AttributeError(name)
