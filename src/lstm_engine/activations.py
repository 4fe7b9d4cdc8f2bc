"""Activation functions by name, as the kernels' codes and as NumPy functions (for Dense and tests)."""
from __future__ import annotations

import numpy as np

# Codes shared with _kernels.pxd.
CODES = {
    "sigmoid": 0,
    "tanh": 1,
    "relu": 2,
    "linear": 3,
    "hard_sigmoid": 4,  # Keras 3: clip(x / 6 + 0.5, 0, 1)
    "hard_sigmoid_v2": 5,  # Keras 2: clip(0.2 x + 0.5, 0, 1)
    "softsign": 6,
    "softplus": 7,
    "elu": 8,
    "exponential": 9,
}

# Names frameworks write for the same functions.
ALIASES = {None: "linear", "identity": "linear", "none": "linear"}


def canonical(name: str | None, what: str = "activation") -> str:
    """The engine's name for an activation, or ValueError listing the supported ones."""
    key = ALIASES.get(name, name)
    if not isinstance(key, str) or key.lower() not in CODES:
        raise ValueError(f"{what} {name!r} is not supported; expected one of {sorted(CODES)}")
    return key.lower()


def code(name: str | None, what: str = "activation") -> int:
    """The kernel code of an activation name."""
    return CODES[canonical(name, what)]


def apply(name: str, x: np.ndarray) -> np.ndarray:
    """Apply an activation (canonical name, or 'softmax' over the last axis) to an array, in place where possible."""
    if name == "linear":
        return x
    if name == "softmax":
        x = x - x.max(axis=-1, keepdims=True)
        np.exp(x, out=x)
        x /= x.sum(axis=-1, keepdims=True)
        return x
    with np.errstate(over="ignore"):
        if name == "sigmoid":
            return 1.0 / (1.0 + np.exp(-x))
        if name == "tanh":
            return np.tanh(x)
        if name == "relu":
            return np.maximum(x, 0)
        if name == "hard_sigmoid":
            return np.clip(x / 6 + 0.5, 0, 1)
        if name == "hard_sigmoid_v2":
            return np.clip(0.2 * x + 0.5, 0, 1)
        if name == "softsign":
            return x / (1 + np.abs(x))
        if name == "softplus":
            return np.logaddexp(x, 0).astype(x.dtype, copy=False)
        if name == "elu":
            return np.where(x > 0, x, np.expm1(np.minimum(x, 0)))
        if name == "exponential":
            return np.exp(x)
    raise ValueError(f"activation {name!r} is not supported")
