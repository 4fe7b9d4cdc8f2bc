"""The engine's own file: a safetensors file whose metadata describes the architecture.

Tensors are named ``layers.<index>.<argument>`` after the layer constructors' weight arguments, and
``constants.<index>`` for a graph's constants; the metadata holds ``format`` = "lstm_engine",
``format_version``, ``architecture`` (JSON: one ``{"class", "config"}`` per layer), ``metadata`` (JSON: the
model's own metadata, e.g. a vocabulary) and ``dtypes``.

Version 1 is a chain of layers. Version 2 adds ``graph`` (JSON): the model's Graph, whose nodes name
their layers by index into ``architecture`` and whose constants by tensor name::

    {"inputs": [[name, dtype, shape, optional], ...], "outputs": [...], "output_structure": S,
     "nodes": [{"op", "inputs", "outputs", "attrs", "name", "source"}, ...],
     "constants": {value name: tensor name}, "layers": [architecture index, ...]}

where S is an int, ``{"tuple": [S, ...]}`` or ``{"list": [S, ...]}``, and an If node's branches are attrs
``{"graph": {...}}`` of the same form. Chains are still written as version 1. Loading builds only the
layer classes listed here, with arguments checked by their constructors, and only the ops the graph
runtime knows (the graph is validated before it runs); it needs neither torch nor onnx.

Version 3 is a file with quantized layers (lstm_engine.quantize), a chain or a graph: such a layer's
architecture entry adds ``"quantization": {"format", "per_channel"}`` and its quantized weights are stored as
I8 with F32 ``<name>_scale`` row scales, F16, or bfloat16 bits as U16. Engines before quantization refuse the
file by its version; float models keep versions 1 and 2.
"""
from __future__ import annotations

import inspect
import io
import json
import os
from typing import Any, BinaryIO

import numpy as np

from .. import layers as _layers
from ..errors import LoadError, UnsupportedOpError
from ..graph import Graph, Node, ValueInfo
from ..gru import GRU
from ..lstm import LSTM
from ..model import Model
from ..rnn import RNN
from .. import quantize
from ._safetensors import read_safetensors, write_safetensors

FORMAT = "lstm_engine"
FORMAT_VERSION = 2
CHAIN_VERSION = 1  # chains are written as before, so that older lstm_engine releases read them
QUANTIZED_VERSION = 3  # any quantized layer; float models keep 1 and 2 for older engines
READ_VERSIONS = tuple(str(v) for v in (CHAIN_VERSION, FORMAT_VERSION, QUANTIZED_VERSION))
_MAX_DEPTH = 16  # If branches nested in If branches

LAYER_CLASSES = {cls.__name__: cls for cls in (
    LSTM, GRU, RNN, _layers.Embedding, _layers.Dense, _layers.LayerNorm, _layers.BatchNorm,
    _layers.Activation, _layers.Dropout, _layers.Masking)}


# -- writing -------------------------------------------------------------------------------------

def describe(graph: Graph, layers: list | None = None, tensors: dict | None = None) -> dict:
    """A graph as version 2's JSON; its layers are appended to ``layers`` and its constants to ``tensors``."""
    layers = [] if layers is None else layers
    tensors = {} if tensors is None else tensors
    index = []
    for layer in graph.layers:
        found = next((i for i, known in enumerate(layers) if known is layer), None)
        if found is None:
            found = len(layers)
            layers.append(layer)
        index.append(found)
    constants = {}
    for name, value in graph.constants.items():
        key = f"constants.{len(tensors)}"
        tensors[key] = value
        constants[name] = key
    nodes = []
    for node in graph.nodes:
        attrs = {k: {"graph": describe(v, layers, tensors)} if isinstance(v, Graph) else v
                 for k, v in node.attrs.items()}
        nodes.append({"op": node.op, "inputs": node.inputs, "outputs": node.outputs, "attrs": attrs,
                      "name": node.name, "source": node.source})
    return {"inputs": [[v.name, v.dtype, v.shape, v.optional] for v in graph.inputs], "outputs": graph.outputs,
            "output_structure": _encode_structure(graph.output_structure), "nodes": nodes,
            "constants": constants, "layers": index}


def _encode_structure(s: Any) -> Any:
    if isinstance(s, int):
        return s
    return {"tuple" if isinstance(s, tuple) else "list": [_encode_structure(x) for x in s]}


def save(model: Model, path: str | os.PathLike | BinaryIO) -> None:
    """Write a Model to ``path`` (conventionally ``.safetensors``), or to a binary file object such as
    ``io.BytesIO``; ``load`` reads it back identically."""
    if not isinstance(model, Model):
        raise TypeError(f"save: expected an lstm_engine Model, got {type(model).__name__}")
    tensors: dict[str, np.ndarray] = {}
    layers: list = list(model.layers) if model.is_chain else []
    graph_json = None if model.is_chain else describe(model.graph, layers, tensors)
    architecture = []
    for i, layer in enumerate(layers):
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
    metadata = {
        "format": FORMAT,
        "format_version": str(QUANTIZED_VERSION if any(layer.quantization is not None for layer in layers)
                              else CHAIN_VERSION if graph_json is None else FORMAT_VERSION),
        "architecture": json.dumps(architecture),
        "metadata": meta_json,
        "dtypes": json.dumps([str(dt) for dt in model.dtypes]),
    }
    if graph_json is not None:
        metadata["graph"] = json.dumps(graph_json)
    write_safetensors(path, tensors, metadata)


# -- reading -------------------------------------------------------------------------------------

def is_native(metadata: dict[str, str]) -> bool:
    """Whether a safetensors file's metadata says it is the engine's own format."""
    return metadata.get("format") == FORMAT


def _build_layers(path: str, architecture: Any, tensors: dict, dtypes: Any, version: str) -> tuple[list, set]:
    if not isinstance(architecture, list):
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
            if version != str(QUANTIZED_VERSION):
                raise LoadError(f"{path}: layer {i} is quantized in a version {version} file")
            weights, kwargs["quantization"] = quantize.from_file(cls, weights, entry["quantization"],
                                                                 f"{path}: layer {i} ({cls.__name__})")
            kwargs["dtype"] = np.float32
        try:
            built.append(cls(**weights, **kwargs))
        except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: float(10**400) in a config
            raise LoadError(f"{path}: layer {i} ({cls.__name__}): {exc}") from exc
    return built, used


def _fail(path: str, where: str, what: str) -> LoadError:
    return LoadError(f"{path}: graph {where}: {what}")


def _strs(value: Any, path: str, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(path, where, "expected a list of value names")
    return value


def _decode_structure(s: Any, path: str, depth: int = 0) -> Any:
    if depth > 32:
        raise _fail(path, "output_structure", "nests too deep")
    if isinstance(s, int) and not isinstance(s, bool):
        return s
    if isinstance(s, dict) and len(s) == 1 and next(iter(s)) in ("tuple", "list") \
            and isinstance(next(iter(s.values())), list):
        kind, items = next(iter(s.items()))
        items = [_decode_structure(x, path, depth + 1) for x in items]
        return tuple(items) if kind == "tuple" else items
    raise _fail(path, "output_structure", f"unexpected entry {s!r:.80}")


def _decode_graph(d: Any, path: str, tensors: dict, layers: list, used: set, depth: int = 0) -> Graph:
    if depth > _MAX_DEPTH:
        raise _fail(path, "", f"If branches nest deeper than {_MAX_DEPTH}")
    keys = {"inputs", "outputs", "output_structure", "nodes", "constants", "layers"}
    if not isinstance(d, dict) or set(d) != keys:
        raise _fail(path, "", f"expected an object with keys {sorted(keys)}")
    inputs = []
    for i, entry in enumerate(d["inputs"] if isinstance(d["inputs"], list) else [None]):
        if not (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], str)
                and isinstance(entry[1], str) and isinstance(entry[2], list) and isinstance(entry[3], bool)):
            raise _fail(path, f"input {i}", "expected [name, dtype, shape, optional]")
        inputs.append(ValueInfo(entry[0], entry[1], entry[2], entry[3]))
    constants = {}
    if not isinstance(d["constants"], dict):
        raise _fail(path, "constants", "expected an object of value name -> tensor name")
    for name, key in d["constants"].items():
        if not isinstance(key, str) or not key.startswith("constants.") or key not in tensors:
            raise _fail(path, f"constant {name!r}", f"names tensor {key!r}, which the file does not hold")
        if key in used:
            raise _fail(path, f"constant {name!r}", f"tensor {key!r} is used twice")
        used.add(key)
        constants[name] = tensors[key]
    index = d["layers"]
    if not isinstance(index, list) or not all(isinstance(k, int) and not isinstance(k, bool)
                                              and 0 <= k < len(layers) for k in index):
        raise _fail(path, "layers", f"expected indices into the {len(layers)} layers of the architecture")
    nodes = []
    if not isinstance(d["nodes"], list):
        raise _fail(path, "nodes", "expected a list")
    for i, n in enumerate(d["nodes"]):
        fields = {"op", "inputs", "outputs", "attrs", "name", "source"}
        if not isinstance(n, dict) or set(n) != fields or not isinstance(n["op"], str) \
                or not isinstance(n["name"], str) or not isinstance(n["source"], str) \
                or not isinstance(n["attrs"], dict):
            raise _fail(path, f"node {i}", f"expected an object with keys {sorted(fields)}")
        attrs = {}
        for k, v in n["attrs"].items():
            if isinstance(v, dict):
                if set(v) != {"graph"}:
                    raise _fail(path, f"node {n['name']!r} attribute {k!r}", "an object must be {'graph': ...}")
                v = _decode_graph(v["graph"], path, tensors, layers, used, depth + 1)
            attrs[k] = v
        nodes.append(Node(n["op"], _strs(n["inputs"], path, f"node {n['name']!r} inputs"),
                          _strs(n["outputs"], path, f"node {n['name']!r} outputs"), attrs, n["name"], n["source"]))
    return Graph(inputs, _strs(d["outputs"], path, "outputs"), nodes, constants, [layers[k] for k in index],
                 _decode_structure(d["output_structure"], path))


def model_from_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str],
                           dtype: Any = None) -> Model:
    """Rebuild a Model from the tensors and metadata of a native file (already read and validated)."""
    version = metadata.get("format_version")
    if version not in READ_VERSIONS:
        raise LoadError(f"{path}: lstm_engine format version {version!r} is not supported "
                        f"(this lstm_engine reads versions {CHAIN_VERSION} to {QUANTIZED_VERSION}); upgrade lstm_engine")
    try:
        architecture = json.loads(metadata["architecture"])
        model_meta = json.loads(metadata.get("metadata", "{}"))
        dtypes = json.loads(metadata.get("dtypes", '["float32"]')) if dtype is None else dtype
        graph_json = (json.loads(metadata["graph"]) if version == str(FORMAT_VERSION)
                      or (version == str(QUANTIZED_VERSION) and "graph" in metadata) else None)
    except (KeyError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep
        raise LoadError(f"{path}: the architecture{' or graph' if version != '1' else ''} metadata is missing "
                        "or not valid JSON") from exc
    if not isinstance(model_meta, dict):
        raise LoadError(f"{path}: the model metadata must be a JSON object")
    built, used = _build_layers(path, architecture, tensors, dtypes, version)
    try:
        if graph_json is None:
            stray = sorted(set(tensors) - used)
            if stray:
                raise LoadError(f"{path}: tensor {stray[0]!r} belongs to no layer of the architecture")
            return Model(built, metadata=model_meta)
        graph = _decode_graph(graph_json, path, tensors, built, used)
        stray = sorted(set(tensors) - used)
        if stray:
            raise LoadError(f"{path}: tensor {stray[0]!r} belongs to no layer or constant of the graph")
        return Model(graph, metadata=model_meta)
    except UnsupportedOpError as exc:
        raise UnsupportedOpError(exc.op, f"{path}: {exc.source}", exc.supported) from exc
    except LoadError as exc:
        if str(exc).startswith(path):
            raise
        raise LoadError(f"{path}: {exc}") from exc
    except (TypeError, ValueError, MemoryError) as exc:
        raise LoadError(f"{path}: {exc}") from exc


def to_bytes(model: Model) -> bytes:
    """The bytes ``save`` would write to a file: what a pickled Model carries."""
    buffer = io.BytesIO()
    save(model, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes | bytearray | memoryview, dtype: Any = None) -> Model:
    """Rebuild a Model from ``to_bytes`` output, with the same checks as loading a file (never runs code)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"from_bytes: expected bytes, got {type(data).__name__}")
    tensors, metadata = read_safetensors(io.BytesIO(data))
    if not is_native(metadata):
        raise LoadError("<bytes>: not an lstm_engine model (no 'format' metadata)")
    return model_from_safetensors("<bytes>", tensors, metadata, dtype)
