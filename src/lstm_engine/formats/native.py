"""The engine's own file: a safetensors file whose metadata describes the architecture.

Tensors are named ``layers.<index>.<argument>`` after the layer constructors' weight arguments; the
metadata holds ``format`` = "lstm_engine", ``format_version``, ``architecture`` (JSON: one
``{"class", "config"}`` per layer) and ``metadata`` (JSON: the model's own metadata, e.g. a vocabulary).
Loading builds only the layer classes listed here, with arguments checked by their constructors.
"""
from __future__ import annotations

import inspect
import io
import json
import os
from typing import Any, BinaryIO

import numpy as np

from .. import layers as _layers
from ..errors import LoadError
from ..gru import GRU
from ..lstm import LSTM
from ..model import Model
from ..rnn import RNN
from ._safetensors import read_safetensors, write_safetensors

FORMAT = "lstm_engine"
FORMAT_VERSION = 1

LAYER_CLASSES = {cls.__name__: cls for cls in (
    LSTM, GRU, RNN, _layers.Embedding, _layers.Dense, _layers.LayerNorm, _layers.BatchNorm,
    _layers.Activation, _layers.Dropout, _layers.Masking)}


def save(model: Model, path: str | os.PathLike | BinaryIO) -> None:
    """Write a Model to ``path`` (conventionally ``.safetensors``), or to a binary file object such as
    ``io.BytesIO``; ``load`` reads it back identically."""
    if not isinstance(model, Model):
        raise TypeError(f"save: expected an lstm_engine Model, got {type(model).__name__}")
    tensors: dict[str, np.ndarray] = {}
    architecture = []
    for i, layer in enumerate(model.layers):
        name = type(layer).__name__
        if LAYER_CLASSES.get(name) is not type(layer):
            raise TypeError(f"save: layer {i} is a {name}, which the file format does not describe")
        architecture.append({"class": name, "config": layer.config()})
        for arg, value in layer.weights().items():
            tensors[f"layers.{i}.{arg}"] = value
    try:
        meta_json = json.dumps(model.metadata)
    except TypeError as exc:
        raise TypeError(f"save: model.metadata must be JSON-serialisable: {exc}") from exc
    write_safetensors(path, tensors, {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "architecture": json.dumps(architecture),
        "metadata": meta_json,
        "dtypes": json.dumps([str(dt) for dt in model.dtypes]),
    })


def is_native(metadata: dict[str, str]) -> bool:
    """Whether a safetensors file's metadata says it is the engine's own format."""
    return metadata.get("format") == FORMAT


def model_from_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str],
                           dtype: Any = None) -> Model:
    """Rebuild a Model from the tensors and metadata of a native file (already read and validated)."""
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise LoadError(f"{path}: lstm_engine format version {version!r} is not supported "
                        f"(this lstm_engine reads version {FORMAT_VERSION}); upgrade lstm_engine")
    try:
        architecture = json.loads(metadata["architecture"])
        model_meta = json.loads(metadata.get("metadata", "{}"))
        dtypes = json.loads(metadata.get("dtypes", '["float32"]')) if dtype is None else dtype
    except (KeyError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep
        raise LoadError(f"{path}: the architecture metadata is missing or not valid JSON") from exc
    if not isinstance(architecture, list) or not isinstance(model_meta, dict):
        raise LoadError(f"{path}: the architecture metadata must be a list of layers")
    used = set()
    built = []
    for i, entry in enumerate(architecture):
        if not isinstance(entry, dict) or not isinstance(entry.get("class"), str) \
                or entry["class"] not in LAYER_CLASSES \
                or not isinstance(entry.get("config", {}), dict):
            cls_name = entry.get("class") if isinstance(entry, dict) else entry
            raise LoadError(f"{path}: layer {i}: unknown layer class {cls_name!r}; "
                            f"expected one of {sorted(LAYER_CLASSES)}")
        cls = LAYER_CLASSES[entry["class"]]
        prefix = f"layers.{i}."
        weights = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        used.update(prefix + k for k in weights)
        kwargs = dict(entry.get("config", {}))
        if "dtype" in inspect.signature(cls).parameters or weights:
            kwargs["dtype"] = tuple(dtypes) if isinstance(dtypes, list) else dtypes
        try:
            built.append(cls(**weights, **kwargs))
        except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: float(10**400) in a config
            raise LoadError(f"{path}: layer {i} ({cls.__name__}): {exc}") from exc
    stray = sorted(set(tensors) - used)
    if stray:
        raise LoadError(f"{path}: tensor {stray[0]!r} belongs to no layer of the architecture")
    try:
        return Model(built, metadata=model_meta)
    except (TypeError, ValueError) as exc:
        raise LoadError(f"{path}: {exc}") from exc


def load_native(path: str | os.PathLike | BinaryIO, dtype: Any = None) -> Model:
    """Read a file (or binary file object) written by ``save``."""
    name = getattr(path, "name", "<bytes>") if hasattr(path, "read") else os.fspath(path)
    tensors, metadata = read_safetensors(path)
    if not is_native(metadata):
        raise LoadError(f"{name}: not an lstm_engine model file (no 'format' metadata)")
    return model_from_safetensors(name, tensors, metadata, dtype)


def to_bytes(model: Model) -> bytes:
    """The bytes ``save`` would write to a file: what a pickled Model carries."""
    buffer = io.BytesIO()
    save(model, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes | bytearray | memoryview, dtype: Any = None) -> Model:
    """Rebuild a Model from ``to_bytes`` output, with the same checks as loading a file (never runs code)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"from_bytes: expected bytes, got {type(data).__name__}")
    return load_native(io.BytesIO(data), dtype)
