"""Read pickles of NumPy arrays and plain containers without running code from them.

Many packages ship their weights as ``pickle.dump({name: ndarray})`` (g2pM's ``np_ckpt.pkl``) and their vocabularies
as pickled dicts and lists. A plain ``pickle.load`` runs whatever the file names, so here the pickle is walked first
(no claimed length or memo index reaches an allocation), then run by an unpickler that resolves only the globals NumPy
arrays and containers need, each to a stand-in that records its arguments; every array is checked (dtype, shape,
byte count) and built at the end. What comes back: str, bytes, numbers, None, lists, tuples, dicts, sets and NumPy
arrays of booleans, numbers, text or (checked) objects. Anything else the pickle names is refused by name.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
from typing import Any, NamedTuple

import numpy as np

from ..errors import LoadError, UnsafeModelError
from ._torch_pickle import _MAX_NESTING, _SafeCall, _check_opcodes, _codecs_encode, _describe, iter_leaves

__all__ = ["Name", "Record", "arrays", "loads", "read_pickle"]

_MAX_FILE_BYTES = 4 << 30
_MAX_NDIM = 64
_MAX_VISITS = 1_000_000  # values walked when building the result; memo references can repeat a subtree
_KINDS = "biufc"  # booleans and numbers: what arrays() returns as weights
_DATA_KINDS = _KINDS + "US"  # also text; and "O" (objects) holding only values this reader made itself


class Name(NamedTuple):
    """An allowed global read as its qualified name: ``numpy.ndarray`` passed to ``_reconstruct``, or a function a
    pickled object refers to (an activation function, say)."""

    name: str


_NDARRAY = Name("numpy.ndarray")
_OBJECT = Name("builtins.object")


class Record:
    """An instance of an allowed class, as data: the class's qualified name (``kind``) and the state BUILD gave it
    (``state``, usually its ``__dict__``), built like every other value here. Nothing of the class is run."""

    __slots__ = ("state",)
    kind = ""

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _record_class(qualified: str) -> type:
    """The stand-in for class ``qualified``: NEWOBJ and copy_reg._reconstructor make empty Records of it."""
    return type(qualified.rsplit(".", 1)[-1], (Record,), {"__slots__": (), "kind": qualified})


def _reconstructor(cls: Any, base: Any, state: Any = None) -> Record:
    """Stand-in for ``copy_reg._reconstructor``, how protocol 0 and 1 pickles make instances of plain classes."""
    if not (isinstance(cls, type) and issubclass(cls, Record)) or base is not _OBJECT or state is not None:
        raise ValueError(f"copy_reg._reconstructor({_describe(cls)}, {_describe(base)}, ...): only allowed classes "
                         "built on object are read")
    return cls.__new__(cls)


class _DTypeState:
    """A ``numpy.dtype(spec, align, copy)`` call and the state BUILD gives it."""

    __slots__ = ("spec", "state")

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def resolve(self, where: str) -> np.dtype:
        """The dtype, if it is a boolean, number or object type; LoadError otherwise."""
        spec = self.spec
        if not isinstance(spec, str) or len(spec) > 8:
            raise LoadError(f"{where}: dtype spec {_describe(spec)} is not a type code")
        try:
            dtype = np.dtype(spec)
        except TypeError as exc:
            raise LoadError(f"{where}: dtype {_describe(spec)} is not a NumPy type code") from exc
        if dtype.kind not in _DATA_KINDS + "O" or dtype.names is not None or dtype.subdtype is not None:
            raise LoadError(f"{where}: dtype {spec!r} is not supported (booleans, numbers, text and objects only)")
        state = self.state
        if state is not None:
            # (version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata])
            if not (isinstance(state, tuple) and len(state) in (8, 9) and state[1] in ("<", ">", "|", "=")):
                raise LoadError(f"{where}: dtype {spec!r} has state {_describe(state)}")
            if any(part is not None for part in state[2:5]):
                raise LoadError(f"{where}: dtype {spec!r} is structured or a subarray; not supported")
            if dtype.kind != "O":
                dtype = dtype.newbyteorder(state[1])
        return dtype


class _ArrayState:
    """A ``numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')`` call and the state BUILD gives it."""

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _ArrayState:
    """Stand-in for ``numpy.core.multiarray._reconstruct``: only plain ndarrays, filled in by BUILD."""
    if cls is not _NDARRAY:
        raise ValueError(f"_reconstruct of {_describe(cls)}: only numpy.ndarray is read")
    return _ArrayState()


def _dtype(spec: Any, align: Any = False, copy: Any = False) -> _DTypeState:
    """Stand-in for ``numpy.dtype``."""
    return _DTypeState(spec)


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> _ArrayState:
    """Stand-in for ``numpy.core.numeric._frombuffer``, what protocol 5 pickles of arrays call."""
    array = _ArrayState()
    array.state = (1, shape, dtype, order == "F", buffer)
    return array


def _scalar(dtype: Any, data: Any = None) -> _ArrayState:
    """Stand-in for ``numpy.core.multiarray.scalar`` (a NumPy scalar such as ``np.float32(1)``): a 0-d array."""
    array = _ArrayState()
    array.state = (1, (), dtype, False, data)
    return array


def _empty_bytes() -> bytes:
    """Stand-in for ``bytes()``, how protocol-2 pickles spell b'' (other bytes come through ``_codecs.encode``)."""
    return b""


def _bytearray(data: Any = b"", encoding: Any = None) -> bytearray:
    """Stand-in for ``bytearray``: from bytes or latin-1 text only (``bytearray(10**12)`` would allocate)."""
    if isinstance(data, bytes) and encoding is None:
        return bytearray(data)
    if isinstance(data, str) and encoding in ("latin1", "latin-1"):
        return bytearray(data, "latin-1")
    raise TypeError("bytearray is allowed only from bytes or latin-1 text")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The allow-list: (module, name) -> safe stand-in."""
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): _NDARRAY,
        ("copy_reg", "_reconstructor"): _SafeCall("copy_reg._reconstructor", _reconstructor),
        ("copyreg", "_reconstructor"): _SafeCall("copy_reg._reconstructor", _reconstructor),
        ("numpy", "dtype"): _SafeCall("numpy.dtype", _dtype),
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("_codecs", "encode"): _SafeCall("_codecs.encode", _codecs_encode),
    }
    for core in ("numpy.core", "numpy._core"):  # NumPy 1 and NumPy 2 spellings
        allowed[f"{core}.multiarray", "_reconstruct"] = _SafeCall("numpy.core.multiarray._reconstruct", _reconstruct)
        allowed[f"{core}.multiarray", "scalar"] = _SafeCall("numpy.core.multiarray.scalar", _scalar)
        allowed[f"{core}.numeric", "_frombuffer"] = _SafeCall("numpy.core.numeric._frombuffer", _frombuffer)
    for builtins in ("builtins", "__builtin__"):  # protocol-2 pickles spell builtins the Python 2 way
        allowed[builtins, "set"] = set
        allowed[builtins, "frozenset"] = frozenset
        allowed[builtins, "bytearray"] = _SafeCall("bytearray", _bytearray)
        allowed[builtins, "bytes"] = _SafeCall("bytes", _empty_bytes)
        allowed[builtins, "object"] = _OBJECT
    return allowed


_ALLOWED = _allowed_globals()


class _Unpickler(pickle.Unpickler):
    """Resolves only the allow-listed globals; refuses every other one, and persistent ids, by name."""

    def __init__(self, data: bytes, where: str, allowed: dict) -> None:
        # Python 2 pickles hold binary data (array bytes) in str: latin-1 maps it back byte for byte.
        super().__init__(io.BytesIO(data), encoding="latin1")
        self._where = where
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        stand_in = self._allowed.get((module, name))
        if stand_in is None:
            raise UnsafeModelError(
                f"{self._where}: refusing pickle global '{module}.{name}': only NumPy arrays and plain containers "
                "are read, since other pickled objects run code when loaded"
            )
        return stand_in

    def persistent_load(self, pid: Any) -> Any:
        raise LoadError(f"{self._where}: the pickle refers to external object {_describe(pid)}; not supported")


def loads(data: bytes, where: str = "pickle", *, classes: tuple[str, ...] = (),
          functions: tuple[str, ...] = ()) -> Any:
    """The value of one pickle of NumPy arrays and plain containers; ``where`` names it in errors.

    ``classes`` (qualified names) may also appear, each instance read as a :class:`Record` of its state; ``functions``
    (qualified names) are read as :class:`Name`. A format reader that knows those classes maps the records.
    """
    allowed = dict(_ALLOWED)
    for qualified in classes:
        allowed[tuple(qualified.rsplit(".", 1))] = _record_class(qualified)
    for qualified in functions:
        allowed[tuple(qualified.rsplit(".", 1))] = Name(qualified)
    _check_opcodes(data, where, 0, "the pickle")
    try:
        value = _Unpickler(data, where, allowed).load()
    except LoadError:
        raise
    except Exception as exc:  # the pickle drives calls into the stand-ins: any failure means malformed data
        raise LoadError(f"{where}: malformed pickle: {type(exc).__name__}: {str(exc)[:200]}") from exc
    return _Builder(where).build(value, 0)


def read_pickle(path: str | os.PathLike, **allowed: Any) -> Any:
    """The value of a pickle file holding NumPy arrays and plain containers (dicts, lists, str, numbers);
    ``classes=`` and ``functions=`` as for :func:`loads`."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > _MAX_FILE_BYTES:
            raise LoadError(f"{path}: {size} bytes; pickles over {_MAX_FILE_BYTES} bytes are not read")
        data = f.read()
    return loads(data, path, **allowed)


def arrays(value: Any, where: str) -> dict[str, np.ndarray]:
    """The numeric arrays of nested dicts (a state_dict), keyed by dotted path; other values are dropped."""
    if not isinstance(value, dict):
        raise LoadError(f"{where}: holds {_describe(value)}, expected a dict of arrays (a state_dict)")
    out: dict[str, np.ndarray] = {}
    for key, array in iter_leaves(value, where, np.ndarray):
        if array.dtype.kind not in _KINDS:
            continue
        if key in out:
            raise LoadError(f"{where}: key '{key}' occurs twice after flattening nested dicts")
        out[key] = array
    if not out:
        raise LoadError(f"{where}: the pickle holds no numeric arrays")
    return out


class _Builder:
    """Turns the unpickled value into the result: stand-ins become checked arrays, containers are copied."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.done: dict[int, Any] = {}  # id of an unpickled object -> what it became (shared and cyclic refs)
        self.visits = 0

    def build(self, value: Any, depth: int) -> Any:
        if value is None or isinstance(value, (str, bytes, bool, int, float, complex)):
            return value
        key = id(value)
        if key in self.done:
            return self.done[key]
        self.visits += 1
        if self.visits > _MAX_VISITS or depth > _MAX_NESTING:
            raise LoadError(f"{self.where}: the pickle nests deeper than {_MAX_NESTING} levels or holds more than "
                            f"{_MAX_VISITS} values")
        if isinstance(value, _ArrayState):
            out = self.done[key] = self._array(value, depth)
            return out
        if isinstance(value, Name):
            return value
        if isinstance(value, Record):
            record = self.done[key] = type(value).__new__(type(value))
            record.state = self.build(getattr(value, "state", None), depth + 1)
            return record
        if isinstance(value, list):
            out = self.done[key] = []
            out.extend(self.build(v, depth + 1) for v in value)
            return out
        if isinstance(value, dict):
            out = self.done[key] = collections.OrderedDict() if isinstance(value, collections.OrderedDict) else {}
            for k, v in value.items():
                out[self._key(k, depth)] = self.build(v, depth + 1)
            return out
        if isinstance(value, (tuple, set, frozenset, bytearray)):
            items = [self._key(v, depth) if isinstance(value, (set, frozenset)) else self.build(v, depth + 1)
                     for v in value]
            out = self.done[key] = bytes(value) if isinstance(value, bytearray) else type(value)(items)
            return out
        raise LoadError(f"{self.where}: the pickle holds {_describe(value)}, which is not an array or container")

    def _key(self, key: Any, depth: int) -> Any:
        """A dict key or set member: anything hashable the builder makes (not arrays)."""
        built = self.build(key, depth + 1)
        if isinstance(built, np.ndarray) or (isinstance(built, tuple) and not _hashable(built)):
            raise LoadError(f"{self.where}: a dict key or set member is an array")
        return built

    def _array(self, value: _ArrayState, depth: int) -> np.ndarray:
        """The array a stand-in describes, after checking its dtype, shape and byte count."""
        where = self.where
        state = value.state
        if isinstance(state, tuple) and len(state) == 4:  # NumPy < 1.x wrote no version
            state = (1, *state)
        if not (isinstance(state, tuple) and len(state) == 5):
            raise LoadError(f"{where}: an array has state {_describe(state)}, "
                            "expected (version, shape, dtype, is_fortran, data)")
        _, shape, dtype_state, fortran, data = state
        if not isinstance(dtype_state, _DTypeState):
            raise LoadError(f"{where}: an array's dtype is {_describe(dtype_state)}")
        dtype = dtype_state.resolve(where)
        if not (isinstance(shape, tuple) and len(shape) <= _MAX_NDIM
                and all(type(n) is int and 0 <= n < 1 << 62 for n in shape)):
            raise LoadError(f"{where}: an array has shape {_describe(shape)}, expected a tuple of sizes")
        count = math.prod(shape)
        order = "F" if fortran is True else "C"
        if dtype.kind == "O":
            if not isinstance(data, list) or len(data) != count:
                raise LoadError(f"{where}: an object array of shape {shape} holds {_describe(data)}")
            out = np.empty(len(data), dtype=object)
            for i, item in enumerate(data):
                out[i] = self.build(item, depth + 1)
            return out.reshape(shape, order=order)
        if isinstance(data, str):  # Python 2 pickles read with the default encoding
            data = data.encode("latin1")
        if not isinstance(data, (bytes, bytearray)):
            raise LoadError(f"{where}: an array of dtype {dtype} has data {_describe(data)}, expected bytes")
        if len(data) != count * dtype.itemsize:
            raise LoadError(f"{where}: an array of shape {shape} and dtype {dtype} needs {count * dtype.itemsize} "
                            f"bytes, its data has {len(data)}")
        flat = np.frombuffer(data, dtype=dtype, count=count)
        return flat.reshape(shape, order=order).astype(dtype.newbyteorder("="), order="C")


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True
