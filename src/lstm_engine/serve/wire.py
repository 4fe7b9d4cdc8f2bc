"""What travels over the wire: request bodies (JSON or .npy) to checked arrays, arrays back to bodies.

Every problem with a request is a StreamError with a 4xx status and a message naming the field,
what was expected and what came; nothing here lets a bad body reach the pool.
"""
from __future__ import annotations

import io
import json
import math
import numbers
from typing import Any

import numpy as np
import orjson

from ..graph import id_range
from .store import StreamError

NPY = "application/x-npy"


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(body: bytes | str) -> dict:
    """A JSON object; 400 for anything that is not one (NaN and Infinity included: they are not JSON)."""
    try:
        # orjson reads a step of 256 numbers ~10x faster than json (15 vs 170 us on a loaded machine). What it
        # refuses (NaN, 1e999, depth past 1024, bad UTF-8...) goes to json, whose answers are the errors below,
        # or a value the checks after refuse by name (1e999 is an infinity: "not_finite").
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        value = _parse_json_slowly(body)
    if not isinstance(value, dict):
        raise StreamError(400, "bad_json", f"expected a JSON object, got {type(value).__name__}")
    return value


def _parse_json_slowly(body: bytes | str) -> Any:
    try:
        return json.loads(body, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise StreamError(400, "bad_json", f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise StreamError(400, "bad_json", "the body's JSON is nested too deeply") from None


# Parsing a .npy header means ast.literal_eval (compile() on every request: a third of a step message's
# time here), yet a client sends the same few headers over and over. Headers NumPy has parsed once are
# remembered by their exact bytes; writing, likewise, per dtype and shape.
_MAX_CACHED = 1024
_read_headers: dict[bytes, tuple[np.dtype, tuple, int]] = {}
_write_headers: dict[tuple, bytes] = {}


def parse_npy(body: bytes) -> np.ndarray:
    """A .npy body as an array (never unpickling); 400 for anything else."""
    try:
        if len(body) < 10 or body[:6] != b"\x93NUMPY":
            raise ValueError("no .npy magic string")
        end = 10 + int.from_bytes(body[8:10], "little") if body[6] == 1 else \
            12 + int.from_bytes(body[8:12], "little")
        header = body[:end]
        known = _read_headers.get(header)
        if known is None:
            stream = io.BytesIO(body)
            version = np.lib.format.read_magic(stream)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(stream)
            if dtype.hasobject:
                raise ValueError("the array holds Python objects; send numbers")
            if fortran and len(shape) > 1:
                raise ValueError("Fortran-ordered arrays are not accepted; send C order")
            known = (dtype, shape, math.prod(shape))
            if len(_read_headers) < _MAX_CACHED:
                _read_headers[header] = known
        dtype, shape, count = known
        if len(body) - end != count * dtype.itemsize:
            raise ValueError(f"the header announces {count} values of {dtype} ({count * dtype.itemsize} bytes), "
                             f"the body holds {len(body) - end} bytes")
        return np.frombuffer(body, dtype, count, end).reshape(shape)
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise StreamError(400, "bad_npy", f"the body is not a valid .npy array: {exc}") from None


def to_npy(arr: np.ndarray) -> bytes:
    key = (arr.dtype.str, arr.shape)
    header = _write_headers.get(key)
    if header is None:
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.zeros(arr.shape, arr.dtype), allow_pickle=False)
        header = buf.getvalue()[: buf.tell() - arr.nbytes]
        if len(_write_headers) < _MAX_CACHED:
            _write_headers[key] = header
    return header + np.ascontiguousarray(arr).tobytes()


def _has_bools(value: Any) -> bool:
    """Whether a parsed JSON value holds true/false anywhere (NumPy would read them as 1 and 0)."""
    stack = [value]  # a loop, not recursion: JSON may nest as deep as its parser allows
    while stack:
        v = stack.pop()
        if isinstance(v, bool):
            return True
        if isinstance(v, list):
            stack.extend(v)
    return False


def _mentions_bools(raw: bytes | str) -> bool:
    return (b"true" in raw or b"false" in raw) if isinstance(raw, bytes) else ("true" in raw or "false" in raw)


def array_from_json(value: Any, raw: bytes | str, what: str) -> np.ndarray:
    """A parsed JSON value as a rectangular array of numbers (raw: the text it came from)."""
    # Only a body that says true/false needs the slow walk; a key or string holding the word just costs it.
    if _mentions_bools(raw) and _has_bools(value):
        raise StreamError(422, "wrong_dtype", f"{what}: expected numbers, got true/false")
    try:
        arr = np.asarray(value)
    except ValueError:
        arr = None
    if arr is None or arr.dtype.kind not in "iuf":
        # Ragged lists and nulls make object arrays (a shape problem); strings are the wrong type.
        code = "wrong_dtype" if arr is not None and arr.dtype.kind in "US" else "bad_shape"
        raise StreamError(422, code, f"{what}: expected a rectangular array of numbers, got {_brief(value)}")
    return arr


class Inputs:
    """A model's input checks for the wire: token ids or (F,) float steps, one step or a chunk."""

    def __init__(self, model: Any, dtype: np.dtype, max_chunk: int) -> None:
        self.takes_ids = model.takes_ids
        self.vocab = id_range(model.graph, model.graph.inputs[0].name) if self.takes_ids else 0
        if self.vocab is None:
            raise ValueError("serve: the model's token ids are not only looked up in tables, so their range "
                             "cannot be checked on the wire")
        self.input_size = model.input_size
        self.dtype = dtype
        self.max_chunk = max_chunk

    def describe(self) -> str:
        if self.takes_ids:
            return f"a token id in [0, {self.vocab}) or a list of them"
        return f"{self.input_size} numbers (one step) or a list of such lists (a chunk of steps)"

    def from_json(self, value: Any, raw: bytes | str, what: str = "x") -> tuple[np.ndarray, bool]:
        """Steps from a parsed JSON value: (steps array (T,) ids or (T, F), whether it was one step)."""
        try:
            arr = array_from_json(value, raw, what)
        except StreamError as exc:
            raise StreamError(422, exc.code, f"{what}: expected {self.describe()}, got {_brief(value)}") from None
        return self.check(arr, what)

    def from_npy(self, arr: np.ndarray, what: str = "x") -> tuple[np.ndarray, bool]:
        if self.takes_ids:
            if arr.dtype.kind not in "iu":
                raise StreamError(422, "wrong_dtype", f"{what}: token ids must be integers, got dtype {arr.dtype}")
        else:
            native = arr.dtype.newbyteorder("=") if arr.dtype.kind == "f" else arr.dtype
            if native != self.dtype:
                raise StreamError(422, "wrong_dtype", f"{what}: dtype {arr.dtype}, but this server runs {self.dtype}; "
                                                      f"send {self.dtype} (little-endian) arrays")
        return self.check(arr, what)

    def check(self, arr: np.ndarray, what: str) -> tuple[np.ndarray, bool]:
        if self.takes_ids:
            if arr.dtype.kind not in "iu":
                raise StreamError(422, "wrong_dtype", f"{what}: token ids must be integers, got {arr.dtype} values")
            if arr.ndim > 1:
                raise StreamError(422, "bad_shape", f"{what}: expected {self.describe()}, got shape {arr.shape}")
            single = arr.ndim == 0
            steps = arr.reshape(-1)
            bad = steps[(steps < 0) | (steps >= self.vocab)]
            if bad.size:
                raise StreamError(422, "out_of_range", f"{what}: token id {bad[0]} is out of range [0, {self.vocab})")
            steps = steps.astype(np.intp)
        else:
            F = self.input_size
            if arr.ndim not in (1, 2) or arr.shape[-1] != F:
                raise StreamError(422, "bad_shape", f"{what}: expected shape ({F},) for one step or (steps, {F}) for "
                                                    f"a chunk, got {arr.shape}")
            single = arr.ndim == 1
            steps = np.ascontiguousarray(arr.reshape(-1, F), dtype=self.dtype)
            if not np.isfinite(steps).all():
                raise StreamError(422, "not_finite", f"{what}: every value must be finite (no NaN or infinity)")
        if not 1 <= len(steps) <= self.max_chunk:
            raise StreamError(422, "bad_chunk_length", f"{what}: a chunk holds 1 to {self.max_chunk} steps, "
                                                       f"got {len(steps)}")
        return steps, single


def check_position(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise StreamError(422, "bad_field", f"at: expected the stream's position (an integer >= 0), got {value!r}")
    return int(value)


def _brief(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
