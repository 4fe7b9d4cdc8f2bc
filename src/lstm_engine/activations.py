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
    """Apply an activation (canonical name, or 'softmax' over the last axis) to a float array in place; returns x.

    x must be the caller's own array: Dense heads, sessions and the reference paths all hand over fresh
    buffers, so no temporary the size of x is made for the common functions.
    """
    if name == "linear":
        return x
    if name == "softmax":
        x -= x.max(axis=-1, keepdims=True)
        np.exp(x, out=x)
        x /= x.sum(axis=-1, keepdims=True)
        return x
    with np.errstate(over="ignore"):
        if name == "sigmoid":
            np.negative(x, out=x)
            np.exp(x, out=x)
            x += 1
            np.reciprocal(x, out=x)
        elif name == "tanh":
            np.tanh(x, out=x)
        elif name == "relu":
            np.maximum(x, 0, out=x)
        elif name == "hard_sigmoid":
            x /= 6
            x += 0.5
            np.clip(x, 0, 1, out=x)
        elif name == "hard_sigmoid_v2":
            x *= 0.2
            x += 0.5
            np.clip(x, 0, 1, out=x)
        elif name == "softsign":
            x /= 1 + np.abs(x)
        elif name == "softplus":
            np.logaddexp(x, 0, out=x)
        elif name == "elu":
            np.copyto(x, np.expm1(np.minimum(x, 0)), where=x <= 0)
        elif name == "exponential":
            np.exp(x, out=x)
        else:
            raise ValueError(f"activation {name!r} is not supported")
    return x
