"""The layer protocol every model layer follows, and the dtype rules they share."""
from __future__ import annotations

from typing import Any

import numpy as np

from . import _kernels

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def as_dtypes(dtype: Any) -> tuple[np.dtype, ...]:
    """The float dtypes a layer keeps weights in: one, or a tuple of float32 and float64."""
    items = dtype if isinstance(dtype, (tuple, list)) else (dtype,)
    if not items:
        raise ValueError("dtype: expected float32, float64 or both, got an empty sequence")
    out = []
    for item in items:
        try:
            dt = np.dtype(item)
        except TypeError as exc:
            raise TypeError(f"dtype: expected float32 or float64, got {item!r}") from exc
        if dt not in FLOAT_DTYPES:
            raise TypeError(f"dtype: expected float32 or float64, got {dt}")
        if dt not in out:
            out.append(dt)
    return tuple(out)


def as_weight(value: Any, name: str, ndims: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A weight argument as a C-contiguous array of dtype, with one of the given numbers of dimensions."""
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu" or arr.dtype.kind == "b":
        raise TypeError(f"{name}: expected a real-valued array, got dtype {arr.dtype}")
    if arr.ndim not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{name}: expected a {want} array, got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=dtype)


def as_real_array(x: Any, dtype: np.dtype, name: str = "x") -> np.ndarray:
    """A non-NumPy input of real numbers as an array; TypeError for anything else.

    One rule: an input that carries a dtype (a NumPy array, a torch tensor, anything with ``dtype``)
    keeps it, so a float64 tensor is refused by a float32 model exactly as a float64 NumPy array is
    (unless cast=True); a list or a Python number has no dtype of its own and takes the model's.
    np.asarray(x, dtype) would parse strings and drop imaginary parts.
    """
    try:
        given = np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}: expected an array of floats, got {type(x).__name__}") from exc
    if given.dtype.kind not in "fiu":
        raise TypeError(f"{name}: expected an array of floats, got {type(x).__name__} of {given.dtype}")
    if hasattr(x, "dtype"):
        return given
    return given.astype(dtype)


class Layer:
    """One stage of a Model.

    Subclasses set ``input_size`` (features in, or None when any size works) and ``output_size`` and
    implement ``forward(x, mask) -> (y, mask)`` for x (B, T, F) or (B, F). A mask is a boolean (B, T)
    array of valid steps, or None. ``config()`` and ``weights()`` describe the layer for ``le.save``;
    ``cls(**weights, **config)`` rebuilds it.
    """

    is_recurrent = False
    # How the weights are stored when not float (lstm_engine.quantize.Quantization), else None.
    quantization: Any = None
    input_size: int | None = None
    output_size: int | None = None
    dtypes: tuple[np.dtype, ...] = FLOAT_DTYPES

    def forward(self, x: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def config(self) -> dict:
        """Arguments other than weights that rebuild this layer (JSON-compatible)."""
        return {}

    def weights(self) -> dict[str, np.ndarray]:
        """The layer's weights by constructor argument name, in the widest dtype it keeps."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


# Below this many flops a Dense product runs on one BLAS thread: a second one only adds hand-overs,
# and on a busy machine it waits for a core (the shipped character model's head, 100 x 256 x 98:
# 12 ms per call on two busy cores, against 0.05 ms of work).
SMALL_PRODUCT_FLOPS = 5e7


class one_blas_thread:
    """Hold BLAS to one thread: the products here are small (one step, one unit-by-unit Jacobian, a
    Dense head), where a second thread only adds hand-overs (measured: a 256x256 SVD 20 ms on one
    thread, 0.4 s on two busy cores)."""

    def __enter__(self) -> None:
        self.before = _kernels.blas_threads()
        if self.before > 1:
            _kernels.set_blas_threads(1)

    def __exit__(self, *exc: Any) -> None:
        if self.before > 1:
            _kernels.set_blas_threads(self.before)
