"""Activation functions by name, as the kernels' codes and as NumPy functions (for Dense and tests)."""
from __future__ import annotations

from typing import Any

import numpy as np

from . import _kernels

# {name: code}, from the one list in _activations.h.
CODES = _kernels.activation_codes()

# (alpha, beta) defaults of the activations that take parameters; the others take none.
PARAMS = {
    "hard_sigmoid": (1 / 6, 0.5),  # Keras 3: clip(x / 6 + 0.5, 0, 1)
    "hard_sigmoid_v2": (0.2, 0.5),  # Keras 2 (and ONNX's default): clip(0.2 x + 0.5, 0, 1)
    "elu": (1.0, 0.0),
    "affine": (1.0, 0.0),  # alpha x + beta
    "leaky_relu": (0.01, 0.0),
    "thresholded_relu": (1.0, 0.0),  # x if x > alpha else 0
    "scaled_tanh": (1.0, 1.0),  # alpha tanh(beta x)
}
# Codes from here on exist only in the general gate loop (_gates_general.c).
FIRST_GENERAL_CODE = CODES["affine"]

# Names frameworks write for the same functions.
ALIASES = {None: "linear", "identity": "linear", "none": "linear"}


def canonical(name: str | None, what: str = "activation", parameterised: bool = False) -> str:
    """The engine's name for an activation, or ValueError listing the supported ones.

    The activations that only recurrent layers' general gate loop runs (affine, leaky_relu, ...) are
    accepted only with ``parameterised=True``: frameworks give those names different default parameters
    (Keras's leaky_relu slope is 0.2, PyTorch's 0.01), so a bare name from a file is refused, never guessed.
    """
    key = ALIASES.get(name, name)
    known = CODES if parameterised else {k: v for k, v in CODES.items() if v < FIRST_GENERAL_CODE}
    if not isinstance(key, str) or key.lower() not in known:
        raise ValueError(f"{what} {name!r} is not supported; expected one of {sorted(known)}")
    return key.lower()


def spec(value: Any, what: str = "activation") -> tuple[str, float, float]:
    """An activation as (name, alpha, beta): from a name, or a dict {"name": ..., "alpha": ..., "beta": ...}.

    Missing parameters take the defaults in PARAMS; parameters given to an activation that takes none
    raise ValueError, as do unknown names.
    """
    params: dict = {}
    if isinstance(value, dict):
        params = dict(value)
        value = params.pop("name", None)
        extra = set(params) - {"alpha", "beta"}
        if value is None or extra:
            raise ValueError(f"{what}: expected a name or a dict with 'name' and optional 'alpha', 'beta', "
                             f"got {sorted(params) if value is not None else 'no name'}")
    name = canonical(value, what, parameterised=True)
    defaults = PARAMS.get(name)
    if defaults is None:
        if params:
            raise ValueError(f"{what}: {name!r} takes no alpha or beta; those that do: {sorted(PARAMS)}")
        return name, 0.0, 0.0
    out = []
    for key, default in zip(("alpha", "beta"), defaults):
        v = params.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(v):
            raise ValueError(f"{what}: {key} of {name!r} must be a finite number, got {v!r}")
        out.append(float(v))
    return name, out[0], out[1]


def describe(s: tuple[str, float, float]) -> Any:
    """A spec as the constructors take it back: the bare name when its parameters are the defaults."""
    name, alpha, beta = s
    defaults = PARAMS.get(name)
    if defaults is None or (alpha, beta) == defaults:
        return name
    return {"name": name, "alpha": alpha, "beta": beta}


def apply(name: str, x: np.ndarray, alpha: float | None = None, beta: float | None = None) -> np.ndarray:
    """Apply an activation (canonical name, or 'softmax' over the last axis) to a float array in place; returns x.

    alpha and beta default to PARAMS for the activations that take them.

    x must be the caller's own array: Dense heads, sessions and the reference paths all hand over fresh
    buffers, so no temporary the size of x is made for the common functions.
    """
    if name == "linear":
        return x
    if name in PARAMS:
        a, b = PARAMS[name]
        alpha = a if alpha is None else alpha
        beta = b if beta is None else beta
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
        elif name in ("hard_sigmoid", "hard_sigmoid_v2"):
            x *= alpha
            x += beta
            np.clip(x, 0, 1, out=x)
        elif name == "softsign":
            x /= 1 + np.abs(x)
        elif name == "softplus":
            np.logaddexp(x, 0, out=x)
        elif name == "elu":
            np.copyto(x, alpha * np.expm1(np.minimum(x, 0)), where=x <= 0)
        elif name == "exponential":
            np.exp(x, out=x)
        elif name == "affine":
            x *= alpha
            x += beta
        elif name == "leaky_relu":
            np.copyto(x, alpha * x, where=x < 0)
        elif name == "thresholded_relu":
            np.copyto(x, 0, where=x <= alpha)
        elif name == "scaled_tanh":
            x *= beta
            np.tanh(x, out=x)
            x *= alpha
        else:
            raise ValueError(f"activation {name!r} is not supported")
    return x
