"""The engine's own file: a safetensors file whose metadata describes the architecture.

Tensors are named ``layers.<index>.<argument>`` after the layer constructors' weight arguments; the
metadata holds ``format`` = "lstm_engine", ``format_version``, ``architecture`` (JSON: one
``{"class", "config"}`` per layer) and ``metadata`` (JSON: the model's own metadata, e.g. a vocabulary).
A quantized layer (lstm_engine.quantize) adds ``"quantization": {"format", "per_channel"}`` to its entry
and stores those weights as I8 with F32 ``<name>_scale`` row scales, F16, or bfloat16 bits as U16;
such files are version 2, which engines before quantization refuse by their version check.
Loading builds only the layer classes listed here, with arguments checked by their constructors.
"""
from __future__ import annotations

import inspect
import json
import os
from typing import Any

import numpy as np

from .. import layers as _layers
from ..errors import LoadError
from ..gru import GRU
from ..lstm import LSTM
from ..model import Model
from ..rnn import RNN
from .. import quantize
from ._safetensors import read_safetensors, write_safetensors

FORMAT = "lstm_engine"
FORMAT_VERSION = 1
QUANTIZED_FORMAT_VERSION = 2  # files with quantized layers; float models stay version 1 for older engines
READ_VERSIONS = (str(FORMAT_VERSION), str(QUANTIZED_FORMAT_VERSION))

LAYER_CLASSES = {cls.__name__: cls for cls in (
    LSTM, GRU, RNN, _layers.Embedding, _layers.Dense, _layers.LayerNorm, _layers.BatchNorm,
    _layers.Activation, _layers.Dropout, _layers.Masking)}


def save(model: Model, path: str | os.PathLike) -> None:
    """Write a Model to ``path`` (conventionally ``.safetensors``); ``load`` reads it back identically."""
    if not isinstance(model, Model):
        raise TypeError(f"save: expected an lstm_engine Model, got {type(model).__name__}")
    tensors: dict[str, np.ndarray] = {}
    architecture = []
    for i, layer in enumerate(model.layers):
        name = type(layer).__name__
        if LAYER_CLASSES.get(name) is not type(layer):
            raise TypeError(f"save: layer {i} is a {name}, which the file format does not describe")
        entry = {"class": name, "config": layer.config()}
        stored = layer.weights()
        if layer.quantization is not None:
            entry["quantization"] = layer.quantization.config()
            stored = quantize.layer_tensors(layer)
        architecture.append(entry)
        for arg, value in stored.items():
            tensors[f"layers.{i}.{arg}"] = value
    try:
        meta_json = json.dumps(model.metadata)
    except TypeError as exc:
        raise TypeError(f"save: model.metadata must be JSON-serialisable: {exc}") from exc
    write_safetensors(path, tensors, {
        "format": FORMAT,
        "format_version": str(QUANTIZED_FORMAT_VERSION if any(layer.quantization is not None
                                                              for layer in model.layers) else FORMAT_VERSION),
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
    if version not in READ_VERSIONS:
        raise LoadError(f"{path}: lstm_engine format version {version!r} is not supported "
                        f"(this lstm_engine reads versions {', '.join(READ_VERSIONS)}); upgrade lstm_engine")
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
        if "quantization" in entry:
            if version != str(QUANTIZED_FORMAT_VERSION):
                raise LoadError(f"{path}: layer {i} is quantized in a version {version} file")
            weights, kwargs["quantization"] = quantize.from_file(cls, weights, entry["quantization"],
                                                                 f"{path}: layer {i} ({cls.__name__})")
            kwargs["dtype"] = np.float32
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


def load_native(path: str | os.PathLike, dtype: Any = None) -> Model:
    """Read a file written by ``save``."""
    tensors, metadata = read_safetensors(path)
    if not is_native(metadata):
        raise LoadError(f"{os.fspath(path)}: not an lstm_engine model file (no 'format' metadata)")
    return model_from_safetensors(os.fspath(path), tensors, metadata, dtype)
