"""The layers real models put around the recurrent ones: embeddings, dense heads, normalisation.

Weights use PyTorch's layout (Dense weight is (out_features, in_features)); the Keras loader
transposes once at load.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import numpy as np

from . import _kernels, activations
from ._base import SMALL_PRODUCT_FLOPS, Layer, one_blas_thread, as_dtypes, as_weight


class _Weighted(Layer):
    """A layer whose weights are kept once per dtype it serves."""

    def _keep(self, dtype: Any, **arrays: Any) -> None:
        self.dtypes = as_dtypes(dtype)
        wide = max(self.dtypes, key=lambda d: d.itemsize)
        self._weights = {}
        for name, value in arrays.items():
            ndim = self._ndims[name]
            self._weights[name] = None if value is None else as_weight(
                value, f"{type(self).__name__} {name}", (ndim,), wide)
        self._by_dtype = {
            dt: {k: (None if v is None else v.astype(dt, copy=False)) for k, v in self._weights.items()}
            for dt in self.dtypes
        }

    def weights(self) -> dict[str, np.ndarray]:
        w = {k: v for k, v in self._weights.items() if v is not None}
        return w if self.quantization is None else {**w, **self.quantization.dequantized()}

    def _store_quantized(self, quantization: Any) -> None:
        """Keep the quantized weights instead of the float ones (lstm_engine.quantize)."""
        if self.dtypes != (np.dtype(np.float32),):
            raise ValueError(f"{type(self).__name__}: a quantized layer runs float32 only")
        self.quantization = quantization
        for name in quantization.stored:
            self._weights[name] = None
            for w in self._by_dtype.values():
                w[name] = None


class Embedding(_Weighted):
    """Token ids (B, T) -> vectors (B, T, embedding_dim) from weight (num_embeddings, embedding_dim).

    ``mask_zero`` (Keras) marks id 0 as padding: those steps are masked for the layers that follow.
    """

    accepts_ids = True
    _ndims = {"weight": 2}

    def __init__(self, weight: Any, *, mask_zero: bool = False, dtype: Any = np.float32,
                 quantization: Any = None) -> None:
        self._keep(dtype, weight=weight)
        self.num_embeddings, self.embedding_dim = self._weights["weight"].shape
        self.input_size = None
        self.output_size = self.embedding_dim
        self.mask_zero = bool(mask_zero)
        if quantization is not None:
            self._store_quantized(quantization)

    def check_ids(self, ids: np.ndarray, name: str = "x") -> np.ndarray:
        """Validate token ids: an integer array with every id in [0, num_embeddings)."""
        if ids.dtype.kind not in "iu":
            raise TypeError(f"{name}: token ids must be integers, got dtype {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_embeddings):
            bad = ids[(ids < 0) | (ids >= self.num_embeddings)].flat[0]
            raise ValueError(f"{name}: token id {bad} is out of range [0, {self.num_embeddings})")
        return ids

    def embed(self, ids: np.ndarray, dtype: np.dtype) -> np.ndarray:
        """Look up valid ids of any shape."""
        if self.quantization is not None:
            return self.quantization.embed(ids)
        return self._by_dtype[dtype]["weight"].take(ids, axis=0)

    def forward(self, x: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        raise TypeError("Embedding takes token ids: it must be a Model's first layer")

    def config(self) -> dict:
        return {"mask_zero": self.mask_zero}


class Dense(_Weighted):
    """y = activation(x @ weight.T + bias) over the last axis; weight (out_features, in_features).

    Also Keras TimeDistributed(Dense) and PyTorch Linear. ``activation``: linear, relu, tanh,
    sigmoid, softmax and the other names in ``activations``.
    """

    _ndims = {"weight": 2, "bias": 1}

    def __init__(self, weight: Any, bias: Any = None, *, activation: str | None = "linear",
                 dtype: Any = np.float32, quantization: Any = None) -> None:
        self._keep(dtype, weight=weight, bias=bias)
        self.output_size, self.input_size = self._weights["weight"].shape
        self._packed = None
        self.threads = _kernels.cpu_count()  # the model's: the products run on the engine's threads
        if quantization is not None:
            self._store_quantized(quantization)
            self._packed = quantization.packed("weight")
        b = self._weights["bias"]
        if b is not None and b.shape != (self.output_size,):
            raise ValueError(f"Dense bias: expected shape ({self.output_size},), got {b.shape}")
        self.activation = "softmax" if activation == "softmax" else activations.canonical(activation)

    def forward(self, x: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        w = self._by_dtype[x.dtype]
        if self._packed is not None:
            rows = np.ascontiguousarray(x).reshape(-1, self.input_size)
            y = _kernels.dense_packed(self._packed, rows, w["bias"], np.empty((rows.shape[0], self.output_size),
                                      np.float32), self.threads).reshape(x.shape[:-1] + (self.output_size,))
        elif x.dtype == np.float32 and x.size == x.shape[-1] and x.flags.c_contiguous:
            # One row (a batch-1 step): the engine's GEMV on its own threads, not a BLAS call's.
            y = _kernels.dense_row(w["weight"], x, w["bias"], np.empty(x.shape[:-1] + (self.output_size,), x.dtype),
                                   self.threads)
        else:
            with one_blas_thread() if 2 * x.size * self.output_size < SMALL_PRODUCT_FLOPS else nullcontext():
                y = x @ w["weight"].T
            if w["bias"] is not None:
                y += w["bias"]
        return activations.apply(self.activation, y), mask

    def config(self) -> dict:
        return {"activation": self.activation}


class LayerNorm(_Weighted):
    """Normalise over the last axis: (x - mean) / sqrt(var + eps) * weight + bias (PyTorch, Keras)."""

    _ndims = {"weight": 1, "bias": 1}

    def __init__(self, weight: Any = None, bias: Any = None, *, normalized_shape: int | None = None,
                 eps: float = 1e-5, dtype: Any = np.float32) -> None:
        self._keep(dtype, weight=weight, bias=bias)
        sizes = {v.shape[0] for v in self._weights.values() if v is not None}
        if normalized_shape is not None:
            sizes.add(int(normalized_shape))
        if len(sizes) > 1:
            raise ValueError(f"LayerNorm: weight, bias and normalized_shape disagree on the size: {sorted(sizes)}")
        # Without weights or a given shape, any width works.
        self.input_size = self.output_size = sizes.pop() if sizes else None
        self.eps = float(eps)

    def forward(self, x: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        w = self._by_dtype[x.dtype]
        mean = x.mean(axis=-1, keepdims=True)
        var = x.var(axis=-1, keepdims=True)
        y = (x - mean) / np.sqrt(var + x.dtype.type(self.eps))
        if w["weight"] is not None:
            y *= w["weight"]
        if w["bias"] is not None:
            y += w["bias"]
        return y, mask

    def config(self) -> dict:
        return {"normalized_shape": self.input_size, "eps": self.eps}


class BatchNorm(_Weighted):
    """Inference-time batch normalisation over the last axis with the stored running statistics."""

    _ndims = {"running_mean": 1, "running_var": 1, "weight": 1, "bias": 1}

    def __init__(self, running_mean: Any, running_var: Any, weight: Any = None, bias: Any = None, *,
                 eps: float = 1e-5, dtype: Any = np.float32) -> None:
        self._keep(dtype, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
        sizes = {v.shape[0] for v in self._weights.values() if v is not None}
        if len(sizes) != 1:
            raise ValueError(f"BatchNorm: statistics and affine weights disagree on the size: {sorted(sizes)}")
        self.input_size = self.output_size = sizes.pop()
        self.eps = float(eps)
        # Folded once into one scale and shift.
        for dt, w in self._by_dtype.items():
            scale = 1.0 / np.sqrt(self._weights["running_var"] + self.eps)
            if self._weights["weight"] is not None:
                scale = scale * self._weights["weight"]
            shift = -self._weights["running_mean"] * scale
            if self._weights["bias"] is not None:
                shift = shift + self._weights["bias"]
            w["scale"], w["shift"] = scale.astype(dt), shift.astype(dt)

    def forward(self, x: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        w = self._by_dtype[x.dtype]
        return x * w["scale"] + w["shift"], mask

    def config(self) -> dict:
        return {"eps": self.eps}


class Activation(Layer):
    """An activation function as a layer (PyTorch's nn.Tanh, nn.ReLU...; Keras Activation)."""

    def __init__(self, activation: str) -> None:
        self.activation = "softmax" if activation == "softmax" else activations.canonical(activation)

    def forward(self, x: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        return activations.apply(self.activation, x.copy()), mask

    def config(self) -> dict:
        return {"activation": self.activation}


class Dropout(Layer):
    """Dropout does nothing at inference; kept so a model's layer list reads like its source."""

    def forward(self, x: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        return x, mask


class Masking(Layer):
    """Keras Masking: a step is valid where any feature differs from mask_value; masked inputs become 0."""

    def __init__(self, mask_value: float = 0.0) -> None:
        self.mask_value = float(mask_value)

    def forward(self, x: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        valid = np.any(x != self.mask_value, axis=-1)
        y = x * valid[..., None].astype(x.dtype)
        return y, valid

    def config(self) -> dict:
        return {"mask_value": self.mask_value}
