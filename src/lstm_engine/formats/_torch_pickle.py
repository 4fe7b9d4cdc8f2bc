"""Read ``torch.save(state_dict)`` files into NumPy arrays without importing torch.

Two layouts exist. A zip archive (torch >= 1.6) holds ``<prefix>/data.pkl`` (a pickle that rebuilds tensors from
storages), ``<prefix>/byteorder`` and one raw record ``<prefix>/data/<key>`` per storage. A legacy stream (what
older torch wrote, and ``_use_new_zipfile_serialization=False`` still writes) is five pickles back to back — magic
number, protocol version 1001, system info, the object, the sorted list of storage keys — then, for each key in that
list, the storage's element count as an int64 and its raw bytes. The pickles are untrusted, so either layout is read
in three guarded steps:

1. its opcodes are walked without running them, so no length or memo index it claims reaches an allocation;
2. an unpickler runs it that resolves only the globals a state_dict needs, each to an immutable stand-in defined
   here (nothing from torch, nothing that runs code); tensors come out as plain records;
3. each tensor record is checked (offset, sizes, strides against its storage record; total output against a budget
   tied to the file size) before a view of the storage is taken and copied out.

What comes back: every tensor reachable through nested dicts, keyed by its dotted path (``"state_dict.lstm.weight"``
for ``{"state_dict": {...}}``), in pickle order. Other values (numbers, strings, lists, tuples, sets, ``_metadata``)
are dropped: callers only want weights, and a state_dict's non-tensor entries carry no weight data. Arrays are
C-contiguous copies in native byte order; float16 and bfloat16 come back as float32.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import pickletools
import struct
import zipfile
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np

from lstm_engine.errors import LoadError, UnsafeModelError

# A legacy (pre-1.6) torch.save stream opens with pickle protocol 2 and LONG1 of this 10-byte magic number.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_HEAD = b"\x80\x02\x8a\x0a" + _LEGACY_MAGIC.to_bytes(10, "little")
_LEGACY_PROTOCOL = 1001

# A state_dict pickle is ~100 bytes per tensor; this is far above any real one and keeps a hostile one cheap.
_MAX_PICKLE_BYTES = 256 << 20
_MAX_NESTING = 32
_MAX_ENTRIES = 250_000  # dict entries visited; a big checkpoint with optimizer state has a few 10**4
_MAX_KEY_CHARS = 4096
_MAX_NDIM = 64  # NumPy's limit
_MAX_INDEX = 1 << 62  # keeps every element or byte count inside int64 for NumPy
# Views may repeat a storage (shared storage, zero strides); bound the bytes they can expand to.
_OUTPUT_FACTOR = 4
_OUTPUT_SLACK = 64 << 20
# What zipfile raises on damaged archives; NotImplementedError covers features torch never writes (a newer zip
# version, patched data), ValueError and struct.error bad header fields.
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    NotImplementedError,
    EOFError,
    OSError,
    ValueError,
    struct.error,
)
_TENSOR_OVERHEAD = 256  # bytes charged per tensor on top of its data: array object, key, dict slot


class _DType(NamedTuple):
    """A torch dtype: its name, the NumPy code of its raw bytes (byte order added at read), the code returned."""

    name: str
    raw: str
    out: str


_DTYPES = {
    d.name: d
    for d in (
        _DType("float32", "f4", "f4"),
        _DType("float64", "f8", "f8"),
        _DType("float16", "f2", "f4"),
        _DType("bfloat16", "u2", "f4"),  # NumPy has no bfloat16: read the bits, widen to float32
        _DType("complex64", "c8", "c8"),
        _DType("complex128", "c16", "c16"),
        _DType("int64", "i8", "i8"),
        _DType("int32", "i4", "i4"),
        _DType("int16", "i2", "i2"),
        _DType("int8", "i1", "i1"),
        _DType("uint8", "u1", "u1"),
        _DType("uint16", "u2", "u2"),
        _DType("uint32", "u4", "u4"),
        _DType("uint64", "u8", "u8"),
        _DType("bool", "b1", "b1"),
    )
}
_DTYPE_ALIASES = {
    "float": "float32",
    "double": "float64",
    "half": "float16",
    "cfloat": "complex64",
    "cdouble": "complex128",
    "long": "int64",
    "int": "int32",
    "short": "int16",
}
# Legacy typed storages named in persistent ids of _rebuild_tensor_v2 tensors.
_STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}
# torch dtypes that are data, not code, but that NumPy cannot hold: refused as unsupported rather than unsafe.
_UNSUPPORTED_DTYPES = frozenset(
    {
        "float8_e5m2",
        "float8_e4m3fn",
        "float8_e5m2fnuz",
        "float8_e4m3fnuz",
        "float8_e8m0fnu",
        "float4_e2m1fn_x2",
        "complex32",
        "chalf",
        "qint8",
        "quint8",
        "qint32",
        "quint4x2",
        "quint2x4",
        "bits8",
        "bits16",
        "bits1x8",
        "bits2x4",
        "bits4x2",
    }
)


# Every object the unpickler can hand out is a NamedTuple: no __dict__, no __setstate__ and read-only fields, so a
# BUILD opcode in a hostile pickle cannot alter these module-level stand-ins for later loads.
class _StorageType(NamedTuple):
    """What ``torch.FloatStorage`` and friends resolve to: only their element dtype matters."""

    dtype: _DType


class _StorageRef(NamedTuple):
    """``numel`` elements of ``dtype`` from element ``start`` of storage record ``key`` (``start`` > 0 only for the
    views a legacy file declares in its persistent ids)."""

    key: str
    dtype: _DType
    numel: int
    start: int = 0


class _TensorRef(NamedTuple):
    """An unchecked ``_rebuild_tensor_v2/v3`` call; ``dtype`` is None when it comes from the storage (v2)."""

    storage: Any
    offset: Any
    size: Any
    stride: Any
    dtype: Any


class _SafeCall(NamedTuple):
    """An allowed callable global: the pickle can call it, never reach or modify the function behind it."""

    name: str
    fn: Callable[..., Any]

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


def _rebuild_tensor(storage, offset, size, stride) -> _TensorRef:
    """Stand-in for ``torch._utils._rebuild_tensor``, which legacy files from torch < 0.4 call."""
    return _TensorRef(storage, offset, size, stride, None)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None) -> _TensorRef:
    """Stand-in for ``torch._utils._rebuild_tensor_v2``: records the view, checked later under its key."""
    return _TensorRef(storage, offset, size, stride, None)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None) -> _TensorRef:
    """Stand-in for ``torch._utils._rebuild_tensor_v3`` (UntypedStorage, numel in bytes, explicit dtype)."""
    return _TensorRef(storage, offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad, hooks) -> Any:
    """Stand-in for ``torch._utils._rebuild_parameter``: a Parameter is just its data here."""
    return data


def _torch_size(dims=()) -> tuple:
    """Stand-in for ``torch.Size``."""
    return tuple(dims)


def _codecs_encode(text, encoding="latin1") -> bytes:
    """Stand-in for ``_codecs.encode``, which protocol-2 pickles use to spell bytes: latin-1 text only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise TypeError("_codecs.encode is allowed only as encode(str, 'latin1')")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The allow-list: (module, name) -> safe stand-in."""
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor"): _SafeCall("torch._utils._rebuild_tensor", _rebuild_tensor),
        ("torch._utils", "_rebuild_tensor_v2"): _SafeCall("torch._utils._rebuild_tensor_v2", _rebuild_tensor_v2),
        ("torch._utils", "_rebuild_tensor_v3"): _SafeCall("torch._utils._rebuild_tensor_v3", _rebuild_tensor_v3),
        ("torch._utils", "_rebuild_parameter"): _SafeCall("torch._utils._rebuild_parameter", _rebuild_parameter),
        ("torch", "Size"): _SafeCall("torch.Size", _torch_size),
        ("builtins", "set"): set,
        ("__builtin__", "set"): set,  # protocol-2 pickles spell builtins the Python 2 way
        ("_codecs", "encode"): _SafeCall("_codecs.encode", _codecs_encode),
        ("torch", "UntypedStorage"): _StorageType(_DTYPES["uint8"]),
        ("torch.storage", "UntypedStorage"): _StorageType(_DTYPES["uint8"]),
    }
    for name, dtype in _STORAGE_DTYPES.items():
        allowed["torch", name] = _StorageType(_DTYPES[dtype])
    for name, dtype in {**{n: n for n in _DTYPES}, **_DTYPE_ALIASES}.items():
        allowed["torch", name] = _DTYPES[dtype]
    return allowed


_ALLOWED = _allowed_globals()


def _describe(value: Any) -> str:
    """A short, always-printable description of an untrusted value for error messages."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value) if abs(value) < 10**30 else f"an integer of {value.bit_length()} bits"
    if isinstance(value, str):
        return repr(value[:60] + "..." if len(value) > 60 else value)
    return f"a {type(value).__name__}"


def _refusal(module: str, name: str, path: str) -> LoadError:
    """The error for a global that is not on the allow-list."""
    qualified = f"{module}.{name}"
    if module == "torch" and name in _UNSUPPORTED_DTYPES:
        return LoadError(f"{path}: dtype torch.{name} is not supported (NumPy cannot hold it)")
    if module.startswith("__torch__"):
        return UnsafeModelError(
            f"{path}: refusing pickle global '{qualified}': this is a TorchScript archive (torch.jit.save); "
            "save model.state_dict() with torch.save instead"
        )
    if module.startswith("torch.nn.") or module == "__main__":
        return UnsafeModelError(
            f"{path}: refusing pickle global '{qualified}': the file holds a whole pickled model "
            "(torch.save(model)); save model.state_dict() instead"
        )
    return UnsafeModelError(
        f"{path}: refusing pickle global '{qualified}': it is not one of the globals a state_dict needs, "
        "and loading it could run code"
    )


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals and maps persistent ids to storage records.

    ``legacy`` selects the persistent ids of legacy files, ``('storage', type, root_key, location, numel,
    view_metadata)``; every root storage they declare is kept in ``roots`` for the data section that follows.
    """

    def __init__(self, data: bytes, path: str, legacy: bool = False) -> None:
        super().__init__(io.BytesIO(data))
        self._path = path
        self._legacy = legacy
        self.roots: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        """Return the stand-in for an allowed global; refuse every other one by name."""
        stand_in = _ALLOWED.get((module, name))
        if stand_in is None:
            raise _refusal(module, name, self._path)
        return stand_in

    def persistent_load(self, pid: Any) -> _StorageRef:
        """Map a storage's persistent id to a reference to its record."""
        where = "the pickle" if self._legacy else "data.pkl"
        if isinstance(pid, tuple) and pid and pid[0] in ("module", b"module"):
            raise UnsafeModelError(
                f"{self._path}: {where} holds a whole pickled module (torch.save(model)) with its source code; "
                "save model.state_dict() instead"
            )
        fields = 6 if self._legacy else 5
        if not (isinstance(pid, tuple) and len(pid) == fields and pid[0] in ("storage", b"storage")):
            shape = "key, location, numel, view_metadata" if self._legacy else "key, location, numel"
            raise LoadError(
                f"{self._path}: {where} has persistent id {_describe(pid)}, expected ('storage', storage_type, {shape})"
            )
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if isinstance(key, bytes):  # Python 2 pickles spell str as bytes
            key = key.decode("ascii", "replace")
        if not isinstance(storage_type, _StorageType):
            raise LoadError(f"{self._path}: storage persistent id names {_describe(storage_type)}, not a storage type")
        if not isinstance(key, str) or not key or "/" in key or len(key) > 256:
            raise LoadError(f"{self._path}: storage key {_describe(key)} is not a record name")
        if type(numel) is not int or not 0 <= numel <= _MAX_INDEX:
            raise LoadError(f"{self._path}: storage '{key}' claims {_describe(numel)} elements")
        root = _StorageRef(key, storage_type.dtype, numel)
        if not self._legacy:
            return root
        if self.roots.setdefault(key, root) != root:
            raise LoadError(f"{self._path}: storage '{key}' is declared twice with different types or sizes")
        view = pid[5]
        if view is None:
            return root
        if not (isinstance(view, tuple) and len(view) == 3):
            raise LoadError(
                f"{self._path}: storage '{key}' has view metadata {_describe(view)}, expected (view_key, offset, size)"
            )
        _, offset, size = view
        if type(offset) is not int or type(size) is not int or not 0 <= offset <= offset + size <= numel:
            raise LoadError(
                f"{self._path}: storage '{key}' has a view of {_describe(size)} elements at {_describe(offset)}, "
                f"outside its {numel} elements"
            )
        return _StorageRef(key, storage_type.dtype, size, offset)


class _Budget:
    """Output accounting: views may repeat a storage, so the bytes a file expands to are bounded by its size."""

    def __init__(self, path: str, file_size: int) -> None:
        self.path = path
        self.file_size = file_size
        self._budget = _OUTPUT_FACTOR * file_size + _OUTPUT_SLACK

    def spend(self, nbytes: int, key: str) -> None:
        """Charge ``nbytes`` of output to the budget, refusing files whose tensors expand without bound."""
        if nbytes > self._budget:
            limit = _OUTPUT_FACTOR * self.file_size + _OUTPUT_SLACK
            raise LoadError(
                f"{self.path}: tensor '{key}': the tensors would take more than {limit} bytes from a "
                f"{self.file_size}-byte file (storages repeated by views or zero strides, or dicts shared by memo)"
            )
        self._budget -= nbytes


class _Archive(_Budget):
    """A torch zip opened for reading: record lookup with size checks, storage cache, output budget."""

    def __init__(self, zf: zipfile.ZipFile, path: str, file_size: int) -> None:
        super().__init__(path, file_size)
        self.zf = zf
        self.prefix = self._find_prefix()
        self.byteorder = self._read_byteorder()
        self._storages: dict[str, bytes] = {}

    def _find_prefix(self) -> str:
        """The folder holding data.pkl, with its trailing slash."""
        names = [n for n in self.zf.namelist() if n.endswith("/data.pkl")]
        if len(names) != 1:
            found = "no" if not names else f"{len(names)}"
            raise LoadError(f"{self.path}: expected one '<prefix>/data.pkl' record in the zip, found {found}")
        return names[0][: -len("data.pkl")]

    def _read_byteorder(self) -> str:
        """'little' or 'big'; torch wrote no byteorder record before 1.9 and then always little-endian."""
        name = self.prefix + "byteorder"
        if name not in self.zf.NameToInfo:
            return "little"
        value = self.read(name, limit=16).strip()
        if value not in (b"little", b"big"):
            raise LoadError(f"{self.path}: record '{name}' holds {value[:16]!r}, expected b'little' or b'big'")
        return value.decode()

    def info(self, name: str, what: str) -> zipfile.ZipInfo:
        """The zip entry ``name``, checked to be a stored record lying inside the file."""
        try:
            info = self.zf.getinfo(name)
        except KeyError:
            raise LoadError(f"{self.path}: {what}: record '{name}' is missing from the zip") from None
        if info.flag_bits & 0x1:
            raise LoadError(f"{self.path}: {what}: record '{name}' is encrypted")
        # torch.save stores records uncompressed; refusing compression also rules out zip bombs.
        if info.compress_type != zipfile.ZIP_STORED:
            raise LoadError(f"{self.path}: {what}: record '{name}' is compressed; torch.save writes stored records")
        if info.file_size != info.compress_size or info.header_offset + info.compress_size > self.file_size:
            raise LoadError(
                f"{self.path}: {what}: record '{name}' claims {info.file_size} bytes, "
                f"more than the {self.file_size}-byte file can hold"
            )
        return info

    def read(self, name: str, limit: int, what: str | None = None) -> bytes:
        """The bytes of record ``name`` (CRC-checked), refusing records over ``limit`` bytes before reading."""
        what = what or f"record '{name}'"
        info = self.info(name, what)
        if info.file_size > limit:
            raise LoadError(f"{self.path}: {what}: record '{name}' holds {info.file_size} bytes, limit {limit}")
        try:
            return self.zf.read(info)
        except _ZIP_ERRORS as exc:
            raise LoadError(f"{self.path}: {what}: record '{name}' is corrupt: {exc}") from exc

    def storage_bytes(self, storage: _StorageRef, key: str) -> bytes:
        """A storage record holding at least ``numel`` elements, read once and shared by every view of it."""
        name = f"{self.prefix}data/{storage.key}"
        what = f"tensor '{key}'"
        nbytes = storage.numel * np.dtype(storage.dtype.raw).itemsize
        info = self.info(name, what)
        if info.file_size < nbytes:
            raise LoadError(
                f"{self.path}: {what}: storage record '{name}' holds {info.file_size} bytes, "
                f"its persistent id claims {storage.numel} {storage.dtype.name} elements ({nbytes} bytes)"
            )
        if name not in self._storages:
            self._storages[name] = self.read(name, limit=info.file_size, what=what)
        return self._storages[name]


def read_torch_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read the tensors of a ``torch.save`` file, zip archive or legacy stream: {dotted key: C-contiguous array},
    fp16/bf16 as float32."""
    path_str = os.fspath(path)
    # Opening errors (missing file, no permission) are the caller's to see unchanged.
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        head = f.read(len(_LEGACY_HEAD))
        f.seek(0)
        if head == _LEGACY_HEAD:
            try:
                return _read_legacy(f.read(), path_str, file_size)
            except LoadError:
                raise
            except (RecursionError, MemoryError) as exc:
                raise LoadError(f"{path_str}: cannot read legacy torch file: {type(exc).__name__}") from exc
        try:
            zf = zipfile.ZipFile(f)
        except _ZIP_ERRORS as exc:
            raise _not_a_zip(path_str, head, exc) from exc
        with zf:
            try:
                archive = _Archive(zf, path_str, file_size)
                top = _unpickle(archive.read(archive.prefix + "data.pkl", _MAX_PICKLE_BYTES), path_str)[0]
                return _read_tensors(archive, top)
            except LoadError:
                raise
            except (RecursionError, MemoryError, *_ZIP_ERRORS) as exc:
                raise LoadError(f"{path_str}: cannot read torch zip: {type(exc).__name__}: {exc}") from exc


def _not_a_zip(path: str, head: bytes, exc: BaseException) -> LoadError:
    """The error for a file that is neither a legacy torch file nor a readable zip, telling cut archives apart."""
    if head.startswith(b"PK"):
        return LoadError(f"{path}: truncated or corrupt zip archive: {exc}")
    return LoadError(f"{path}: not a torch.save file (neither a zip archive nor a legacy torch.save stream)")


class _LegacyStorages(_Budget):
    """The data section of a legacy file: each storage's bytes found at its offset, output budget."""

    byteorder = "little"

    def __init__(self, data: bytes, path: str, file_size: int, offsets: dict[str, int]) -> None:
        super().__init__(path, file_size)
        self._data = memoryview(data)
        self._offsets = offsets

    def storage_bytes(self, storage: _StorageRef, key: str) -> memoryview:
        """The ``numel`` elements of ``storage`` (a whole storage or a view into one), without a copy."""
        size = np.dtype(storage.dtype.raw).itemsize
        begin = self._offsets[storage.key] + storage.start * size
        return self._data[begin:begin + storage.numel * size]


def _read_legacy(data: bytes, path: str, file_size: int) -> dict[str, np.ndarray]:
    """Read a legacy (non-zip) torch.save stream: five pickles, then each storage as int64 numel + raw bytes."""
    protocol, at = _unpickle(data, path, _unpickle(data, path, 0, what="the magic number")[1], what="the protocol")[:2]
    if protocol != _LEGACY_PROTOCOL:
        raise LoadError(f"{path}: legacy torch.save protocol version {_describe(protocol)}, "
                        f"expected {_LEGACY_PROTOCOL}")
    info, at = _unpickle(data, path, at, what="the system info")[:2]
    little = info.get("little_endian") if isinstance(info, dict) else None
    if little is not True:
        # torch < 1.x wrote storages in the writing machine's byte order and marked it here.
        raise LoadError(f"{path}: legacy torch.save file from a big-endian machine (little_endian={little!r}); "
                        "only little-endian files are supported")
    top, at, roots = _unpickle(data, path, at, legacy=True, what="the pickle")
    keys, at = _unpickle(data, path, at, what="the storage key list")[:2]
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise LoadError(f"{path}: the storage key list is {_describe(keys)}, expected a list of str")
    offsets: dict[str, int] = {}
    for key in keys:
        root = roots.get(key)
        if root is None or key in offsets:
            why = "twice" if key in offsets else "a storage no tensor uses"
            raise LoadError(f"{path}: the storage key list names {_describe(key)}, {why}")
        numel = int.from_bytes(data[at:at + 8], "little", signed=True)
        nbytes = root.numel * np.dtype(root.dtype.raw).itemsize
        if len(data) < at + 8 + nbytes or numel != root.numel:
            raise LoadError(f"{path}: storage '{key}' should hold {root.numel} {root.dtype.name} elements at "
                            f"byte {at}; the file has {_describe(numel)} elements there, in {len(data) - at} bytes")
        offsets[key] = at + 8
        at += 8 + nbytes
    missing = [k for k in roots if k not in offsets]
    if missing:
        raise LoadError(f"{path}: storage '{missing[0]}' is used by a tensor but missing from the storage key list")
    return _read_tensors(_LegacyStorages(data, path, file_size, offsets), top)


def _unpickle(data: bytes, path: str, start: int = 0, *, legacy: bool = False,
              what: str = "data.pkl") -> tuple[Any, int, dict[str, _StorageRef]]:
    """Run the pickle at ``data[start:]`` through the safe unpickler after checking its opcodes are well-formed.

    Returns the value, the offset just past the pickle, and the root storages a legacy pickle declared.
    """
    end = _check_opcodes(data, path, start, what)
    if end - start > _MAX_PICKLE_BYTES:
        raise LoadError(f"{path}: {what} takes {end - start} bytes, limit {_MAX_PICKLE_BYTES}")
    unpickler = _SafeUnpickler(data[start:end], path, legacy)
    try:
        return unpickler.load(), end, unpickler.roots
    except LoadError:
        raise
    except Exception as exc:  # the pickle drives calls into the stand-ins: any failure means malformed data
        message = str(exc)[:200]
        raise LoadError(f"{path}: malformed {what}: {type(exc).__name__}: {message}") from exc


def _genops(stream: io.BytesIO) -> Iterator[tuple[Any, Any, int]]:
    """``pickletools.genops``, except that protocol-0 STRING arguments stay undecoded bytes: Python 2 pickles keep
    binary data there (NumPy arrays), which genops fails to decode as ASCII."""
    while True:
        position = stream.tell()
        code = stream.read(1)
        opcode = pickletools.code2op.get(code.decode("latin-1"))
        if opcode is None:
            raise ValueError(f"unknown opcode {code!r} at byte {position}" if code else "pickle exhausted before STOP")
        if opcode.arg is None:
            arg = None
        elif opcode.arg is pickletools.stringnl:
            arg = stream.readline()
            if not arg.endswith(b"\n"):
                raise ValueError(f"no newline after the STRING argument at byte {position}")
        else:
            arg = opcode.arg.reader(stream)
        yield opcode, arg, position
        if opcode.name == "STOP":
            return


def _check_opcodes(data: bytes, path: str, start: int, what: str) -> int:
    """Walk the pickle's opcodes without running them, refusing what would make the C unpickler over-allocate.

    Returns the offset just past its STOP opcode.
    """
    # The C unpickler allocates some claimed lengths (BINBYTES8) before reading them, and grows its memo table to
    # twice any PUT index it meets (a 9-byte pickle can ask for gigabytes). The pure-Python walk reads each argument
    # from the buffer, so a length the data does not hold fails here; memo indices must come in sequence, as every
    # pickler writes them.
    # (Python 2's pickler numbered its memo from 1, hence one entry of slack.)
    memo_len = 0
    stream = io.BytesIO(data)
    stream.seek(start)
    try:
        for opcode, arg, position in _genops(stream):
            if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                if arg > memo_len + 1:
                    raise LoadError(
                        f"{path}: {what} stores memo entry {arg} at byte {position} after only {memo_len} entries"
                    )
                memo_len += 1
            elif opcode.name == "MEMOIZE":
                memo_len += 1
    except LoadError:
        raise
    except (ValueError, EOFError, OverflowError, MemoryError, struct.error) as exc:
        raise LoadError(f"{path}: {what} is not a valid pickle: {exc}") from exc
    return stream.tell()


def _read_tensors(archive: _Archive, top: Any) -> dict[str, np.ndarray]:
    """Check and copy out every tensor of the unpickled state_dict ``top``, keyed by dotted path."""
    if not isinstance(top, dict):
        what = "a single tensor" if isinstance(top, _TensorRef) else _describe(top)
        raise LoadError(f"{archive.path}: data.pkl holds {what}, expected a dict of tensors (a state_dict)")
    arrays: dict[str, np.ndarray] = {}
    for key, ref in iter_leaves(top, archive.path, _TensorRef):
        if key in arrays:
            raise LoadError(f"{archive.path}: tensor key '{key}' occurs twice after flattening nested dicts")
        arrays[key] = _materialize(archive, key, ref)
    if not arrays:
        raise LoadError(f"{archive.path}: the state_dict holds no tensors")
    return arrays


def iter_leaves(top: dict, path: str, leaf: type) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) for every value of type ``leaf`` (a tensor record) in nested dicts, in pickle order."""
    # Memo references let one pickled dict appear under many keys, so a walk can fan out exponentially with depth:
    # bound the entries visited, not just the depth.
    stack = [("", iter(top.items()))]
    visited = 0
    while stack:
        prefix, items = stack[-1]
        entry = next(items, None)
        if entry is None:
            stack.pop()
            continue
        visited += 1
        if visited > _MAX_ENTRIES:
            raise LoadError(f"{path}: the state_dict's nested dicts hold more than {_MAX_ENTRIES} entries")
        raw_key, value = entry
        if not isinstance(value, (leaf, dict)):
            continue
        if isinstance(raw_key, str):
            key = prefix + raw_key
        elif isinstance(raw_key, int) and abs(raw_key) < 10**18:  # optimizer states are keyed by param index
            key = prefix + str(raw_key)
        else:
            raise LoadError(f"{path}: a tensor or dict under {_describe(prefix)} has key {_describe(raw_key)}")
        if len(key) > _MAX_KEY_CHARS:
            raise LoadError(f"{path}: tensor key {_describe(key)} is longer than {_MAX_KEY_CHARS} characters")
        if isinstance(value, leaf):
            yield key, value
        elif len(stack) > _MAX_NESTING:
            raise LoadError(f"{path}: dicts nested deeper than {_MAX_NESTING} levels under {_describe(key)}")
        else:
            stack.append((key + ".", iter(value.items())))


def _index_tuple(value: Any, what: str, prefix: str) -> tuple[int, ...]:
    """``value`` as a tuple of ints in [0, 2**62], or a LoadError naming ``what``."""
    if not isinstance(value, (tuple, list)) or len(value) > _MAX_NDIM:
        raise LoadError(f"{prefix}: {what} is {_describe(value)}, expected a tuple of at most {_MAX_NDIM} ints")
    for item in value:
        if type(item) is not int or not 0 <= item <= _MAX_INDEX:
            raise LoadError(f"{prefix}: {what} {_describe_tuple(value)} has entry {_describe(item)}")
    return tuple(value)


def _describe_tuple(value: tuple | list) -> str:
    """A printable form of an untrusted size/stride tuple."""
    return "(" + ", ".join(_describe(v) for v in value) + ")"


def _materialize(archive: _Archive, key: str, ref: _TensorRef) -> np.ndarray:
    """Copy one tensor out of its storage after checking the view lies inside it; shape ``size``."""
    where = f"{archive.path}: tensor '{key}'"
    storage = ref.storage
    if not isinstance(storage, _StorageRef):
        raise LoadError(f"{where}: storage is {_describe(storage)}, not a storage record")
    dtype = storage.dtype if ref.dtype is None else ref.dtype
    if not isinstance(dtype, _DType):
        raise LoadError(f"{where}: dtype is {_describe(dtype)}, not a torch dtype")
    if type(ref.offset) is not int or not 0 <= ref.offset <= _MAX_INDEX:
        raise LoadError(f"{where}: storage offset {_describe(ref.offset)} is not a non-negative int")
    size = _index_tuple(ref.size, "size", where)
    stride = _index_tuple(ref.stride, "stride", where)
    if len(size) != len(stride):
        raise LoadError(f"{where}: size {size} and stride {stride} have different lengths")

    # NumPy refuses shapes whose non-zero dims overflow even when another dim is 0.
    if math.prod(n for n in size if n) * np.dtype(dtype.out).itemsize > _MAX_INDEX:
        raise LoadError(f"{where}: size {size} is too large for any array")
    count = math.prod(size)
    archive.spend(count * np.dtype(dtype.out).itemsize + _TENSOR_OVERHEAD + len(key), key)
    if count == 0:
        return np.zeros(size, dtype=dtype.out)
    itemsize = np.dtype(dtype.raw).itemsize
    # For v3 the storage is untyped (numel in bytes); either way count whole elements of the tensor's dtype.
    available = storage.numel * np.dtype(storage.dtype.raw).itemsize // itemsize
    needed = ref.offset + 1 + sum((n - 1) * s for n, s in zip(size, stride))
    if needed > available:
        raise LoadError(
            f"{where}: storage '{storage.key}' holds {available} {dtype.name} elements, "
            f"view (offset {ref.offset}, size {size}, stride {stride}) needs {needed}"
        )
    raw = np.dtype(dtype.raw).newbyteorder("<" if archive.byteorder == "little" else ">")
    flat = np.frombuffer(archive.storage_bytes(storage, key), dtype=raw, count=available)
    view = np.lib.stride_tricks.as_strided(
        flat[ref.offset :], shape=size, strides=[s * itemsize for s in stride], writeable=False
    )
    if dtype.name == "bfloat16":
        # bfloat16 is the top half of a float32: shift the bits up and reinterpret.
        return (view.astype(np.uint32, order="C") << 16).view(np.float32)
    return view.astype(dtype.out, order="C")
