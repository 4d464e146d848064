"""Session-wide test settings.

Compiled XLA programs are cached on disk for the session: many tests start `metalearn train`
processes that compile the same steps, and a cache hit skips the compilation. The cache is a
fresh temporary folder (shared by pytest-xdist's workers and the processes the tests start,
through the environment) and is deleted at the end.
"""

from __future__ import annotations

import os
import shutil
import tempfile

_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="metalearn-tests-xla-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
