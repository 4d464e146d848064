"""Session-wide test settings, for speed: the suite's time is mostly XLA compilation.

- XLA's CPU backend compiles with LLVM optimisation level 0: the tests' arrays are tiny, so
  the generated code's speed does not matter, and compiling is ~1.6x faster (the same IEEE
  float semantics; production runs keep XLA's default level).
- Compiled programs are cached on disk for the session: many tests start `metalearn train`
  processes that compile the same steps. The cache is a fresh temporary folder, shared through
  the environment by pytest-xdist's workers and the processes the tests start, and deleted at
  the end.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

_FLAGS = os.environ.get("XLA_FLAGS", "")
if "--xla_backend_optimization_level" not in _FLAGS:
    os.environ["XLA_FLAGS"] = f"{_FLAGS} --xla_backend_optimization_level=0".strip()

_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="metalearn-tests-xla-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The environment of the `metalearn` processes a test module starts: none of the user's
    data folders, a private cache, Hydra's short errors."""
    environ = {k: v for k, v in os.environ.items() if k != "METALEARN_DATA"}
    environ.update(XDG_CACHE_HOME=str(tmp_path_factory.mktemp("xdg")), HYDRA_FULL_ERROR="0")
    return environ
