"""The graph's glue ops in NumPy, with ONNX's names and semantics (opset 17), and their attribute rules.

Each op is one function ``f(*inputs, **attrs) -> array or tuple of arrays``; an omitted optional input
arrives as None. ``OPS[name]`` holds the function, how many inputs and outputs it takes and its
attributes (a checker and a default each, ``REQUIRED`` when it has none). Constant parameters that ONNX
passes as inputs (Reshape's shape, Slice's starts...) are attributes here: the loaders fold them.
The engine ops that need the model (``Recurrent``, ``Layer``) and ``If`` (sub-graphs) live in
``lstm_engine.plan``, which runs everything.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import _kernels

REQUIRED = object()
DTYPES = {"float": None, "int64": np.dtype(np.int64), "int32": np.dtype(np.int32), "bool": np.dtype(np.bool_)}


def special():
    """scipy.special, imported on first use: it takes ~0.2 s, most of `import lstm_engine`, and only graphs with
    Sigmoid, Erf or Gelu nodes need it (the CLI's first answer must not wait for it)."""
    from scipy import special as module

    return module


# -- attribute checkers: each returns the normalised value or raises ValueError ----------------------

def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ValueError(f"expected an int, got {v!r}")
    return int(v)


def _flag(v: Any) -> int:
    v = _int(v) if not isinstance(v, bool) else int(v)
    if v not in (0, 1):
        raise ValueError(f"expected 0 or 1, got {v!r}")
    return v


def _float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ValueError(f"expected a number, got {v!r}")
    return float(v)


def _opt_float(v: Any) -> float | None:
    return None if v is None else _float(v)


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {v!r}")
    return v


def _ints(v: Any) -> list[int]:
    if not isinstance(v, (list, tuple)):
        raise ValueError(f"expected a list of ints, got {v!r}")
    if len(v) > 64:
        raise ValueError(f"expected at most 64 entries, got {len(v)}")
    return [_int(x) for x in v]


def _opt_ints(v: Any) -> list[int] | None:
    return None if v is None else _ints(v)


def _one_of(*choices: str) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if v not in choices:
            raise ValueError(f"expected one of {list(choices)}, got {v!r}")
        return v
    return check


def _dtype_name(v: Any) -> str:
    if v not in DTYPES:
        raise ValueError(f"expected one of {list(DTYPES)}, got {v!r}")
    return v


def _equation(v: Any) -> str:
    v = _str(v)
    if len(v) > 200 or any(not (ch.isalpha() or ch in ",.->  ") for ch in v):
        raise ValueError(f"expected an einsum equation of letters, ',', '...' and '->', got {v!r}")
    return v


@dataclass
class OpSpec:
    """An op's function, its input and output counts (min, max) and attributes {name: (checker, default)}."""

    fn: Callable[..., Any]
    inputs: tuple[int, int]
    outputs: tuple[int, int] = (1, 1)
    attrs: dict[str, tuple[Callable[[Any], Any], Any]] = field(default_factory=dict)


OPS: dict[str, OpSpec] = {}
VARIADIC = 1 << 16
# The largest array an op may make from its attributes alone (Expand, Tile, Pad), and constant folding
# at load: a model file could otherwise ask for terabytes.
MAX_ELEMENTS = 1 << 28


def op(name: str, inputs: tuple[int, int] | int, outputs: tuple[int, int] | int = 1,
       **attrs: tuple[Callable[[Any], Any], Any]) -> Callable:
    def register(fn: Callable) -> Callable:
        OPS[name] = OpSpec(fn, inputs if isinstance(inputs, tuple) else (inputs, inputs),
                           outputs if isinstance(outputs, tuple) else (outputs, outputs), attrs)
        return fn
    return register


def check_attrs(op_name: str, attrs: dict) -> dict:
    """attrs with defaults filled in and values normalised; ValueError naming the attribute at fault."""
    spec = OPS[op_name]
    unknown = sorted(set(attrs) - set(spec.attrs))
    if unknown:
        raise ValueError(f"attribute {unknown[0]!r} is not one {op_name} takes "
                         f"(it takes {sorted(spec.attrs) or 'none'})")
    out = {}
    for name, (check, default) in spec.attrs.items():
        if name not in attrs:
            if default is REQUIRED:
                raise ValueError(f"attribute {name!r} is required")
            out[name] = default
            continue
        try:
            out[name] = check(attrs[name])
        except ValueError as exc:
            raise ValueError(f"attribute {name!r}: {exc}") from None
    return out


def _check_size(shape: Any, op_name: str) -> None:
    n = math.prod(int(d) for d in shape)
    if n > MAX_ELEMENTS:
        raise ValueError(f"{op_name}: the result would have {n} elements (shape {tuple(shape)}), over the "
                         f"{MAX_ELEMENTS} an op may make")


def result_elements(op_name: str, args: list, kw: dict) -> int:
    """About how many elements an op's result will have (to refuse folding a constant bigger than any model)."""
    arrays = [a for a in args if isinstance(a, np.ndarray)]
    biggest = max((a.size for a in arrays), default=0)
    try:
        if op_name == "MatMul":
            a, b = args
            if a.ndim >= 2 and b.ndim >= 2:
                batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
                return math.prod(batch) * a.shape[-2] * b.shape[-1]
            return biggest
        if op_name == "Einsum":
            lhs, _, out = kw["equation"].replace(" ", "").partition("->")
            sizes = {ch: n for term, a in zip(lhs.split(","), arrays) for ch, n in zip(term, a.shape)}
            return math.prod(sizes.get(ch, 1) for ch in out) if out else biggest
        if op_name == "Gemm":
            return args[0].shape[1 if kw["transA"] else 0] * args[1].shape[0 if kw["transB"] else 1]
        if op_name in ("Expand", "Tile", "Pad"):
            return 0  # checked by the op itself before it allocates
        if op_name == "Concat":
            return sum(a.size for a in arrays)
        if op_name == "Gather":
            data, idx = args
            return idx.size * (data.size // max(data.shape[kw["axis"]], 1))
        if op_name == "Conv":
            return args[0].size * args[1].shape[0] * max(args[1].shape[-1], 1)
        if len(arrays) > 1:
            return math.prod(np.broadcast_shapes(*[a.shape for a in arrays]))
    except (ValueError, TypeError, KeyError, IndexError):
        return biggest  # the op itself will say what is wrong
    return biggest


def _axis(axis: int, ndim: int, what: str = "axis") -> int:
    if not -ndim <= axis < max(ndim, 1):
        raise ValueError(f"{what} {axis} is out of range for a {ndim}-D input")
    return axis % max(ndim, 1)


def _axes(axes: list[int], ndim: int) -> tuple[int, ...]:
    out = tuple(_axis(a, ndim) for a in axes)
    if len(set(out)) != len(out):
        raise ValueError(f"axes {axes} repeat an axis")
    return out


def _float_input(x: np.ndarray, op_name: str) -> np.ndarray:
    if x.dtype.kind != "f":
        raise TypeError(f"{op_name}: expected a float input, got {x.dtype}")
    return x


# -- elementwise ------------------------------------------------------------------------------------

def _binary(name: str, ufunc: Callable) -> None:
    op(name, 2)(lambda a, b: ufunc(a, b))


_binary("Add", np.add)
_binary("Sub", np.subtract)
_binary("Mul", np.multiply)
_binary("Equal", np.equal)
_binary("Less", np.less)
_binary("Greater", np.greater)


@op("Div", 2)
def div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.dtype.kind in "iu" and b.dtype.kind in "iu":
        if np.any(b == 0):
            raise ValueError("Div: integer division by zero")
        # ONNX integer division truncates toward zero (C's), NumPy's // floors.
        q = np.abs(a) // np.abs(b)
        return np.where((a < 0) != (b < 0), -q, q).astype(np.result_type(a, b))
    return np.divide(a, b)


@op("Pow", 2)
def pow_(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.dtype.kind in "iu" and b.dtype.kind in "iu" and np.any(b < 0):
        raise ValueError("Pow: an integer base with a negative integer exponent")
    with np.errstate(all="ignore"):
        return np.power(a, b.astype(a.dtype) if a.dtype.kind == "f" else b).astype(a.dtype, copy=False)


def _unary(name: str, fn: Callable, floats: bool = True) -> None:
    def run(x: np.ndarray) -> np.ndarray:
        if floats:
            _float_input(x, name)
        with np.errstate(all="ignore"):
            return fn(x)
    op(name, 1)(run)


_unary("Sqrt", np.sqrt)
_unary("Neg", np.negative, floats=False)
_unary("Abs", np.abs, floats=False)
_unary("Exp", np.exp)
_unary("Log", np.log)
_unary("Reciprocal", np.reciprocal)
_unary("Erf", lambda x: special().erf(x).astype(x.dtype, copy=False))
_unary("Tanh", np.tanh)
_unary("Relu", lambda x: np.maximum(x, x.dtype.type(0)))
_unary("Sigmoid", lambda x: special().expit(x).astype(x.dtype, copy=False))
_unary("Softplus", lambda x: np.logaddexp(x, x.dtype.type(0)))
_unary("Softsign", lambda x: x / (1 + np.abs(x)))


def _variadic(name: str, ufunc: Callable) -> None:
    op(name, (1, VARIADIC))(lambda *xs: functools.reduce(ufunc, xs))


_variadic("Max", np.maximum)
_variadic("Min", np.minimum)


def _bool_input(x: np.ndarray, op_name: str) -> np.ndarray:
    if x.dtype != np.bool_:
        raise TypeError(f"{op_name}: expected a bool input, got {x.dtype}")
    return x


@op("Where", 3)
def where(cond: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.where(_bool_input(cond, "Where"), x, y)


@op("Not", 1)
def not_(x: np.ndarray) -> np.ndarray:
    return np.logical_not(_bool_input(x, "Not"))


@op("And", 2)
def and_(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.logical_and(_bool_input(a, "And"), _bool_input(b, "And"))


@op("Clip", 1, min=(_opt_float, None), max=(_opt_float, None))
def clip(x: np.ndarray, min: float | None, max: float | None) -> np.ndarray:
    lo = -np.inf if min is None else min
    hi = np.inf if max is None else max
    if x.dtype.kind in "iu":
        info = np.iinfo(x.dtype)
        lo = info.min if lo < info.min else math.ceil(lo)
        hi = info.max if hi > info.max else math.floor(hi)
    else:
        lo, hi = x.dtype.type(lo), x.dtype.type(hi)
    # ONNX: min > max gives max everywhere (np.clip does the same: minimum is applied last).
    return np.minimum(np.maximum(x, lo), hi)


# -- activations ------------------------------------------------------------------------------------

@op("Gelu", 1, approximate=(_one_of("none", "tanh"), "none"))
def gelu(x: np.ndarray, approximate: str) -> np.ndarray:
    _float_input(x, "Gelu")
    if approximate == "tanh":
        inner = math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)
        return (0.5 * x * (1 + np.tanh(inner))).astype(x.dtype, copy=False)
    return (0.5 * x * (1 + special().erf(x / math.sqrt(2)))).astype(x.dtype, copy=False)


@op("Elu", 1, alpha=(_float, 1.0))
def elu(x: np.ndarray, alpha: float) -> np.ndarray:
    _float_input(x, "Elu")
    return np.where(x > 0, x, x.dtype.type(alpha) * np.expm1(np.minimum(x, 0)))


@op("LeakyRelu", 1, alpha=(_float, 0.01))
def leaky_relu(x: np.ndarray, alpha: float) -> np.ndarray:
    _float_input(x, "LeakyRelu")
    return np.where(x >= 0, x, x * x.dtype.type(alpha))


@op("HardSigmoid", 1, alpha=(_float, 0.2), beta=(_float, 0.5))
def hard_sigmoid(x: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    _float_input(x, "HardSigmoid")
    return np.clip(x * x.dtype.type(alpha) + x.dtype.type(beta), 0, 1).astype(x.dtype, copy=False)


@op("Softmax", 1, axis=(_int, -1))
def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    _float_input(x, "Softmax")
    axis = _axis(axis, x.ndim)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@op("LogSoftmax", 1, axis=(_int, -1))
def log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    _float_input(x, "LogSoftmax")
    axis = _axis(axis, x.ndim)
    z = x - x.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


# -- linear algebra ---------------------------------------------------------------------------------

@op("MatMul", 2)
def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"MatMul: inputs must have at least one dimension, got {a.shape} and {b.shape}")
    return np.matmul(a, b)


@op("Gemm", (2, 3), alpha=(_float, 1.0), beta=(_float, 1.0), transA=(_flag, 0), transB=(_flag, 0))
def gemm(a: np.ndarray, b: np.ndarray, c: np.ndarray | None, alpha: float, beta: float, transA: int,
         transB: int) -> np.ndarray:
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"Gemm: A and B must be 2-D, got {a.shape} and {b.shape}")
    a = a.T if transA else a
    b = b.T if transB else b
    y = a @ b
    if alpha != 1.0:
        y *= y.dtype.type(alpha)
    if c is not None:
        y += c * c.dtype.type(beta) if beta != 1.0 else c
    return y


@op("Einsum", (1, VARIADIC), equation=(_equation, REQUIRED))
def einsum(*xs: np.ndarray, equation: str) -> np.ndarray:
    return np.einsum(equation.replace(" ", ""), *xs)


# -- normalisation ----------------------------------------------------------------------------------

@op("LayerNormalization", (2, 3), (1, 3), axis=(_int, -1), epsilon=(_float, 1e-5), stash_type=(_int, 1))
def layer_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray | None, axis: int, epsilon: float,
               stash_type: int) -> tuple[np.ndarray, ...]:
    _float_input(x, "LayerNormalization")
    axis = _axis(axis, x.ndim)
    axes = tuple(range(axis, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    d = x - mean
    var = (d * d).mean(axis=axes, keepdims=True)
    inv = 1 / np.sqrt(var + x.dtype.type(epsilon))
    y = d * inv * scale
    if bias is not None:
        y = y + bias
    return y, mean, inv


@op("BatchNormalization", 5, epsilon=(_float, 1e-5), momentum=(_float, 0.9), training_mode=(_one_of(0), 0))
def batch_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, mean: np.ndarray, var: np.ndarray,
               epsilon: float, momentum: float, training_mode: int) -> np.ndarray:
    _float_input(x, "BatchNormalization")
    if x.ndim < 2:
        raise ValueError(f"BatchNormalization: expected (N, C, ...) input, got shape {x.shape}")
    C = x.shape[1]
    for name, p in (("scale", scale), ("B", bias), ("mean", mean), ("var", var)):
        if p.shape != (C,):
            raise ValueError(f"BatchNormalization: {name} must have shape ({C},) (channels on axis 1), got {p.shape}")
    shape = (1, C) + (1,) * (x.ndim - 2)
    k = scale / np.sqrt(var + x.dtype.type(epsilon))
    return x * k.reshape(shape) + (bias - mean * k).reshape(shape)


# -- shape ------------------------------------------------------------------------------------------

@op("Transpose", 1, perm=(_opt_ints, None))
def transpose(x: np.ndarray, perm: list[int] | None) -> np.ndarray:
    if perm is None:
        return x.T
    if sorted(perm) != list(range(x.ndim)):
        raise ValueError(f"Transpose: perm {perm} is not a permutation of the {x.ndim} axes")
    return x.transpose(perm)


@op("Reshape", 1, shape=(_ints, REQUIRED), allowzero=(_flag, 0))
def reshape(x: np.ndarray, shape: list[int], allowzero: int) -> np.ndarray:
    target = list(shape)
    if not allowzero:
        for i, s in enumerate(target):
            if s == 0:
                if i >= x.ndim:
                    raise ValueError(f"Reshape: shape {shape} copies dim {i} of a {x.ndim}-D input")
                target[i] = x.shape[i]
    if sum(s == -1 for s in target) > 1 or any(s < -1 for s in target):
        raise ValueError(f"Reshape: shape {shape} has more than one -1 or a negative size")
    try:
        return x.reshape(target)
    except ValueError:
        raise ValueError(f"Reshape: cannot reshape {x.shape} into {shape}") from None


@op("Flatten", 1, axis=(_int, 1))
def flatten(x: np.ndarray, axis: int) -> np.ndarray:
    if not -x.ndim <= axis <= x.ndim:
        raise ValueError(f"Flatten: axis {axis} is out of range for a {x.ndim}-D input")
    axis %= x.ndim + 1
    return x.reshape(int(np.prod(x.shape[:axis])), -1) if x.size else \
        x.reshape(int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:])))


@op("Squeeze", 1, axes=(_opt_ints, None))
def squeeze(x: np.ndarray, axes: list[int] | None) -> np.ndarray:
    if axes is None:
        return x.reshape([s for s in x.shape if s != 1])
    axes_ = _axes(axes, x.ndim)
    bad = [a for a in axes_ if x.shape[a] != 1]
    if bad:
        raise ValueError(f"Squeeze: axis {bad[0]} of shape {x.shape} is not 1")
    return x.squeeze(axis=axes_)


@op("Unsqueeze", 1, axes=(_ints, REQUIRED))
def unsqueeze(x: np.ndarray, axes: list[int]) -> np.ndarray:
    out_ndim = x.ndim + len(axes)
    axes_ = sorted(_axes(axes, out_ndim))
    shape = list(x.shape)
    for a in axes_:
        shape.insert(a, 1)
    return x.reshape(shape)


@op("Concat", (1, VARIADIC), axis=(_int, REQUIRED))
def concat(*xs: np.ndarray, axis: int) -> np.ndarray:
    ndim = xs[0].ndim
    if any(x.ndim != ndim for x in xs):
        raise ValueError(f"Concat: inputs differ in rank: {[x.shape for x in xs]}")
    try:
        return np.concatenate(xs, axis=_axis(axis, ndim))
    except ValueError:
        raise ValueError(f"Concat: shapes {[x.shape for x in xs]} do not fit on axis {axis}") from None


@op("Split", 1, (1, VARIADIC), axis=(_int, 0), split=(_opt_ints, None), num_outputs=(_int, 0))
def split(x: np.ndarray, axis: int, split: list[int] | None, num_outputs: int, *, _outputs: int = 1
          ) -> tuple[np.ndarray, ...]:
    axis = _axis(axis, x.ndim)
    n = x.shape[axis]
    if split is None:
        parts = num_outputs or _outputs
        size = -(-n // parts)  # ONNX: equal parts, the last one smaller
        split = [min(size, n - i * size) for i in range(parts)]
    if len(split) != _outputs or any(s < 0 for s in split) or sum(split) != n:
        raise ValueError(f"Split: split {split} does not cut axis {axis} of size {n} into {_outputs} parts")
    return tuple(np.split(x, np.cumsum(split)[:-1], axis=axis))


@op("Slice", 1, starts=(_ints, REQUIRED), ends=(_ints, REQUIRED), axes=(_opt_ints, None), steps=(_opt_ints, None))
def slice_(x: np.ndarray, starts: list[int], ends: list[int], axes: list[int] | None,
           steps: list[int] | None) -> np.ndarray:
    return x[slice_index(x.shape, starts, ends, axes, steps)]


def slice_index(shape: tuple, starts: list[int], ends: list[int], axes: list[int] | None,
                steps: list[int] | None) -> tuple:
    """The NumPy index of an ONNX Slice of an array of this shape."""
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise ValueError("Slice: starts, ends, axes and steps differ in length")
    index = [slice(None)] * len(shape)
    for s, e, a, st in zip(starts, ends, _axes(axes, len(shape)), steps):
        if st == 0:
            raise ValueError("Slice: a step of 0")
        n = shape[a]
        # ONNX clamps (INT64_MAX means 'to the end'); Python slices clamp the same way once negative
        # starts and ends are taken from the end, except where they still fall below 0 with a negative step.
        s = s + n if s < 0 else s
        e = e + n if e < 0 else e
        if st > 0:
            s, e = min(max(s, 0), n), min(max(e, 0), n)
        else:
            s, e = min(max(s, -1), n - 1), min(max(e, -1), n - 1)
        index[a] = slice(s, None if (st < 0 and e < 0) else e, st)
    return tuple(index)


@op("Gather", 2, axis=(_int, 0))
def gather(x: np.ndarray, indices: np.ndarray, axis: int) -> np.ndarray:
    if x.ndim == 0:
        raise ValueError("Gather: the data must have at least one dimension")
    if indices.dtype.kind not in "iu":
        raise TypeError(f"Gather: indices must be integers, got {indices.dtype}")
    axis = _axis(axis, x.ndim)
    n = x.shape[axis]
    if indices.size and (indices.min() < -n or indices.max() >= n):
        bad = indices[(indices < -n) | (indices >= n)].flat[0]
        raise ValueError(f"Gather: index {bad} is out of range [{-n}, {n}) for axis {axis} of shape {x.shape}")
    return np.take(x, np.where(indices < 0, indices + n, indices), axis=axis)


@op("Expand", 1, shape=(_ints, REQUIRED))
def expand(x: np.ndarray, shape: list[int]) -> np.ndarray:
    try:
        target = np.broadcast_shapes(x.shape, tuple(shape))
    except ValueError:
        raise ValueError(f"Expand: shape {x.shape} cannot broadcast to {shape}") from None
    _check_size(target, "Expand")
    return np.broadcast_to(x, target).copy()


@op("Tile", 1, repeats=(_ints, REQUIRED))
def tile(x: np.ndarray, repeats: list[int]) -> np.ndarray:
    if len(repeats) != x.ndim or any(r < 0 for r in repeats):
        raise ValueError(f"Tile: repeats {repeats} must be {x.ndim} non-negative counts")
    _check_size([n * r for n, r in zip(x.shape, repeats)], "Tile")
    return np.tile(x, repeats)


@op("Identity", 1)
def identity(x: np.ndarray) -> np.ndarray:
    return x


@op("Cast", 1, to=(_dtype_name, REQUIRED))
def cast(x: np.ndarray, to: str, *, _float: np.dtype = np.dtype(np.float32)) -> np.ndarray:
    dt = _float if to == "float" else DTYPES[to]
    if x.dtype.kind == "f" and dt.kind in "iu":
        with np.errstate(invalid="ignore"):
            return np.trunc(x).astype(dt)
    return x.astype(dt)


@op("Shape", 1, start=(_int, 0), end=(lambda v: None if v is None else _int(v), None))
def shape(x: np.ndarray, start: int, end: int | None) -> np.ndarray:
    return np.array(x.shape[slice(start, end)], np.int64)


@op("ConstantOfShape", 1, value=(_float, 0.0), dtype=(_dtype_name, "float"))
def constant_of_shape(shape: np.ndarray, value: float, dtype: str, *,
                      _float: np.dtype = np.dtype(np.float32)) -> np.ndarray:
    """A tensor of ``shape`` (a 1-D int tensor known only at run time) filled with value."""
    if shape.dtype.kind not in "iu" or shape.ndim != 1 or (shape < 0).any():
        raise ValueError(f"ConstantOfShape: the shape must be a 1-D tensor of sizes, got {shape}")
    if np.prod(shape, dtype=np.float64) > 1 << 31:
        raise ValueError(f"ConstantOfShape: shape {shape.tolist()} is over 2**31 elements")
    return np.full(shape, value, _float if dtype == "float" else DTYPES[dtype])


# -- reductions -------------------------------------------------------------------------------------

def _reduction(name: str, fn: Callable) -> None:
    def run(x: np.ndarray, axes: list[int] | None, keepdims: int) -> np.ndarray:
        ax = None if axes is None else _axes(axes, x.ndim)
        if ax is not None and not ax and x.ndim:
            return x
        with np.errstate(all="ignore"):
            return np.asarray(fn(x, axis=ax, keepdims=bool(keepdims)))
    op(name, 1, axes=(_opt_ints, None), keepdims=(_flag, 1))(run)


_reduction("ReduceMean", np.mean)
_reduction("ReduceSum", np.sum)
_reduction("ReduceMax", np.max)
_reduction("ReduceMin", np.min)
_reduction("ReduceL2", lambda x, axis, keepdims: np.sqrt(np.sum(x * x, axis=axis, keepdims=keepdims)))


@op("ArgMax", 1, axis=(_int, 0), keepdims=(_flag, 1), select_last_index=(_flag, 0))
def argmax(x: np.ndarray, axis: int, keepdims: int, select_last_index: int) -> np.ndarray:
    axis = _axis(axis, x.ndim)
    if select_last_index:
        idx = x.shape[axis] - 1 - np.argmax(np.flip(x, axis), axis=axis)
    else:
        idx = np.argmax(x, axis=axis)
    idx = idx.astype(np.int64)
    return np.expand_dims(idx, axis) if keepdims else idx


# -- convolution and padding ------------------------------------------------------------------------

@op("Conv", (2, 3), kernel_shape=(_opt_ints, None), strides=(_opt_ints, None), pads=(_opt_ints, None),
    dilations=(_opt_ints, None), group=(_int, 1))
def conv(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, kernel_shape: list[int] | None,
         strides: list[int] | None, pads: list[int] | None, dilations: list[int] | None, group: int) -> np.ndarray:
    """1-D convolution: x (N, C, L), w (M, C / group, k), b (M,) -> (N, M, L_out)."""
    if x.ndim != 3 or w.ndim != 3:
        raise ValueError(f"Conv: only 1-D convolution, x (N, C, L) and W (M, C/group, k), got {x.shape} and {w.shape}")
    N, C, L = x.shape
    M, Cg, k = w.shape
    stride = (strides or [1])[0]
    dilation = (dilations or [1])[0]
    pad = pads or [0, 0]
    if (kernel_shape is not None and kernel_shape != [k]) or len(pad) != 2 or stride < 1 or dilation < 1 \
            or min(pad) < 0 or group < 1 or C % group or M % group or Cg != C // group:
        raise ValueError(f"Conv: attributes kernel_shape={kernel_shape} strides={strides} pads={pads} "
                         f"dilations={dilations} group={group} do not fit x {x.shape} and W {w.shape}")
    if b is not None and b.shape != (M,):
        raise ValueError(f"Conv: B must have shape ({M},), got {b.shape}")
    span = dilation * (k - 1) + 1
    Lp = L + pad[0] + pad[1]
    L_out = (Lp - span) // stride + 1
    if L_out < 1:
        raise ValueError(f"Conv: the input of length {L} is shorter than the kernel's span {span}")
    dtype = np.result_type(x, w)
    if dtype == np.float32 and x.dtype == dtype and w.dtype == dtype and (b is None or b.dtype == dtype):
        return conv1d_f32(x, conv_kernels(w, b, group, stride, dilation, pad), M, L_out)
    if pad[0] or pad[1] or not x.flags.c_contiguous:
        xp = np.zeros((N, C, Lp), x.dtype)
        xp[:, :, pad[0]:pad[0] + L] = x
    else:
        xp = x
    # im2col: the (N, C, k, L_out) windows are a strided view of the contiguous padded input (built directly, as
    # sliding_window_view costs more than the copy on small inputs), copied once into columns so that each group is
    # one GEMM (M/group, C/group * k) @ (C/group * k, L_out) written straight into the output.
    item = xp.itemsize
    win = np.ndarray((N, C, k, L_out), xp.dtype, xp, 0, (C * Lp * item, Lp * item, dilation * item, stride * item))
    cols = np.empty((N, C, k, L_out), dtype)
    cols[...] = win
    cols = cols.reshape(N, group, Cg * k, L_out)
    Mg = M // group
    wg = w.reshape(group, Mg, Cg * k)
    out = np.empty((N, M, L_out), dtype)
    if group == 1:
        np.matmul(wg[0], cols[:, 0], out=out)
    else:
        out_g = out.reshape(N, group, Mg, L_out)
        for g in range(group):
            np.matmul(wg[g], cols[:, g], out=out_g[:, g])
    if b is not None:
        out += b[:, None]
    return out


def conv_kernels(w: np.ndarray, b: np.ndarray | None, group: int, stride: int, dilation: int, pads: list[int],
                 relu: bool = False, reflect: bool = False) -> list:
    """A float32 Conv's weight (M, C/group, k) and bias (M,) or None as the engine's kernels: one
    ``_kernels.Conv1d`` per group, its weight a C-contiguous (M/group, C/group * k)."""
    M, Cg, k = w.shape
    Mg = M // group
    if b is not None:
        b = np.ascontiguousarray(b)
    return [_kernels.Conv1d(np.ascontiguousarray(wg), None if b is None else b[g * Mg:(g + 1) * Mg], k, stride,
                            dilation, pads[0], pads[1], relu, reflect)
            for g, wg in enumerate(w.reshape(group, Mg, Cg * k))]


def conv1d_f32(x: np.ndarray, kernels: list, M: int, L_out: int) -> np.ndarray:
    """A float32 Conv (checked by the caller) through the engine's kernels (conv_kernels): one call per group, on
    this thread, into (N, M, L_out). A streamed chunk's convolutions are far too small for NumPy's padding, window
    copy and BLAS call to pay."""
    if x.shape[2] > 1 and x.strides[2] != x.itemsize:
        x = np.ascontiguousarray(x)
    if len(kernels) == 1:
        return kernels[0](x)
    N, C, _ = x.shape
    Cg, Mg = C // len(kernels), M // len(kernels)
    out = np.empty((N, M, L_out), np.float32)
    for g, conv in enumerate(kernels):
        conv(x[:, g * Cg:(g + 1) * Cg], out[:, g * Mg:(g + 1) * Mg])
    return out


@op("Pad", 1, pads=(_ints, REQUIRED), mode=(_one_of("constant", "reflect", "edge"), "constant"),
    value=(_float, 0.0), axes=(_opt_ints, None))
def pad(x: np.ndarray, pads: list[int], mode: str, value: float, axes: list[int] | None) -> np.ndarray:
    axes_ = list(range(x.ndim)) if axes is None else list(_axes(axes, x.ndim))
    if len(pads) != 2 * len(axes_):
        raise ValueError(f"Pad: pads {pads} must hold a begin and an end for each of {len(axes_)} axes")
    widths = [(0, 0)] * x.ndim
    for i, a in enumerate(axes_):
        widths[a] = (pads[i], pads[i + len(axes_)])
    if any(p < 0 for p in pads):
        # Negative pads crop (ONNX).
        index = tuple(slice(-lo if lo < 0 else 0, (n + hi) if hi < 0 else n)
                      for (lo, hi), n in zip(widths, x.shape))
        x = x[index]
        widths = [(max(lo, 0), max(hi, 0)) for lo, hi in widths]
    _check_size([n + lo + hi for n, (lo, hi) in zip(x.shape, widths)], "Pad")
    if mode == "constant":
        return np.pad(x, widths, constant_values=x.dtype.type(value) if x.dtype.kind != "b" else bool(value))
    for (lo, hi), n in zip(widths, x.shape):
        if (lo or hi) and (n == 0 or (mode == "reflect" and max(lo, hi) >= n)):
            raise ValueError(f"Pad: {mode} padding of {max(lo, hi)} does not fit an axis of size {n}")
    padded = [a for a, (lo, hi) in enumerate(widths) if lo or hi]
    if mode == "reflect" and len(padded) == 1:
        # One axis reflected (an STFT's framing, per streamed chunk): three slice copies cost far less than np.pad.
        a = padded[0]
        (lo, hi), n = widths[a], x.shape[a]
        out = np.empty(x.shape[:a] + (n + lo + hi,) + x.shape[a + 1:], x.dtype)
        pre = (slice(None),) * a
        out[pre + (slice(lo, lo + n),)] = x
        out[pre + (slice(0, lo),)] = x[pre + (slice(lo, 0, -1),)]
        out[pre + (slice(lo + n, None),)] = x[pre + (slice(n - 2, n - 2 - hi if hi < n - 1 else None, -1),)]
        return out
    return np.pad(x, widths, mode="reflect" if mode == "reflect" else "edge")
