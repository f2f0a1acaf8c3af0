"""A bounded, restricted reader for pickles that hold only data (the CIFAR "python version" files).

``load_data_pickle(path)`` builds dicts, lists, tuples, strings, bytes, numbers and plain integer
numpy arrays, and nothing else:

* The only globals a file may name are numpy's array and dtype reconstructors and ``_codecs.encode``
  (how Python 3 writes bytes at protocol 2). They are answered by stand-ins written here, never by
  numpy's own callables. An array is built from the file's bytes with ``np.frombuffer`` + copy once
  its dtype (an integer kind, no fields, no objects) and its shape have been checked against the
  byte count. ``numpy.ndarray(...)`` called directly (how a pickle hands numpy a buffer of its
  choosing) and object or structured dtypes are refused.
* What a file may make is bounded before it is built. Its size is at most ``MAX_BYTES``. Its opcodes
  are counted in a first pass (``pickletools.genops``, which builds nothing) and at most ``MAX_OPS``
  may run. The bytes the stand-ins produce are at most twice the file's size. The unpickler is
  Python's pure-Python one reading from memory, so a memo index of 2**26 is one dict entry and a
  length field of 4 GiB reads to the end of the file. Nesting is at most ``MAX_DEPTH`` deep.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
from pathlib import Path

import numpy as np

MAX_BYTES = 512 << 20  # CIFAR-100's train file, the largest published one, is 155 MB
MAX_OPS = 1_000_000  # CIFAR-100's train file runs about 200,000 opcodes (3 lists of 50,000)
MAX_DEPTH = 16  # the CIFAR files are 3 deep (a dict of lists)
INTEGER_KINDS = ("u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8")


class UnsafePickle(pickle.UnpicklingError):
    """The file asks for something a data pickle never needs; the message says what."""


class _NdarrayName:
    """Stands for ``numpy.ndarray`` in a pickle: only ever passed to ``_reconstruct``."""

    def __new__(cls, *args, **kwargs):
        raise UnsafePickle("refusing to call numpy.ndarray(...) directly (a data file passes arrays through _reconstruct)")


class _DType:
    """Stands for a ``numpy.dtype``: plain integer kinds only, no fields."""

    def __init__(self, typestr, align=False, copy=True):
        if not isinstance(typestr, str) or typestr not in INTEGER_KINDS:
            raise UnsafePickle(f"refusing numpy dtype {typestr!r} (a data file holds integer arrays: {', '.join(INTEGER_KINDS)})")
        self.np = np.dtype(typestr)

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) < 5:
            raise UnsafePickle(f"refusing a numpy dtype state {type(state).__name__} of this shape")
        order, names, fields = state[1], state[3], state[4]
        if names is not None or fields is not None:
            raise UnsafePickle("refusing a structured numpy dtype (a data file holds plain integer arrays)")
        if order not in ("<", ">", "|", "="):
            raise UnsafePickle(f"refusing numpy byte order {order!r}")
        if order in "<>":
            self.np = self.np.newbyteorder(order)


class _Array:
    """Stands for an array being reconstructed; ``__setstate__`` builds the real one."""

    def __init__(self, budget: list[int]):
        self.array: np.ndarray | None = None
        self._budget = budget

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) != 5:
            raise UnsafePickle("refusing a numpy array state of this shape")
        _, shape, dtype, fortran, raw = state
        if not isinstance(dtype, _DType):
            raise UnsafePickle("refusing a numpy array without a plain integer dtype")
        if not isinstance(shape, tuple) or not all(type(n) is int and 0 <= n for n in shape):
            raise UnsafePickle(f"refusing a numpy array shape {shape!r}")
        if isinstance(raw, str):  # Python 2 wrote the bytes as str: latin1 gives them back
            raw = raw.encode("latin1")
        if not isinstance(raw, bytes):
            raise UnsafePickle(f"refusing numpy array data of type {type(raw).__name__}")
        want = math.prod(shape) * dtype.np.itemsize
        if want != len(raw):
            raise UnsafePickle(f"numpy array of shape {shape} {dtype.np} needs {want} bytes, the file gives {len(raw)}")
        _charge(self._budget, len(raw))
        self.array = np.frombuffer(raw, dtype.np).reshape(shape, order="F" if fortran else "C").copy()


def _charge(budget: list[int], n: int) -> None:
    budget[0] -= n
    if budget[0] < 0:
        raise UnsafePickle("the file builds more data than it holds (a pickle bomb?)")


class _Unpickler(pickle._Unpickler):  # the pure-Python unpickler: its memo is a dict
    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data), encoding="latin1")
        self.budget = [2 * len(data)]

    def find_class(self, module: str, name: str):
        if module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            if name == "_reconstruct":
                return self._reconstruct
            if name == "scalar":
                return self._scalar
        if (module, name) == ("numpy", "ndarray"):
            return _NdarrayName
        if (module, name) == ("numpy", "dtype"):
            return _DType
        if (module, name) == ("_codecs", "encode"):
            return self._encode
        raise UnsafePickle(f"refusing to load {module}.{name} (a CIFAR file holds only dicts, lists and arrays)")

    def _reconstruct(self, cls, shape, typecode):
        if cls is not _NdarrayName:
            raise UnsafePickle(f"refusing to reconstruct {getattr(cls, '__name__', cls)!r} (only numpy.ndarray)")
        return _Array(self.budget)

    def _scalar(self, dtype, raw):
        if not isinstance(dtype, _DType):
            raise UnsafePickle("refusing a numpy scalar without a plain integer dtype")
        raw = raw.encode("latin1") if isinstance(raw, str) else raw
        if not isinstance(raw, bytes) or len(raw) != dtype.np.itemsize:
            raise UnsafePickle(f"numpy scalar {dtype.np} needs {dtype.np.itemsize} bytes")
        return int(np.frombuffer(raw, dtype.np)[0])

    def _encode(self, text, encoding="utf-8", errors="strict"):
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
            raise UnsafePickle("refusing _codecs.encode other than (str, 'latin1')")
        _charge(self.budget, len(text))
        return text.encode("latin1")


def _finish(obj, depth: int = 0):
    """``obj`` with every array stand-in replaced by its array; refuses nesting deeper than ``MAX_DEPTH``."""
    if depth > MAX_DEPTH:
        raise UnsafePickle(f"nested deeper than {MAX_DEPTH} levels (a data file is a dict of lists)")
    if isinstance(obj, _Array):
        if obj.array is None:
            raise UnsafePickle("a numpy array without its data")
        return obj.array
    if isinstance(obj, _DType):
        return obj.np
    if isinstance(obj, dict):
        return {_finish(k, depth + 1): _finish(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finish(v, depth + 1) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_finish(v, depth + 1) for v in obj)
    return obj


def count_ops(data: bytes, limit: int = MAX_OPS) -> int:
    """The number of opcodes in ``data``, read without building anything; ``UnsafePickle`` past ``limit``."""
    n = 0
    for n, _ in enumerate(pickletools.genops(data), 1):
        if n > limit:
            raise UnsafePickle(f"more than {limit:,} pickle opcodes (a CIFAR file has about 200,000)")
    return n


def load_data_pickle(path: Path):
    """The object in ``path``, built as the module docstring says. Raises ``OSError`` when the file
    cannot be read, ``UnsafePickle`` for what it refuses, and ``pickle``'s own errors (or
    ``ValueError``) for damaged files."""
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise UnsafePickle(f"{size:,} bytes, more than a data pickle may have here ({MAX_BYTES:,})")
    data = path.read_bytes()
    count_ops(data)
    return _finish(_Unpickler(data).load())
