"""Session-wide test settings, for speed: the suite's time is mostly XLA compilation.

- XLA's CPU backend compiles with LLVM optimisation level 0: the tests' arrays are tiny, so
  the generated code's speed does not matter, and compiling is ~1.6x faster (the same IEEE
  float semantics; production runs keep XLA's default level).
- Compiled programs are cached on disk (JAX's persistent compilation cache), in
  .pytest_cache/xla beside the tests, kept between runs (about 20 MB for the fast tier; delete
  the folder to reclaim it; JAX's size cap is not used, as its bookkeeping doubled a cold run's
  time): many tests start `metalearn train` processes that compile the same
  steps, and between edits most programs are unchanged, so a second run of the fast tier
  recompiles little (measured: 105 s cold, 55 s warm, on 2 cores). The folder is shared through
  the environment by pytest-xdist's workers and the processes the tests start; entries are
  keyed by the program, the flags and the JAX version, so a stale one is never used. Set
  JAX_COMPILATION_CACHE_DIR to use another folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_FLAGS = os.environ.get("XLA_FLAGS", "")
if "--xla_backend_optimization_level" not in _FLAGS:
    os.environ["XLA_FLAGS"] = f"{_FLAGS} --xla_backend_optimization_level=0".strip()

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = Path(__file__).resolve().parents[1] / ".pytest_cache" / "xla"
    _cache.mkdir(parents=True, exist_ok=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(_cache)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"


@pytest.fixture(scope="module")
def omniglot(tmp_path_factory):
    """A tiny Omniglot release (3 background and 2 evaluation alphabets of 4 characters) in the
    official zips' layout, made once per test module."""
    from omniglot_fixture import make_omniglot_zips

    return make_omniglot_zips(tmp_path_factory.mktemp("omniglot"), 3, 2, 4)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The environment of the `metalearn` processes a test module starts: none of the user's
    data folders, a private cache, Hydra's short errors."""
    environ = {k: v for k, v in os.environ.items() if k != "METALEARN_DATA"}
    environ.update(XDG_CACHE_HOME=str(tmp_path_factory.mktemp("xdg")), HYDRA_FULL_ERROR="0")
    return environ
