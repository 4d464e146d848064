"""Reading a downloaded pickle without letting it run code.

A pickle names the callables that rebuild its objects, and pickle.load imports and calls
whatever it names: a file whose payload names os.system runs a shell command before anything
can look at what it holds. The few-shot projects' pickles (learn2learn's, Ren et al.'s, RFS /
MetaOptNet's) come from third-party mirrors, so they are read with `load`, which resolves only
the globals those formats hold, from a fixed table (nothing is imported by name):

- numpy arrays, scalars and dtypes, as numpy 1.x (`numpy.core...`) and 2.x (`numpy._core...`)
  pickle them at protocols 2 to 5, and as Python 2's numpy did (read with encoding latin1);
- the builtins that protocol 2 writes by name: bytes, bytearray, set, frozenset (dicts, lists,
  tuples, str, numbers and None have opcodes of their own), and `_codecs.encode` of a latin1
  string, which is how Python 3 writes bytes at protocol 2 (any other codec is refused).

Any other global is refused with `Refused`, before it is called, naming the module and name.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import pickle
from typing import Any, BinaryIO

import numpy as np


class Refused(pickle.UnpicklingError):
    """The pickle names a global outside the table; `name` is "module.name"."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """`_codecs.encode` as protocol 2 pickles of bytes call it: latin1 only, since a codec
    name is looked up (and its module imported) by the codecs registry."""
    if encoding.replace("_", "-").lower() not in ("latin1", "latin-1", "iso-8859-1"):
        raise Refused(f"_codecs.encode with the codec {encoding!r}")
    return codecs.encode(text, "latin1", errors)


def _table() -> dict[tuple[str, str], Any]:
    """(module, name) -> the object, for every global the dataset pickles hold. The numpy
    callables are taken from what the installed numpy's own pickles call, so that both module
    spellings resolve under numpy 1.x and 2.x without touching the deprecated numpy.core."""
    reconstruct = np.zeros(1).__reduce__()[0]  # multiarray._reconstruct
    scalar = np.float64(0).__reduce__()[0]  # multiarray.scalar
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # numeric._frombuffer (protocol 5)
    table: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray}
    table[("numpy", "dtype")] = np.dtype
    for core in ("numpy.core", "numpy._core"):
        table[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        table[(f"{core}.multiarray", "scalar")] = scalar
        table[(f"{core}.numeric", "_frombuffer")] = frombuffer
    for module in ("builtins", "__builtin__"):  # Python 3's name, and Python 2's
        for kind in (bytes, bytearray, set, frozenset):
            table[(module, kind.__name__)] = kind
    for module in ("_codecs", "codecs"):
        table[(module, "encode")] = _latin1_encode
    return table


_ALLOWED = _table()


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            # named as Python 3 would import it (protocol 2 writes __builtin__.exec, say)
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
            raise Refused(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:  # an id resolved by the writer's own code
        raise Refused(f"persistent id {pid!r}")


def load(file: BinaryIO, encoding: str = "latin1") -> Any:
    """The object pickled in `file`, refusing (Refused) any global outside the table.
    encoding latin1 reads Python 2 pickles' str and numpy arrays, as numpy recommends."""
    return _Unpickler(file, encoding=encoding).load()


def allowed() -> list[str]:
    """The globals admitted, as "module.name" (for docs and errors)."""
    return sorted(f"{m}.{n}" for m, n in _ALLOWED)
