"""Randomness inside models (dropout, DropBlock): a key stream scoped at trace time.

No learner passes keys to its model: the train step opens a `training(key)` scope around each
task's loss, with that task's key, and a model that needs randomness asks `next_key()`. Each
call during one trace gets its own key (the scope's key folded with a trace-time counter), so the
support and the query pass of a task, and every task, get different masks, the same on every
run from the same key (exact resume). A loop body is traced once, so loops whose iterations must
differ (an inner loop's steps) open `step(i)` with the traced iteration index. Outside a training
scope, and at meta-test (metalearn/models/norm.py::testing), `next_key()` is None: models are
deterministic (dropout off), as evaluation and the public API use them.

Like norm.testing, the scope lives at trace time: enter it inside the traced function.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

from metalearn.models.norm import is_testing

STREAM = 0x6D6C6472  # folded into a task's key so model randomness is its own stream


class _Stream:
    def __init__(self, key):
        self.key, self.count = key, 0

    def next(self):
        self.count += 1
        return jax.random.fold_in(self.key, self.count)


_stream: contextvars.ContextVar[_Stream | None] = contextvars.ContextVar(
    "metalearn_randomness", default=None
)


@contextlib.contextmanager
def _scope(stream):
    token = _stream.set(stream)
    try:
        yield
    finally:
        _stream.reset(token)


def training(key):
    """Within: models draw their random keys from `key` (one task's, in the train step)."""
    return _scope(_Stream(jax.random.fold_in(key, STREAM)))


def step(i):
    """Within a training scope: a stream for iteration `i` (traced) of a loop body."""
    stream = _stream.get()
    return _scope(None if stream is None else _Stream(jax.random.fold_in(stream.next(), i)))


def next_key():
    """A fresh key for one random operation, or None: the model must then be deterministic."""
    stream = _stream.get()
    return None if stream is None or is_testing() else stream.next()
