"""Read and write safetensors files with NumPy alone, validating the whole header before any tensor is allocated.

Layout: an 8-byte little-endian header length N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets":
[begin, end)}, "__metadata__": {str: str}}``, then the data buffer that the offsets index. Tensors are row-major and
little-endian.

Reading checks, before allocating: N is at most 100 MB and fits in the file, the JSON is an object without duplicate
names, every dtype is known, every shape is a list of non-negative ints whose element count times the item size
equals ``end - begin``, every range lies in the data buffer, and no two ranges overlap. Gaps between ranges are
allowed (they waste bytes, they do not alias data). The file is then read once, each tensor straight into its array.
F16 and BF16 come back as float32, BOOL as bool, everything in native byte order.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from contextlib import nullcontext
from typing import IO, Any, BinaryIO

import numpy as np

from lstm_engine.errors import LoadError

_MAX_HEADER_BYTES = 100_000_000
_MAX_NDIM = 64  # NumPy's limit
_MAX_ELEMENTS = 1 << 59  # keeps elements x item size inside int64 for NumPy

# safetensors dtype -> NumPy code of its little-endian bytes.
_READ_DTYPES = {
    "BOOL": "u1",  # read as bytes, then compared with 0, so a byte other than 0/1 still gives a valid bool
    "U8": "u1",
    "I8": "i1",
    "U16": "<u2",
    "I16": "<i2",
    "U32": "<u4",
    "I32": "<i4",
    "U64": "<u8",
    "I64": "<i8",
    "F16": "<f2",
    "BF16": "<u2",  # NumPy has no bfloat16: read the bits, widen to float32
    "F32": "<f4",
    "F64": "<f8",
}
# Defined by the format but without a NumPy dtype: refused as unsupported rather than unknown.
_UNSUPPORTED_DTYPES = frozenset({"F8_E4M3", "F8_E5M2", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4", "C64"})
# NumPy dtype -> safetensors dtype, for writing (byte order normalised to little-endian first).
_WRITE_DTYPES = {
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.uint8): "U8",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint16): "U16",
    np.dtype(np.int16): "I16",
    np.dtype(np.uint32): "U32",
    np.dtype(np.int32): "I32",
    np.dtype(np.uint64): "U64",
    np.dtype(np.int64): "I64",
    np.dtype(np.float16): "F16",
    np.dtype(np.float32): "F32",
    np.dtype(np.float64): "F64",
}


def read_safetensors(path: str | os.PathLike | BinaryIO) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a safetensors file: ({name: C-contiguous array}, metadata); F16/BF16 as float32.

    ``path`` may also be a seekable binary file object (e.g. ``io.BytesIO``), read from its start.
    """
    path_str = os.fspath(path) if not hasattr(path, "read") else getattr(path, "name", "<bytes>")
    # Opening errors (missing file, no permission) are the caller's to see unchanged.
    with _opened(path, "rb") as f:
        header, data_start, file_size = _read_header(f, path_str)
        entries, metadata = _validate(header, file_size - data_start, path_str)

        tensors: dict[str, np.ndarray] = {}
        for name, (dtype, shape, begin, end) in entries.items():
            raw = np.empty(math.prod(shape), dtype=_READ_DTYPES[dtype])
            f.seek(data_start + begin)
            if end > begin and f.readinto(raw.view(np.uint8)) != end - begin:
                raise LoadError(f"{path_str}: tensor '{name}': file ended inside its data (changed while reading?)")
            tensors[name] = _decode(raw, dtype).reshape(shape)
    return tensors, metadata


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, reading and checking the header only (no tensor data)."""
    path_str = os.fspath(path)
    with open(path_str, "rb") as f:
        header, data_start, file_size = _read_header(f, path_str)
    return _validate(header, file_size - data_start, path_str)[1]


def _read_header(f: IO[bytes], path: str) -> tuple[dict[str, Any], int, int]:
    """The header JSON object of an open file, where its data starts, and the file's size."""
    file_size = f.seek(0, os.SEEK_END)
    f.seek(0)
    if file_size < 8:
        raise LoadError(f"{path}: {file_size}-byte file is too short for the 8-byte header length")
    header_len = int.from_bytes(f.read(8), "little")
    if header_len > _MAX_HEADER_BYTES or 8 + header_len > file_size:
        raise LoadError(
            f"{path}: header length {header_len} is over the {_MAX_HEADER_BYTES}-byte limit "
            f"or the {file_size}-byte file"
        )
    return _parse_header(f.read(header_len), path), 8 + header_len, file_size


def _opened(path: str | os.PathLike | BinaryIO, mode: str) -> IO[bytes]:
    """A context giving the file: opened (and closed) here for a name, as given (left open) for a file object."""
    return nullcontext(path) if hasattr(path, "read" if "r" in mode else "write") else open(path, mode)


def _parse_header(raw: bytes, path: str) -> dict[str, Any]:
    """The header JSON object, refusing duplicate names (JSON would silently keep the last)."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise LoadError(f"{path}: header names {_short(key)} twice")
            result[key] = value
        return result

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except LoadError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError covers JSONDecodeError
        raise LoadError(f"{path}: header is not valid UTF-8 JSON: {str(exc)[:200]}") from exc
    if not isinstance(header, dict):
        raise LoadError(f"{path}: header is a JSON {type(header).__name__}, expected an object")
    return header


def _validate(
    header: dict[str, Any], buffer_len: int, path: str
) -> tuple[dict[str, tuple[str, tuple[int, ...], int, int]], dict[str, str]]:
    """Check every entry against the data buffer: ({name: (dtype, shape, begin, end)}, metadata)."""
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise LoadError(f"{path}: __metadata__ must map strings to strings")

    entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor '{name}'"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise LoadError(f"{where}: entry must be an object with dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if isinstance(dtype, str) and dtype in _UNSUPPORTED_DTYPES:
            raise LoadError(f"{where}: dtype {dtype} is not supported (NumPy cannot hold it)")
        if not isinstance(dtype, str) or dtype not in _READ_DTYPES:
            raise LoadError(f"{where}: unknown dtype {_short(dtype)}")
        if not _is_int_list(shape) or len(shape) > _MAX_NDIM or any(n < 0 for n in shape):
            raise LoadError(f"{where}: shape {_short(shape)} is not a list of at most {_MAX_NDIM} non-negative ints")
        if not _is_int_list(offsets) or len(offsets) != 2:
            raise LoadError(f"{where}: data_offsets {_short(offsets)} is not a [begin, end] pair of ints")
        # NumPy refuses shapes whose non-zero dims overflow even when another dim is 0.
        if math.prod(n for n in shape if n) > _MAX_ELEMENTS:
            raise LoadError(f"{where}: shape {_short(shape)} is too large for any array")
        begin, end = offsets
        if not 0 <= begin <= end <= buffer_len:
            raise LoadError(
                f"{where}: data_offsets [{_short(begin)}, {_short(end)}) lie outside the {buffer_len}-byte data buffer"
            )
        # Python ints do not overflow, and end - begin is bounded by the file, so a huge shape fails here.
        nbytes = math.prod(shape) * np.dtype(_READ_DTYPES[dtype]).itemsize
        if nbytes != end - begin:
            raise LoadError(
                f"{where}: shape {_short(shape)} of {dtype} needs {_short(nbytes)} bytes, "
                f"data_offsets [{begin}, {end}) hold {end - begin}"
            )
        entries[name] = (dtype, tuple(shape), begin, end)

    by_offset = sorted((e[2], e[3], name) for name, e in entries.items() if e[3] > e[2])
    for (begin_a, end_a, name_a), (begin_b, end_b, name_b) in itertools.pairwise(by_offset):
        if begin_b < end_a:
            raise LoadError(
                f"{path}: tensors '{name_a}' [{begin_a}, {end_a}) and '{name_b}' [{begin_b}, {end_b}) overlap"
            )
    return entries, dict(metadata)


def _is_int_list(value: Any) -> bool:
    """True for a JSON list of integers (JSON booleans excluded)."""
    return isinstance(value, list) and all(type(v) is int for v in value)


def _short(value: Any) -> str:
    """A short printable form of an untrusted JSON value."""
    if isinstance(value, int) and abs(value) >= 10**30:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value) if not isinstance(value, list) else "[" + ", ".join(_short(v) for v in value[:8]) + "]"
    return text if len(text) <= 80 else text[:77] + "..."


def _decode(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Turn raw little-endian elements into the array returned for ``dtype``; shape (n,)."""
    if dtype == "BOOL":
        return raw != 0
    if dtype == "F16":
        return raw.astype(np.float32)
    if dtype == "BF16":
        # bfloat16 is the top half of a float32: shift the bits up and reinterpret.
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(raw.dtype.newbyteorder("="), copy=False)


def write_safetensors(
    path: str | os.PathLike | BinaryIO, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` (any shapes; bool, int/uint 8-64, float16-64) and string ``metadata`` to ``path``
    (a file name, or a binary file object written from its current position)."""
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("metadata must map str to str")
    arrays: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"tensor name {name!r} must be a str other than '__metadata__'")
        array = np.asarray(value)
        native = array.dtype.newbyteorder("=")
        if native not in _WRITE_DTYPES:
            raise ValueError(f"tensor '{name}': dtype {array.dtype} cannot be stored in safetensors")
        # np.asarray keeps 0-d shapes; np.ascontiguousarray would make them 1-d
        arrays[name] = np.asarray(array, dtype=native.newbyteorder("<"), order="C")

    # Header entries keep the caller's order; data goes widest item first, so with the 8-aligned buffer start every
    # tensor sits at a multiple of its item size (readers that map the file can view it in place).
    data_order = sorted(arrays, key=lambda name: -arrays[name].itemsize)
    offsets: dict[str, list[int]] = {}
    offset = 0
    for name in data_order:
        offsets[name] = [offset, offset + arrays[name].nbytes]
        offset += arrays[name].nbytes
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    for name, array in arrays.items():
        header[name] = {
            "dtype": _WRITE_DTYPES[array.dtype.newbyteorder("=")],
            "shape": list(array.shape),
            "data_offsets": offsets[name],
        }

    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # Pad with spaces (valid JSON) so the data buffer starts 8-byte aligned, as the reference writer does.
    encoded += b" " * (-len(encoded) % 8)

    with _opened(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for name in data_order:
            f.write(arrays[name].reshape(-1).view(np.uint8))
