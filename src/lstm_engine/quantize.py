"""Smaller weights: int8 dynamic quantization and float16/bfloat16 storage.

    q = le.quantize(model, "int8")                   # or "float16", "bfloat16"
    q = le.quantize(model, "int8", keep_float=["Dense"], per_channel=True)

int8: the weights of recurrent layers (weight_ih, weight_hh, weight_hr), Dense heads and Embeddings
become int8 with symmetric scales, one per output row (``per_channel=True``) or one per matrix and
direction. Activations are quantized at every call, per row (per batch row and step), and the int32
products dequantized into the float32 gate loops, which do not change. float16/bfloat16: the
weights are stored in 16 bits and widened in the micro-kernel; sums in float32. Biases and
normalisation layers stay float32. A quantized model runs float32 inputs; ``le.save`` keeps it.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Iterable

import numpy as np

from . import _kernels
from .errors import LoadError

WEIGHT_FORMATS = ("int8", "float16", "bfloat16")

# The weights each layer class stores quantized (biases and the rest stay float32).
QUANTIZED_WEIGHTS = {
    "LSTM": ("weight_ih", "weight_hh", "weight_hr"),
    "GRU": ("weight_ih", "weight_hh"),
    "RNN": ("weight_ih", "weight_hh"),
    "Dense": ("weight",),
    "Embedding": ("weight",),
}


def _quantize_array(w: np.ndarray, fmt: str, per_channel: bool, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(stored array, int8 row scales or None) for a float weight; recurrent weights carry a direction axis."""
    w = np.asarray(w, np.float32)
    if not np.all(np.isfinite(w)):
        raise ValueError(f"quantize: {where} has non-finite values; only finite weights can be quantized")
    if fmt == "int8":
        if per_channel:
            amax = np.abs(w).max(axis=-1)
        else:
            # One scale per matrix (and per direction for a recurrent weight), repeated for each row.
            axes = tuple(range(w.ndim))[-2:] if w.ndim == 3 else tuple(range(w.ndim))
            amax = np.broadcast_to(np.abs(w).max(axis=axes, keepdims=True), w.shape).max(axis=-1)
        scale = (amax / 127).astype(np.float32)
        safe = np.where(scale > 0, scale, 1)
        q = np.clip(np.rint(w / safe[..., None]), -127, 127).astype(np.int8)
        return q, np.ascontiguousarray(scale)
    if fmt == "float16":
        with np.errstate(over="ignore"):  # values past 65504 become inf, refused just below
            h = w.astype(np.float16)
        if not np.all(np.isfinite(h)):
            raise ValueError(f"quantize: {where} has values beyond float16's range (65504); use bfloat16 or int8")
        return h, None
    # bfloat16: the top 16 bits of float32, rounded to nearest even.
    u = w.view(np.uint32).astype(np.uint64)
    b = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    if np.any((b & 0x7F80) == 0x7F80):
        raise ValueError(f"quantize: {where} has values beyond bfloat16's range")
    return b, None


def _dequantize(fmt: str, stored: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    if fmt == "int8":
        return stored.astype(np.float32) * scale[..., None]
    if fmt == "float16":
        return stored.astype(np.float32)
    return (stored.astype(np.uint32) << 16).view(np.float32)


def _bits(fmt: str, stored: np.ndarray) -> np.ndarray:
    """What PackedWeight takes: int8 values, or the uint16 bit patterns of a half float."""
    return stored.view(np.uint16) if fmt == "float16" else stored


class Quantization:
    """How one layer's weights are kept: the format, the scale granularity, and per weight the stored array
    (int8, float16 or bfloat16 bits as uint16) and, for int8, the float32 scales of its rows."""

    def __init__(self, fmt: str, per_channel: bool, stored: dict[str, np.ndarray],
                 scales: dict[str, np.ndarray]) -> None:
        self.format = fmt
        self.per_channel = bool(per_channel)
        self.stored = stored
        self.scales = scales

    @classmethod
    def of(cls, fmt: str, per_channel: bool, weights: dict[str, np.ndarray], where: str) -> "Quantization":
        stored, scales = {}, {}
        for name, w in weights.items():
            stored[name], scale = _quantize_array(w, fmt, per_channel, f"{where} {name}")
            if scale is not None:
                scales[name] = scale
        return cls(fmt, per_channel, stored, scales)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.stored.values()) + sum(a.nbytes for a in self.scales.values())

    def dequantized(self) -> dict[str, np.ndarray]:
        """The float32 weights the quantized ones stand for (what ``weights()`` reports)."""
        return {name: _dequantize(self.format, a, self.scales.get(name)) for name, a in self.stored.items()}

    def packed(self, name: str, direction: int | None = None, rows: slice = slice(None)) -> _kernels.PackedWeight:
        a = self.stored[name]
        s = self.scales.get(name)
        if direction is not None:
            a, s = a[direction], None if s is None else s[direction]
        a = np.ascontiguousarray(_bits(self.format, a[rows]))
        return _kernels.PackedWeight(self.format, a, None if s is None else np.ascontiguousarray(s[rows]))

    def recurrent_directions(self, layer: Any) -> list[dict]:
        """Per direction the packed products RecurrentKernel takes (GRU with reset before: r, z rows apart from n)."""
        out = []
        H = layer.hidden_size
        split = type(layer).__name__ == "GRU" and not layer.reset_after
        for d in range(layer.num_directions):
            entry = {"ih": self.packed("weight_ih", d)}
            if split:
                entry["hh"] = self.packed("weight_hh", d, slice(0, 2 * H))
                entry["hn"] = self.packed("weight_hh", d, slice(2 * H, 3 * H))
            else:
                entry["hh"] = self.packed("weight_hh", d)
            if "weight_hr" in self.stored:
                entry["hr"] = self.packed("weight_hr", d)
            out.append(entry)
        return out

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Embedding rows for token ids, widened to float32."""
        rows = self.stored["weight"].take(ids, axis=0)
        return _dequantize(self.format, rows, None if self.format != "int8" else self.scales["weight"].take(ids))

    def config(self) -> dict:
        return {"format": self.format, "per_channel": self.per_channel}

    def file_tensors(self) -> dict[str, np.ndarray]:
        """The arrays ``le.save`` writes: each weight, and ``<name>_scale`` for int8."""
        out = dict(self.stored)
        out.update({f"{name}_scale": s for name, s in self.scales.items()})
        return out


def _selected(keep_float: Iterable[Any], layers: list) -> set[int]:
    """Layer indices named by keep_float: an index, "layers.N", or a class name such as "Dense"."""
    if isinstance(keep_float, (str, int)):
        keep_float = [keep_float]
    names = [type(layer).__name__ for layer in layers]
    out: set[int] = set()
    for item in keep_float:
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            if not -len(layers) <= item < len(layers):
                raise ValueError(f"quantize: keep_float index {item} is out of range for {len(layers)} layers")
            out.add(int(item) % len(layers))
        elif isinstance(item, str) and item.startswith("layers.") and item[7:].isdigit() \
                and int(item[7:]) < len(layers):
            out.add(int(item[7:]))
        elif isinstance(item, str) and item.lower() in (n.lower() for n in names):
            out.update(i for i, n in enumerate(names) if n.lower() == item.lower())
        else:
            listing = ", ".join(f"layers.{i} ({n})" for i, n in enumerate(names))
            raise ValueError(f"quantize: keep_float entry {item!r} names no layer; the model has {listing}")
    return out


def _rebuild(layer: Any, weights: dict, **extra: Any) -> Any:
    """A fresh float32 copy of a layer (layers are not shared between models: threads are set per model)."""
    cls = type(layer)
    kwargs = dict(layer.config())
    if weights or "dtype" in inspect.signature(cls).parameters:
        kwargs["dtype"] = np.float32
    return cls(**weights, **kwargs, **extra)


def quantize(model: Any, dtype: str = "int8", *, keep_float: Iterable[Any] = (), per_channel: bool = True) -> Any:
    """A new Model whose LSTM/GRU/RNN, Dense and Embedding weights are stored as ``dtype``.

    dtype: "int8" (dynamic quantization), "float16" or "bfloat16". ``keep_float`` lists layers left
    float32: indices, "layers.N", or class names ("Dense", "Embedding"). ``per_channel=False`` uses one
    int8 scale per matrix (and direction) instead of one per output row. The model runs float32 inputs.
    """
    from .model import Model

    if not isinstance(model, Model):
        raise TypeError(f"quantize: expected an lstm_engine Model, got {type(model).__name__}")
    if dtype not in WEIGHT_FORMATS:
        raise ValueError(f"quantize: dtype must be one of {WEIGHT_FORMATS}, got {dtype!r}")
    keep = _selected(keep_float, model.layers)
    layers = []
    for i, layer in enumerate(model.layers):
        if getattr(layer, "quantization", None) is not None:
            raise ValueError(f"quantize: layers.{i} ({layer!r}) is already stored as "
                             f"{layer.quantization.format}; quantize the float model")
        weights = layer.weights()
        names = [n for n in QUANTIZED_WEIGHTS.get(type(layer).__name__, ()) if n in weights]
        if i in keep or not names:
            layers.append(_rebuild(layer, weights))
            continue
        for n in names:
            if weights[n].shape[-1] > _kernels.MAX_QUANT_COLUMNS:
                raise ValueError(f"quantize: layers.{i} {n} has {weights[n].shape[-1]} columns; at most "
                                 f"{_kernels.MAX_QUANT_COLUMNS} can be quantized")
        q = Quantization.of(dtype, per_channel, {n: weights[n] for n in names}, f"layers.{i} ({type(layer).__name__})")
        layers.append(_rebuild(layer, {**weights, **q.dequantized()}, quantization=q))
    if model.is_chain:
        return Model(layers, metadata=dict(model.metadata), threads=model.threads)
    # A graph: the same nodes on the new layers (layers of If branches' own graphs stay as they are).
    return Model(dataclasses.replace(model.graph, layers=layers), metadata=dict(model.metadata),
                 threads=model.threads)


# -- the engine's file ---------------------------------------------------------------------------

def layer_tensors(layer: Any) -> dict[str, np.ndarray]:
    """The tensors ``le.save`` writes for a layer: its float weights, with the quantized ones as stored."""
    q = layer.quantization
    return {**{k: v for k, v in layer.weights().items() if k not in q.stored}, **q.file_tensors()}


def from_file(cls: type, tensors: dict[str, np.ndarray], info: Any, where: str) -> tuple[dict, "Quantization"]:
    """Check a quantized layer's tensors from an engine file: (float weights for the constructor, Quantization).

    Raises LoadError naming the tensor for a wrong dtype or shape, a missing or stray scale, scales that
    are not finite and >= 0, int8 values outside [-127, 127], or half floats that are not finite."""
    if not isinstance(info, dict) or info.get("format") not in WEIGHT_FORMATS \
            or not isinstance(info.get("per_channel"), bool):
        raise LoadError(f"{where}: quantization must be {{'format': one of {WEIGHT_FORMATS}, 'per_channel': bool}}, "
                        f"got {info!r}")
    fmt = info["format"]
    names = [n for n in QUANTIZED_WEIGHTS.get(cls.__name__, ()) if n in tensors]
    if not names:
        raise LoadError(f"{where}: a quantized {cls.__name__} needs its weights "
                        f"{QUANTIZED_WEIGHTS.get(cls.__name__, ())}; found {sorted(tensors)}")
    ndim = 3 if cls.__name__ in ("LSTM", "GRU", "RNN") else 2
    stored, scales = {}, {}
    for name in names:
        a = tensors[name]
        want = {"int8": np.int8, "float16": np.float32, "bfloat16": np.uint16}[fmt]
        if a.dtype != want or a.ndim != ndim or 0 in a.shape:
            shown = {"int8": "I8", "float16": "F16", "bfloat16": "U16 (bfloat16 bits)"}[fmt]
            raise LoadError(f"{where}: {name} of a {fmt} layer must be a non-empty {ndim}-D {shown} tensor, "
                            f"got {a.dtype} of shape {a.shape}")
        if a.shape[-1] > _kernels.MAX_QUANT_COLUMNS:
            raise LoadError(f"{where}: {name} has {a.shape[-1]} columns, over {_kernels.MAX_QUANT_COLUMNS}")
        if fmt == "int8":
            s = tensors.get(f"{name}_scale")
            if s is None:
                raise LoadError(f"{where}: {name}_scale is missing (an int8 weight needs its row scales)")
            if s.dtype != np.float32 or s.shape != a.shape[:-1]:
                raise LoadError(f"{where}: {name}_scale must be F32 of shape {a.shape[:-1]}, got {s.dtype} "
                                f"of shape {s.shape}")
            if not np.all(np.isfinite(s) & (s >= 0)):
                raise LoadError(f"{where}: {name}_scale has scales that are not finite and >= 0")
            if int(a.min()) < -127:
                raise LoadError(f"{where}: {name} has -128; symmetric int8 weights lie in [-127, 127]")
            scales[name] = s
        elif fmt == "float16":
            with np.errstate(over="ignore"):
                h = a.astype(np.float16)
            if not np.all(np.isfinite(h)):
                raise LoadError(f"{where}: {name} has non-finite float16 values")
            a = h
        elif np.any((a & 0x7F80) == 0x7F80):
            raise LoadError(f"{where}: {name} has non-finite bfloat16 values")
        stored[name] = a
    stray = sorted(k for k in tensors if k.endswith("_scale") and k[:-6] not in scales)
    if stray:
        raise LoadError(f"{where}: tensor {stray[0]!r} is the scale of no int8 weight")
    q = Quantization(fmt, info["per_channel"], stored, scales)
    floats = {k: v for k, v in tensors.items() if k not in stored and not k.endswith("_scale")}
    return {**floats, **q.dequantized()}, q
