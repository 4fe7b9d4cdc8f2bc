"""Read Keras model files into a framework-free description, without importing Keras.

Three containers are understood:

* ``.keras`` archives (Keras 3): a zip of ``config.json``, ``metadata.json`` and ``model.weights.h5`` (or
  ``model.weights.npz``). Weights live under ``layers/<group>/.../vars/<i>`` where ``<group>`` is the snake_case
  class name with ``_1``, ``_2``… suffixes in layer order (Keras's saving_lib), never the user's layer name.
* legacy full-model ``.h5`` (tf.keras 2, Keras 2.2, or Keras 3's ``model.save("m.h5")``): root attribute
  ``model_config`` and group ``model_weights`` whose layer groups list their tensors in ``weight_names``.
* ``.weights.h5`` (Keras 3 weights only, same layout as inside a ``.keras``) or a legacy weights-only ``.h5``,
  together with the model config passed as ``config=`` (a dict, a JSON string, or a path to ``model.to_json()``).

The result, :class:`KerasModelSpec`, lists the layers in execution order with their config and their weights
under canonical names (``kernel``, ``recurrent_kernel``, ``bias``, ``forward/kernel``…); a later step maps it to
engine layers. Every problem with the file is raised as :class:`~lstm_engine.errors.LoadError` naming the file
and, where one is at fault, the layer and the tensor.
"""

from __future__ import annotations

import copy
import io
import json
import mmap
import os
import re
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.lib.format as npy_format

from ..errors import LoadError
from . import _HDF5_SIGNATURE, _INFLATION_FLOOR, _MAX_INFLATION, numpy_pickle

__all__ = ["KerasLayerSpec", "KerasMask", "KerasModelSpec", "read_keras"]

_H5PY_MISSING = ("reading Keras files needs h5py: pip install h5py "
                 "(from an lstm_engine checkout: pip install '.[keras]')")

_RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "SimpleRNN": 1}

# Layers without weights whose output has the same last dimension as their input.
_PASSTHROUGH = frozenset(
    {
        "InputLayer",
        "Masking",
        "Dropout",
        "SpatialDropout1D",
        "GaussianNoise",
        "GaussianDropout",
        "AlphaDropout",
        "Activation",
        "ActivityRegularization",
    }
)

_MODEL_CLASSES = frozenset({"Sequential", "Functional", "Model"})

# Layer classes this reader knows. In a legacy .h5, an entry of another class that the file does not list as
# a layer is an op.
_KNOWN_LAYERS = frozenset(
    set(_RECURRENT_GATES)
    | _PASSTHROUGH
    | {"Bidirectional", "TimeDistributed", "Embedding", "Dense", "LayerNormalization", "BatchNormalization"}
)

# tf.keras 2 wraps TensorFlow functions called on symbolic tensors in these layer classes.
_TF_OP_LAYERS = frozenset({"TFOpLambda", "SlicingOpLambda"})
# Keras 3 op classes that can appear in a mask computation; listed because legacy .h5 configs omit "module".
_KERAS3_MASK_OPS = frozenset({"NotEqual", "Any"})
_NOT_EQUAL_FUNCTIONS = frozenset({"math.not_equal", "not_equal"})
_REDUCE_ANY_FUNCTIONS = frozenset({"math.reduce_any", "reduce_any"})



@dataclass(frozen=True)
class KerasMask:
    """An explicit ``mask=`` argument, rebuilt from the op layers that computed it.

    mask[b, t] = any(out[b, t, :] != value) when ``reduce_last_axis`` (what ``Masking(value)`` computes),
    else out[b, t] != value (what ``Embedding(mask_zero=True)`` computes on ids with value 0), where ``out``
    is the output of layer ``source`` (a layer of the chain, possibly the InputLayer).
    """

    source: str
    value: float
    reduce_last_axis: bool
    ops: tuple[str, ...] = ()


@dataclass
class KerasLayerSpec:
    """One Keras layer: class, name, normalised config and weights under canonical names."""

    class_name: str
    name: str
    config: dict[str, Any]
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    explicit_mask: KerasMask | None = None


@dataclass
class KerasModelSpec:
    """A Keras model read from a file: provenance, input, and its layers in execution order.

    ``input_shape`` includes the batch dimension, as ``model.input_shape`` does: ``(None, T, F)``; ``input_dtype``
    is the InputLayer's dtype (``"int32"`` for token ids) when the config has one.
    ``source_format`` is ``".keras"``, ``"h5"`` (legacy, full model or weights only) or ``"weights.h5"``.
    """

    keras_version: str | None
    backend: str | None
    source_format: str
    model_class: str
    input_shape: tuple[int | None, ...] | None
    layers: list[KerasLayerSpec]
    input_dtype: str | None = None


def read_keras(path: str | os.PathLike, config: dict | str | os.PathLike | None = None) -> KerasModelSpec:
    """Read a ``.keras`` archive, a legacy ``.h5`` or a ``.weights.h5`` (with ``config``) into a KerasModelSpec.

    ``config`` is required for weights-only files and, when given, replaces any config stored in the file.
    """
    path = os.fspath(path)
    try:
        if os.path.isdir(path):
            return _read_keras_dir(path, config)
        from . import ZIP_KINDS, detect

        kind = detect(path)
        if kind in ZIP_KINDS:
            return _read_keras_archive(path, config)
        if kind == "hdf5":
            return _read_h5(path, config)
        raise LoadError(f"{path}: not a Keras file: expected a .keras zip archive or an HDF5 file")
    except LoadError:
        raise
    except Exception as e:  # noqa: BLE001 - the contract is "LoadError, never a crash" for any damaged input
        raise LoadError(f"{path}: unreadable Keras file ({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------------------------------------
# Containers


def _import_h5py():
    """Import h5py on first use, so that the rest of the engine does not need it."""
    try:
        import h5py
    except ImportError as e:
        raise LoadError(_H5PY_MISSING) from e
    return h5py


def _read_keras_archive(path: str, config) -> KerasModelSpec:
    """Read a zipped ``.keras`` archive."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise LoadError(f"{path}: not a readable .keras zip archive: {e}") from e
    with archive:
        names = set(archive.namelist())

        def member(name: str) -> bytes | None:
            """One archive member's bytes, or None when absent."""
            if name not in names:
                return None
            return _zip_member(archive, name, path)

        return _read_keras_v3(path, config, member)


def _read_keras_dir(path: str, config) -> KerasModelSpec:
    """Read an unzipped ``.keras`` directory (``save_model(..., zipped=False)``)."""

    def member(name: str) -> bytes | None:
        """One file's bytes, or None when absent."""
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            return None
        try:
            with open(full, "rb") as f:
                return f.read()
        except OSError as e:
            raise LoadError(f"{path}: cannot read {name}: {e}") from e

    return _read_keras_v3(path, config, member)


def _zip_member(archive: zipfile.ZipFile, name: str, path: str) -> bytes:
    """Read one archive member, refusing decompression bombs and reporting damage as LoadError."""
    info = archive.getinfo(name)
    if info.file_size > _INFLATION_FLOOR and info.file_size > _MAX_INFLATION * max(info.compress_size, 1):
        raise LoadError(f"{path}: archive member {name!r} claims {info.file_size} bytes from {info.compress_size}")
    try:
        return archive.read(name)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError) as e:
        raise LoadError(f"{path}: archive member {name!r} is damaged: {e}") from e


def _read_keras_v3(path: str, config, member) -> KerasModelSpec:
    """Read a ``.keras`` archive or directory through ``member(name) -> bytes | None``."""
    if config is None:
        raw = member("config.json")
        if raw is None:
            raise LoadError(f"{path}: .keras archive has no config.json")
        model_config = _parse_json(raw, f"{path}: config.json")
    else:
        model_config = _load_config_arg(config)
    keras_version = None
    raw_meta = member("metadata.json")
    if raw_meta is not None:
        meta = _parse_json(raw_meta, f"{path}: metadata.json")
        if isinstance(meta, dict) and isinstance(meta.get("keras_version"), str):
            keras_version = meta["keras_version"]

    raw_h5 = member("model.weights.h5")
    if raw_h5 is not None:
        h5py = _import_h5py()
        _check_global_heaps(raw_h5, f"{path}: model.weights.h5")
        try:
            h5 = h5py.File(io.BytesIO(raw_h5), "r")
        except (OSError, ValueError) as e:
            raise LoadError(f"{path}: model.weights.h5 is not a readable HDF5 file: {e}") from e
        with h5:
            store = _H5VarStore(h5)
            return _build_spec(path, model_config, store, keras_version, None, ".keras", None)
    raw_npz = member("model.weights.npz")
    if raw_npz is not None:
        store = _NpzVarStore(_read_keras_npz(raw_npz, path))
        return _build_spec(path, model_config, store, keras_version, None, ".keras", None)
    if member("model.weights.json") is not None:
        raise LoadError(f"{path}: sharded .keras weights (model.weights.json) are not supported")
    raise LoadError(f"{path}: .keras archive has neither model.weights.h5 nor model.weights.npz")


def _read_h5(path: str, config) -> KerasModelSpec:
    """Read an HDF5 file: legacy full model or weights, or Keras 3 ``.weights.h5``."""
    h5py = _import_h5py()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as image:
        _check_global_heaps(image, path)
    try:
        h5 = h5py.File(path, "r")
    except (OSError, ValueError) as e:
        raise LoadError(f"{path}: not a readable HDF5 file: {e}") from e
    with h5:
        keras_version = _attr_str(h5, "keras_version")
        backend = _attr_str(h5, "backend")
        if config is not None:
            model_config = _load_config_arg(config)
        else:
            raw = _attr_str(h5, "model_config")
            if raw is None:
                raise LoadError(
                    f"{path}: HDF5 file holds weights only (no 'model_config' attribute): "
                    "pass the model config as config= (model.to_json() output)"
                )
            model_config = _parse_json(raw, f"{path}: attribute 'model_config'")

        weights_root = h5["model_weights"] if "model_weights" in h5 else h5
        if not isinstance(weights_root, h5py.Group):
            raise LoadError(f"{path}: 'model_weights' is not an HDF5 group")
        layer_names = _attr_str_list(weights_root, "layer_names")
        if layer_names is not None:
            keras_version = keras_version or _attr_str(weights_root, "keras_version")
            backend = backend or _attr_str(weights_root, "backend")
            store = _LegacyStore(weights_root, layer_names, path)
            return _build_spec(path, model_config, store, keras_version, backend, "h5", set(layer_names))
        if "layers" in h5 or "_layer_checkpoint_dependencies" in h5:
            return _build_spec(path, model_config, _H5VarStore(h5), keras_version, backend, "weights.h5", None)
        raise LoadError(
            f"{path}: HDF5 file is not a Keras file: "
            "no 'layer_names' attribute (legacy) and no 'layers' group (Keras 3)"
        )


def _check_global_heaps(image, where: str) -> None:
    """Refuse HDF5 global heap collections that the HDF5 library would walk forever.

    HDF5 (2.0 included) steps through a collection's objects by their stored sizes; a free-space object of size
    0 never advances, and reading any variable-length string (Keras keeps its config and weight names in those)
    then spins for good. Every collection HDF5 reads begins with the GCOL signature and must fit in the file,
    so each such one is walked here first, refusing what no HDF5 writer produces.
    """
    lengths = _hdf5_length_size(image)
    header = 8 + lengths  # GCOL, version, 3 reserved bytes, collection size
    at = image.find(b"GCOL")
    while at >= 0:
        size = int.from_bytes(image[at + 8:at + 8 + lengths], "little")
        if image[at + 4:at + 5] == b"\x01" and header <= size <= len(image) - at:
            p = header
            while p + header <= size:  # an object header is as long as the collection's
                index = int.from_bytes(image[at + p:at + p + 2], "little")
                length = int.from_bytes(image[at + p + 8:at + p + 8 + lengths], "little")
                # Object 0 is the free space, which HDF5 writes last, running to the collection's end (its
                # size counts its header); a size 0 there is the endless walk. Other objects are padded to 8.
                if index == 0 and length != size - p or index and length >= 1 << 62:
                    raise LoadError(f"{where}: HDF5 global heap at byte {at} is corrupt "
                                    f"(object {index} at offset {p} has size {length})")
                p += header + (length + 7) // 8 * 8 if index else length
        at = image.find(b"GCOL", at + 1)


def _hdf5_length_size(image) -> int:
    """The superblock's size of lengths (8 in every file h5py writes)."""
    base = 0
    while base + 16 <= len(image) and image[base:base + 8] != _HDF5_SIGNATURE:
        base = 512 if base == 0 else base * 2  # a user block puts the superblock at 512, 1024, 2048...
    if base + 16 > len(image):
        return 8
    version = image[base + 8]
    size = image[base + 14] if version < 2 else image[base + 10]
    return size if size in (2, 4, 8) else 8


# ----------------------------------------------------------------------------------------------------------
# Config parsing


def _parse_json(raw: bytes | str, where: str) -> Any:
    """Decode JSON, reporting syntax errors as LoadError."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise LoadError(f"{where}: invalid JSON: {e}") from e


def _load_config_arg(config) -> dict:
    """Accept the ``config=`` argument as a dict, a JSON string, or a path to a JSON file."""
    if isinstance(config, dict):
        return copy.deepcopy(config)
    if isinstance(config, bytes):
        return _parse_json(config, "config")
    if isinstance(config, str) and config.lstrip().startswith("{"):
        return _parse_json(config, "config")
    if isinstance(config, (str, os.PathLike)):
        cpath = os.fspath(config)
        try:
            with open(cpath, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise LoadError(f"{cpath}: cannot read model config: {e}") from e
        return _parse_json(raw, cpath)
    raise LoadError(f"config must be a dict, a JSON string or a path to a JSON file, not {type(config).__name__}")


def _model_class_and_body(model_config, path: str) -> tuple[str, Any]:
    """Split a model config into its class name and inner config, accepting ``to_json()`` or ``get_config()``."""
    if not isinstance(model_config, dict):
        raise LoadError(f"{path}: model config is a {type(model_config).__name__}, expected a JSON object")
    if "class_name" in model_config and "config" in model_config:
        class_name = model_config["class_name"]
        body = model_config["config"]
    elif "layers" in model_config:
        class_name = "Functional" if "input_layers" in model_config else "Sequential"
        body = model_config
    else:
        raise LoadError(f"{path}: model config has neither 'class_name'/'config' nor 'layers'")
    if class_name not in _MODEL_CLASSES:
        raise LoadError(
            f"{path}: model class {class_name!r} is not Sequential or Functional; "
            "subclassed models have no layer graph to read"
        )
    return class_name, body


def _entry_name(entry, path: str) -> str:
    """The layer name of one entry of a config's ``layers`` list."""
    if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
        raise LoadError(f"{path}: malformed layer entry in model config: {str(entry)[:120]}")
    name = entry.get("name", entry["config"].get("name"))
    if not isinstance(name, str) or not isinstance(entry.get("class_name"), str):
        raise LoadError(f"{path}: layer entry without a name or class_name: {str(entry)[:120]}")
    return name


def _nested_layer(value, path: str, owner: str, key: str) -> dict:
    """Normalise a nested layer config (Bidirectional, TimeDistributed) to ``{"class_name", "config"}``."""
    if not isinstance(value, dict) or not isinstance(value.get("class_name"), str) or not isinstance(
        value.get("config"), dict
    ):
        raise LoadError(f"{path}: layer '{owner}': config key {key!r} is not a layer config")
    return {"class_name": value["class_name"], "config": copy.deepcopy(value["config"])}


def _normalise_config(class_name: str, cfg: dict, path: str, name: str) -> dict:
    """Copy a layer config, making wrapped layers reachable as ``layer``/``forward_layer``/``backward_layer``."""
    cfg = copy.deepcopy(cfg)
    if class_name == "TimeDistributed":
        cfg["layer"] = _nested_layer(cfg.get("layer"), path, name, "layer")
    elif class_name == "Bidirectional":
        forward = _nested_layer(cfg.get("layer"), path, name, "layer")
        if cfg.get("backward_layer") is not None:
            backward = _nested_layer(cfg["backward_layer"], path, name, "backward_layer")
        else:
            # Keras 2 configs store the backward layer only when the user supplied one; otherwise it is
            # the forward config run the other way.
            backward = copy.deepcopy(forward)
            backward["config"]["go_backwards"] = not forward["config"].get("go_backwards", False)
            inner_name = str(forward["config"].get("name", ""))
            backward["config"]["name"] = "backward_" + inner_name.removeprefix("forward_")
        for inner in (forward, backward):
            # Bidirectional forces this on both directions at construction; configs written before that
            # rule may not show it.
            if "return_sequences" in inner["config"]:
                inner["config"]["zero_output_for_mask"] = bool(inner["config"]["return_sequences"])
        # "layer" keeps its Keras meaning and is the very dict stored as "forward_layer".
        cfg["layer"] = cfg["forward_layer"] = forward
        cfg["backward_layer"] = backward
    return cfg


def _batch_shape(value) -> tuple[int | None, ...] | None:
    """A JSON shape list as a tuple, or None when it is not one."""
    if isinstance(value, list) and all(v is None or isinstance(v, int) for v in value):
        return tuple(value)
    return None


def _input_info(model_class: str, body, entries: list[dict]) -> tuple[tuple | None, str | None]:
    """Find the model's batch input shape and input dtype in the config, where it says."""
    for entry in entries:
        if entry["class_name"] == "InputLayer":
            cfg = entry["config"]
            shape = _batch_shape(cfg.get("batch_shape", cfg.get("batch_input_shape")))
            dtype = cfg.get("dtype") if isinstance(cfg.get("dtype"), str) else None
            return shape, dtype
    if model_class == "Sequential":
        if isinstance(body, dict) and _batch_shape(body.get("build_input_shape")) is not None:
            return _batch_shape(body["build_input_shape"]), None
        if entries:
            first = entries[0]
            shape = _batch_shape(first["config"].get("batch_input_shape", first["config"].get("batch_shape")))
            if shape is None and isinstance(first.get("build_config"), dict):
                shape = _batch_shape(first["build_config"].get("input_shape"))
            return shape, None
    return None, None


# ----------------------------------------------------------------------------------------------------------
# Functional graphs: accept one chain, fold mask ops


@dataclass(frozen=True)
class _Ref:
    """A reference to output ``tensor`` of layer ``layer`` (shared layers are refused, so the call is implied)."""

    layer: str
    tensor: int


@dataclass
class _Call:
    """One inbound node of a layer: positional arguments and keyword arguments, tensors as _Ref."""

    args: list
    kwargs: dict


def _v3_value(value):
    """Turn Keras 3 ``__keras_tensor__`` dicts inside a call argument into _Ref."""
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            history = (value.get("config") or {}).get("keras_history")
            if not (isinstance(history, list) and len(history) == 3 and isinstance(history[0], str)):
                raise ValueError(f"bad keras_history {history!r}")
            return _Ref(history[0], int(history[2]))
        return {k: _v3_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_v3_value(v) for v in value]
    return value


def _v2_value(value, names: set[str]):
    """Turn Keras 2 ``[layer, node, tensor]`` triples inside call kwargs into _Ref."""
    if (
        isinstance(value, list)
        and len(value) == 3
        and isinstance(value[0], str)
        and value[0] in names
        and all(isinstance(v, int) for v in value[1:])
    ):
        return _Ref(value[0], value[2])
    if isinstance(value, list):
        return [_v2_value(v, names) for v in value]
    if isinstance(value, dict):
        return {k: _v2_value(v, names) for k, v in value.items()}
    return value


def _parse_node(node, names: set[str]) -> _Call:
    """Parse one inbound node, in the Keras 3 (``{"args", "kwargs"}``) or Keras 2 (nested lists) format."""
    if isinstance(node, dict):
        return _Call(args=_v3_value(node.get("args", [])), kwargs=_v3_value(node.get("kwargs", {})))
    if not isinstance(node, list):
        raise ValueError(f"bad inbound node {node!r}")
    # TFOpLambda keeps its input structure, so its node is one [layer, node, tensor, kwargs] item, unwrapped.
    items = [node] if node and isinstance(node[0], str) else node
    args: list = []
    kwargs: dict = {}
    for item in items:
        if not (isinstance(item, list) and len(item) >= 3 and isinstance(item[0], str)):
            raise ValueError(f"bad inbound node item {item!r}")
        if item[0] == "_CONSTANT_VALUE":
            args.append(item[2])
        else:
            args.append(_Ref(item[0], int(item[2])))
        if len(item) > 3 and isinstance(item[3], dict):
            kwargs.update({k: _v2_value(v, names) for k, v in item[3].items()})
    return _Call(args=args, kwargs=kwargs)


def _refs(value):
    """Yield every _Ref inside a parsed argument structure."""
    if isinstance(value, _Ref):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _refs(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _refs(v)


def _io_names(value, path: str, key: str) -> list[str]:
    """Layer names in ``input_layers``/``output_layers`` (``[name, 0, 0]`` or a list of those)."""
    if isinstance(value, list) and len(value) == 3 and isinstance(value[0], str):
        return [value[0]]
    if isinstance(value, list) and all(isinstance(v, list) and v and isinstance(v[0], str) for v in value):
        return [v[0] for v in value]
    raise LoadError(f"{path}: model config has a malformed {key!r}: {str(value)[:120]}")


def _is_op(entry: dict, name: str, file_layer_names: set[str] | None) -> bool:
    """Whether a config entry is an op (a symbolic function call) rather than a layer."""
    class_name = entry["class_name"]
    module = entry.get("module")
    if isinstance(module, str):
        return module.startswith(("keras.src.ops", "keras.ops"))
    if class_name in _TF_OP_LAYERS or class_name in _KERAS3_MASK_OPS:
        return True
    # Legacy .h5 configs carry no "module", but the file lists every layer of model.layers, and Keras 3 ops
    # are not layers.
    return file_layer_names is not None and name not in file_layer_names and class_name not in _KNOWN_LAYERS


def _op_kind(entry: dict) -> str | None:
    """'not_equal', 'any' or None for an op entry."""
    class_name = entry["class_name"]
    function = entry["config"].get("function")
    if class_name == "NotEqual" or (class_name in _TF_OP_LAYERS and function in _NOT_EQUAL_FUNCTIONS):
        return "not_equal"
    if class_name == "Any" or (class_name in _TF_OP_LAYERS and function in _REDUCE_ANY_FUNCTIONS):
        return "any"
    return None


def _fold_mask(path: str, layer: str, value, ops: dict, calls: dict, layers: set[str]) -> KerasMask:
    """Describe a ``mask=`` argument computed as ``x != v`` or ``any(x != v, axis=-1)`` by op layers."""
    unsupported = (
        f"{path}: layer '{layer}' receives a mask that is not any(x != value, axis=-1) or x != value; "
        "only those explicit masks are supported"
    )
    if not isinstance(value, _Ref):
        raise LoadError(unsupported)
    ref = value
    folded: list[str] = []
    reduce_last_axis = False
    if ref.layer in ops and _op_kind(ops[ref.layer]) == "any" and len(calls[ref.layer]) == 1:
        call = calls[ref.layer][0]
        axis = ops[ref.layer]["config"].get("axis", call.kwargs.get("axis"))
        keepdims = ops[ref.layer]["config"].get("keepdims", call.kwargs.get("keepdims", False))
        if axis not in (-1, [-1]) or keepdims:
            raise LoadError(f"{path}: layer '{layer}': mask op '{ref.layer}' reduces axis {axis!r}; expected -1")
        sources = list(_refs(call.args))
        if len(sources) != 1:
            raise LoadError(unsupported)
        folded.append(ref.layer)
        reduce_last_axis = True
        ref = sources[0]
    if ref.layer not in ops or _op_kind(ops[ref.layer]) != "not_equal" or len(calls[ref.layer]) != 1:
        raise LoadError(unsupported)
    call = calls[ref.layer][0]
    folded.append(ref.layer)
    operands = list(call.args) + ([call.kwargs["y"]] if "y" in call.kwargs else [])
    tensors = [a for a in operands if isinstance(a, _Ref)]
    numbers = [a for a in operands if isinstance(a, (int, float)) and not isinstance(a, bool)]
    if len(tensors) != 1 or len(numbers) != 1 or len(operands) != 2:
        raise LoadError(f"{path}: layer '{layer}': mask op '{ref.layer}' does not compare a tensor with a number")
    source = tensors[0]
    if source.layer not in layers or source.tensor != 0:
        raise LoadError(
            f"{path}: layer '{layer}': mask op '{ref.layer}' compares the output of '{source.layer}', "
            "which is not a layer of the chain"
        )
    return KerasMask(source.layer, float(numbers[0]), reduce_last_axis, tuple(reversed(folded)))


def _functional_chain(path: str, body: dict, entries: list[dict], op_names: set[str]):
    """Order a functional graph's layers as one chain; return (entries in order, explicit masks by layer)."""
    by_name = {_entry_name(e, path): e for e in entries}
    names = set(by_name)
    calls: dict[str, list[_Call]] = {}
    for name, entry in by_name.items():
        nodes = entry.get("inbound_nodes", [])
        try:
            calls[name] = [_parse_node(node, names) for node in nodes]
        except (ValueError, TypeError) as e:
            raise LoadError(f"{path}: layer '{name}': malformed inbound_nodes: {e}") from e
    ops = {n: by_name[n] for n in op_names}
    layers = names - op_names

    inputs = _io_names(body.get("input_layers"), path, "input_layers")
    outputs = _io_names(body.get("output_layers"), path, "output_layers")
    if len(inputs) != 1 or len(outputs) != 1:
        raise LoadError(
            f"{path}: model has {len(inputs)} inputs and {len(outputs)} outputs; only single-chain models are supported"
        )
    for name in inputs + outputs:
        if name not in layers:
            raise LoadError(f"{path}: model input/output {name!r} is not a layer of the config")

    # Branches are reported first: they name the layer where the graph stops being a chain.
    sources: dict[str, list[_Ref]] = {}
    feeds: dict[str, list[str]] = {name: [] for name in layers}
    for name in [n for n in by_name if n in layers and n != inputs[0]]:
        if len(calls[name]) != 1:
            raise LoadError(
                f"{path}: layer '{name}' is called {len(calls[name])} times; only single-chain models are supported"
            )
        sources[name] = list(_refs(calls[name][0].args))
        for ref in sources[name]:
            if ref.layer in feeds and name not in feeds[ref.layer]:
                feeds[ref.layer].append(name)
    for name in by_name:
        if len(feeds.get(name, ())) > 1:
            raise LoadError(
                f"{path}: layer '{name}' branches: it feeds {len(feeds[name])} layers ({', '.join(feeds[name])}); "
                "only single-chain models are supported"
            )

    masks: dict[str, KerasMask] = {}
    for name, refs in sources.items():
        if len(refs) != 1:
            raise LoadError(
                f"{path}: layer '{name}' takes {len(refs)} input tensors "
                f"({', '.join(r.layer for r in refs) or 'none'}); only single-chain models are supported"
            )
        source = refs[0]
        if source.layer in op_names:
            raise LoadError(
                f"{path}: layer '{name}' takes its input from op '{source.layer}'; only chains of layers are supported"
            )
        if source.layer not in layers:
            raise LoadError(f"{path}: layer '{name}' takes its input from unknown layer '{source.layer}'")
        if source.tensor != 0:
            raise LoadError(
                f"{path}: layer '{name}' takes output #{source.tensor} of layer '{source.layer}'; "
                "only single-output chains are supported"
            )
        for key, value in calls[name][0].kwargs.items():
            if not any(True for _ in _refs(value)):
                continue
            if key != "mask":
                raise LoadError(
                    f"{path}: layer '{name}' receives a tensor as argument {key!r}; "
                    "only single-chain models are supported"
                )
            masks[name] = _fold_mask(path, name, value, ops, calls, layers)

    chain = [inputs[0]]
    while feeds[chain[-1]]:
        chain.append(feeds[chain[-1]][0])
    if chain[-1] != outputs[0]:
        raise LoadError(
            f"{path}: the chain from '{inputs[0]}' ends at layer '{chain[-1]}', not at the output '{outputs[0]}'"
        )
    stray = sorted(layers - set(chain))
    if stray:
        raise LoadError(f"{path}: layer '{stray[0]}' is not on the chain from '{inputs[0]}' to '{outputs[0]}'")
    return [by_name[n] for n in chain], masks


# ----------------------------------------------------------------------------------------------------------
# Weight stores


def _snake_case(class_name: str) -> str:
    """Keras 3's weight-group name for a class: ``SimpleRNN`` -> ``simple_rnn``, ``GRU`` -> ``gru``."""
    name = re.sub(r"\W+", "", class_name)
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def _decode(value) -> str:
    """An HDF5 string attribute element as str."""
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf8")
    return str(value)


def _attr_str(obj, name: str) -> str | None:
    """A scalar string attribute, or None when absent."""
    if name not in obj.attrs:
        return None
    value = obj.attrs[name]
    if isinstance(value, np.ndarray):
        value = value.item() if value.size == 1 else value.tolist()
    return _decode(value)


def _attr_str_list(obj, name: str) -> list[str] | None:
    """A string-list attribute, joined from ``name0``, ``name1``… when Keras split it to fit the header."""
    if name in obj.attrs:
        chunks = [obj.attrs[name]]
    else:
        chunks = []
        while f"{name}{len(chunks)}" in obj.attrs:
            chunks.append(obj.attrs[f"{name}{len(chunks)}"])
        if not chunks:
            return None
    return [_decode(v) for chunk in chunks for v in np.atleast_1d(np.asarray(chunk)).ravel()]


def _dataset_array(ds, where: str) -> np.ndarray:
    """Read an HDF5 dataset as a floating-point array (bfloat16, stored opaque by Keras, widened to float32)."""
    h5py = _import_h5py()
    if not isinstance(ds, h5py.Dataset):
        raise LoadError(f"{where}: expected a dataset, found a group")
    declared = ds.size * ds.dtype.itemsize
    if declared > _INFLATION_FLOOR and declared > _MAX_INFLATION * max(ds.id.get_storage_size(), 1):
        raise LoadError(f"{where}: dataset claims {declared} bytes but stores {ds.id.get_storage_size()}")
    try:
        value = np.asarray(ds[()])
    except (OSError, ValueError, TypeError) as e:
        raise LoadError(f"{where}: cannot read tensor data: {e}") from e
    if value.dtype.kind == "V" and value.dtype.itemsize == 2:
        # Keras writes bfloat16 as 2-byte opaque elements; its top 16 bits are a float32's.
        bits = value.view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32)
    return value


def _is_rng_state(path: str) -> bool:
    """Whether a stored variable is a dropout layer's random-generator state rather than a weight."""
    return any(part.startswith("seed_generator") for part in path.split("/"))


class _H5VarStore:
    """Keras 3 variables in an HDF5 file: ``<layer path>/vars/<i>`` datasets."""

    def __init__(self, h5):
        self.h5 = h5
        # Files from Keras 3.0 converted from 2.13 name the top container differently (saving_lib handles both).
        legacy_root = "_layer_checkpoint_dependencies"
        self.root = legacy_root if legacy_root in h5 and "layers" not in h5 else "layers"

    def layer_path(self, group: str) -> str:
        """The file path of a top-level layer group."""
        return f"{self.root}/{group}"

    def vars(self, path: str) -> dict | None:
        """The ``vars`` entries at ``path`` by index string, or None when there is no such group."""
        h5py = _import_h5py()
        group = self.h5.get(path)
        if not isinstance(group, h5py.Group):
            return None
        vars_group = group.get("vars")
        if not isinstance(vars_group, h5py.Group):
            return None
        return dict(vars_group.items())

    def read(self, entry, where: str) -> np.ndarray:
        """Read one entry returned by vars()."""
        return _dataset_array(entry, where)

    def tensors_under(self, path: str) -> list[str]:
        """Paths of all datasets below ``path``."""
        h5py = _import_h5py()
        group = self.h5.get(path)
        if group is None:
            return []
        if isinstance(group, h5py.Dataset):
            return [path]
        found: list[str] = []
        group.visititems(lambda n, o: found.append(f"{path}/{n}") if isinstance(o, h5py.Dataset) else None)
        return [p for p in found if not _is_rng_state(p)]

    def top_groups(self) -> list[str]:
        """Names of the top-level layer groups."""
        group = self.h5.get(self.root)
        return list(group.keys()) if group is not None and hasattr(group, "keys") else []


class _NpzVarStore:
    """Keras 3 variables from ``model.weights.npz``: ``{layer path: {index: array}}``."""

    def __init__(self, contents: dict[str, dict[str, np.ndarray]]):
        self.contents = contents
        self.root = "layers"

    def layer_path(self, group: str) -> str:
        """The key prefix of a top-level layer group."""
        return f"{self.root}/{group}"

    def vars(self, path: str) -> dict | None:
        """The variables stored for ``path``, or None when absent."""
        return self.contents.get(path)

    def read(self, entry, where: str) -> np.ndarray:
        """Return one entry returned by vars()."""
        return entry

    def tensors_under(self, path: str) -> list[str]:
        """Keys of all variables at or below ``path``."""
        return [
            f"{key}/{index}"
            for key, entries in self.contents.items()
            if (key == path or key.startswith(path + "/")) and not _is_rng_state(key)
            for index in entries
        ]

    def top_groups(self) -> list[str]:
        """Names of the top-level layer groups."""
        prefix = self.root + "/"
        return sorted({k[len(prefix) :].split("/")[0] for k in self.contents if k.startswith(prefix)})


def _read_keras_npz(raw: bytes, path: str) -> dict[str, dict[str, np.ndarray]]:
    """Parse Keras's npz weights (each member a pickled dict of arrays) with a restricted unpickler."""
    where = f"{path}: model.weights.npz"
    try:
        npz = zipfile.ZipFile(io.BytesIO(raw))
    except zipfile.BadZipFile as e:
        raise LoadError(f"{where}: not a zip archive: {e}") from e
    contents: dict[str, dict[str, np.ndarray]] = {}
    with npz:
        for member in npz.namelist():
            if not member.endswith(".npy"):
                continue
            key = member[: -len(".npy")]
            stream = io.BytesIO(_zip_member(npz, member, f"{where}"))
            try:
                version = npy_format.read_magic(stream)
                if version == (1, 0):
                    shape, _, dtype = npy_format.read_array_header_1_0(stream)
                elif version == (2, 0):
                    shape, _, dtype = npy_format.read_array_header_2_0(stream)
                else:
                    raise ValueError(f"unsupported .npy format version {version}")
            except ValueError as e:
                raise LoadError(f"{where}: entry {key!r}: bad .npy header: {e}") from e
            if dtype != np.dtype(object) or shape != ():
                raise LoadError(f"{where}: entry {key!r}: expected a pickled dict of arrays, found {dtype} {shape}")
            # Keras pickles each variable dict; only arrays and containers are read from it.
            value = numpy_pickle.loads(stream.read(), f"{where}: entry {key!r}")
            item = value.item() if isinstance(value, np.ndarray) and value.shape == () else value
            if not isinstance(item, dict) or not all(
                isinstance(k, str) and isinstance(v, np.ndarray) for k, v in item.items()
            ):
                raise LoadError(f"{where}: entry {key!r} is not a dict of arrays")
            contents[key] = item
    return contents


class _LegacyStore:
    """Legacy HDF5 weights: ``<layer name>/`` groups listing their datasets in ``weight_names``."""

    def __init__(self, root, layer_names: list[str], path: str):
        self.root = root
        self.layer_names = layer_names
        self.path = path

    def weight_names(self, layer: str) -> list[str] | None:
        """The layer's ordered weight names, or None when the file has no group for it."""
        h5py = _import_h5py()
        group = self.root.get(layer)
        if not isinstance(group, h5py.Group):
            return None
        names = _attr_str_list(group, "weight_names")
        if names is None:
            raise LoadError(f"{self.path}: layer '{layer}': weights group has no 'weight_names' attribute")
        return names

    def read(self, layer: str, weight_name: str, where: str) -> np.ndarray:
        """Read one dataset named in ``weight_names``."""
        group = self.root[layer]
        if weight_name not in group:
            raise LoadError(f"{where}: dataset '{layer}/{weight_name}' listed in weight_names is missing")
        return _dataset_array(group[weight_name], where)


# ----------------------------------------------------------------------------------------------------------
# Weights of one layer


def _tensor_plan(class_name: str, cfg: dict) -> list[tuple[str, str]] | None:
    """Canonical tensor names in Keras's order, each with its Keras 3 sub-path; None for unknown classes."""
    if class_name in _RECURRENT_GATES:
        names = ["kernel", "recurrent_kernel"] + (["bias"] if cfg.get("use_bias", True) else [])
        return [(n, "cell") for n in names]
    if class_name == "Bidirectional":
        plan = []
        for side, key in (("forward", "forward_layer"), ("backward", "backward_layer")):
            if cfg[key]["class_name"] not in _RECURRENT_GATES:
                return None
            inner = _tensor_plan(cfg[key]["class_name"], cfg[key]["config"])
            plan += [(f"{side}/{n}", f"{key}/{sub}".rstrip("/")) for n, sub in inner]
        return plan
    if class_name == "TimeDistributed":
        inner = _tensor_plan(cfg["layer"]["class_name"], cfg["layer"]["config"])
        return None if inner is None else [(n, f"layer/{sub}".rstrip("/")) for n, sub in inner]
    if class_name == "Embedding":
        return [("embeddings", "")]
    if class_name == "Dense":
        return [("kernel", "")] + ([("bias", "")] if cfg.get("use_bias", True) else [])
    if class_name == "LayerNormalization":
        rms = cfg.get("rms_scaling", False)
        names = (["gamma"] if cfg.get("scale", True) or rms else []) + (
            ["beta"] if cfg.get("center", True) and not rms else []
        )
        return [(n, "") for n in names]
    if class_name == "BatchNormalization":
        names = (["gamma"] if cfg.get("scale", True) else []) + (["beta"] if cfg.get("center", True) else [])
        return [(n, "") for n in names + ["moving_mean", "moving_variance"]]
    if class_name in _PASSTHROUGH:
        return []
    return None


def _v3_layer_weights(store, group_path: str, layer: str, class_name: str, plan, path: str) -> dict[str, np.ndarray]:
    """A layer's tensors from a Keras 3 store, or {} for a layer that has none."""
    if plan:
        return _read_v3_weights(store, group_path, plan, path, layer)
    found = store.tensors_under(group_path)
    if found and plan is None:
        raise LoadError(f"{path}: layer '{layer}': weights of layer class {class_name!r} are not supported")
    if found:
        raise LoadError(f"{path}: layer '{layer}' ({class_name}) has unexpected weights: {', '.join(found)}")
    return {}


def _read_v3_weights(store, group_path: str, plan, path: str, layer: str) -> dict[str, np.ndarray]:
    """Collect a layer's tensors from a Keras 3 store following the plan's sub-paths and index order."""
    weights: dict[str, np.ndarray] = {}
    by_sub: dict[str, list[str]] = {}
    for name, sub in plan:
        by_sub.setdefault(sub, []).append(name)
    for sub, names in by_sub.items():
        vars_path = f"{group_path}/{sub}" if sub else group_path
        entries = store.vars(vars_path)
        if entries is None:
            raise LoadError(
                f"{path}: layer '{layer}': weights group '{vars_path}/vars' is missing (expected {', '.join(names)})"
            )
        for index, name in enumerate(names):
            where = f"{path}: layer '{layer}' tensor '{name}'"
            if str(index) not in entries:
                raise LoadError(f"{where}: dataset '{vars_path}/vars/{index}' is missing")
            weights[name] = store.read(entries[str(index)], where)
        extra = sorted(set(entries) - {str(i) for i in range(len(names))})
        if extra:
            raise LoadError(
                f"{path}: layer '{layer}': unexpected tensor(s) {', '.join(extra)} in '{vars_path}/vars' "
                f"(expected {len(names)}: {', '.join(names)})"
            )
    return weights


_KNOWN_BASENAMES = frozenset(
    {"kernel", "recurrent_kernel", "bias", "embeddings", "gamma", "beta", "moving_mean", "moving_variance"}
)


def _legacy_layer_weights(store: _LegacyStore, layer: str, class_name: str, plan, path: str) -> dict[str, np.ndarray]:
    """A layer's tensors from a legacy HDF5 file, or {} for a layer that has none."""
    stored = store.weight_names(layer)
    if plan is None:
        if stored:
            raise LoadError(f"{path}: layer '{layer}': weights of layer class {class_name!r} are not supported")
        return {}
    if stored is None:
        if plan:
            raise LoadError(
                f"{path}: layer '{layer}': the file has no weights group for it "
                f"(expected {', '.join(n for n, _ in plan)})"
            )
        return {}
    return _read_legacy_weights(store, layer, plan, stored, path)


def _read_legacy_weights(store: _LegacyStore, layer: str, plan, names: list[str], path: str) -> dict[str, np.ndarray]:
    """Collect a layer's tensors from a legacy HDF5 group, positionally as Keras's own loader does."""
    expected = [n for n, _ in plan]
    if len(names) != len(expected):
        raise LoadError(
            f"{path}: layer '{layer}': expected {len(expected)} tensors ({', '.join(expected) or 'none'}), "
            f"found {len(names)} in weight_names ({', '.join(names) or 'none'})"
        )
    weights: dict[str, np.ndarray] = {}
    for canonical, stored in zip(expected, names):
        where = f"{path}: layer '{layer}' tensor '{canonical}'"
        basename = stored.rsplit("/", 1)[-1].split(":", 1)[0]
        # Position decides, as in Keras; a recognisable name in the wrong slot means the file is inconsistent.
        if basename in _KNOWN_BASENAMES and basename != canonical.rsplit("/", 1)[-1]:
            raise LoadError(f"{where}: weight_names has {stored!r} in its place")
        weights[canonical] = store.read(layer, stored, where)
    return weights


# ----------------------------------------------------------------------------------------------------------
# Shape validation


def _units(cfg: dict, key: str, path: str, layer: str) -> int:
    """A positive integer config field such as ``units``."""
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise LoadError(f"{path}: layer '{layer}': config {key!r} is {value!r}, expected a positive integer")
    return value


def _expect(weights: dict, name: str, shape: tuple, path: str, layer: str) -> None:
    """Check one tensor's shape and dtype; ``None`` in ``shape`` matches any size."""
    array = weights[name]
    where = f"{path}: layer '{layer}' tensor '{name}'"
    if array.dtype.kind != "f":
        raise LoadError(f"{where}: expected floating-point values, found {array.dtype}")
    found = tuple(array.shape)
    if len(found) != len(shape) or any(e is not None and e != f for e, f in zip(shape, found)):
        raise LoadError(f"{where}: expected shape {_shape_str(shape)}, found {found}")


def _shape_str(shape: tuple) -> str:
    """A shape as Python prints it, with ``?`` for sizes the config does not fix."""
    items = ["?" if e is None else str(e) for e in shape]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


def _check_recurrent(class_name, cfg, weights, prefix, in_dim, path, layer) -> int:
    """Validate one LSTM/GRU/SimpleRNN's tensors; return its output feature size."""
    units = _units(cfg, "units", path, layer)
    width = _RECURRENT_GATES[class_name] * units
    _expect(weights, prefix + "kernel", (in_dim, width), path, layer)
    _expect(weights, prefix + "recurrent_kernel", (units, width), path, layer)
    if prefix + "bias" in weights:
        if class_name == "GRU":
            if "reset_after" not in cfg:
                # Configs from before the option existed: the stored bias tells which variant was trained.
                cfg["reset_after"] = weights[prefix + "bias"].ndim == 2
            shape = (2, width) if cfg["reset_after"] else (width,)
        else:
            shape = (width,)
        if weights[prefix + "bias"].shape == (2 * width,) and shape == (width,):
            # Keras 2's CuDNNLSTM/CuDNNGRU keep input and recurrent biases apart and lay their kernels out for cuDNN.
            raise LoadError(
                f"{path}: layer '{layer}' tensor '{prefix}bias': {2 * width} values, two per gate and unit: weights "
                f"of a Keras 2 CuDNN{class_name} layer, which are not supported (expected shape ({width},))"
            )
        _expect(weights, prefix + "bias", shape, path, layer)
    return units


def _check_shapes(
    class_name: str, cfg: dict, weights: dict, in_dim: int | None, rank: int | None, path: str, layer: str
) -> int | None:
    """Validate a layer's tensors against its config; return the output's last dimension when known.

    ``in_dim`` is the input's last dimension and ``rank`` its number of axes (batch included), when known.
    """
    if class_name in _RECURRENT_GATES:
        return _check_recurrent(class_name, cfg, weights, "", in_dim, path, layer)
    if class_name == "Bidirectional":
        sizes = [
            _check_recurrent(cfg[key]["class_name"], cfg[key]["config"], weights, f"{side}/", in_dim, path, layer)
            for side, key in (("forward", "forward_layer"), ("backward", "backward_layer"))
        ]
        merge = cfg.get("merge_mode", "concat")
        if merge == "concat":
            return sizes[0] + sizes[1]
        return sizes[0] if merge in ("sum", "ave", "mul") and sizes[0] == sizes[1] else None
    if class_name == "TimeDistributed":
        inner = cfg["layer"]
        return _check_shapes(inner["class_name"], inner["config"], weights, in_dim, None, path, layer)
    if class_name == "Embedding":
        input_dim = _units(cfg, "input_dim", path, layer)
        output_dim = _units(cfg, "output_dim", path, layer)
        _expect(weights, "embeddings", (input_dim, output_dim), path, layer)
        return output_dim
    if class_name == "Dense":
        units = _units(cfg, "units", path, layer)
        _expect(weights, "kernel", (in_dim, units), path, layer)
        if "bias" in weights:
            _expect(weights, "bias", (units,), path, layer)
        return units
    if class_name in ("LayerNormalization", "BatchNormalization"):
        axis = cfg.get("axis", -1)
        axes = axis if isinstance(axis, list) else [axis]
        # tf.keras 2 writes the built axis as a positive index, so "last axis" is -1 or rank - 1.
        on_last_axis = len(axes) == 1 and axes[0] in (-1, None if rank is None else rank - 1)
        first = next(iter(weights.values()), None)
        for name in weights:
            shape = (in_dim,) if on_last_axis else tuple(first.shape)
            _expect(weights, name, shape, path, layer)
        # Normalisation keeps the input's shape.
        return in_dim
    if class_name in _PASSTHROUGH:
        return in_dim
    return None


def _declared_input_shape(entry: dict, cfg: dict) -> tuple[int | None, ...] | None:
    """The input shape the layer's own config records (Keras 3 build_config, Keras 2 batch_input_shape)."""
    build = entry.get("build_config")
    shape = _batch_shape(build.get("input_shape")) if isinstance(build, dict) else None
    return shape or _batch_shape(cfg.get("batch_input_shape", cfg.get("batch_shape")))


# ----------------------------------------------------------------------------------------------------------
# Assembly


def _build_spec(path, model_config, store, keras_version, backend, source_format, file_layer_names) -> KerasModelSpec:
    """Walk the config's layers in execution order and attach each one's weights from ``store``."""
    model_class, body = _model_class_and_body(model_config, path)
    raw_entries = body if isinstance(body, list) else body.get("layers") if isinstance(body, dict) else None
    if not isinstance(raw_entries, list):
        raise LoadError(f"{path}: model config has no 'layers' list")
    seen: set[str] = set()
    for entry in raw_entries:
        name = _entry_name(entry, path)
        if name in seen:
            raise LoadError(f"{path}: model config names two layers '{name}'")
        seen.add(name)
        if entry["class_name"] in _MODEL_CLASSES:
            raise LoadError(f"{path}: layer '{name}' is a nested model, which is not supported")

    op_names = {_entry_name(e, path) for e in raw_entries if _is_op(e, _entry_name(e, path), file_layer_names)}
    layer_entries = [e for e in raw_entries if _entry_name(e, path) not in op_names]

    # Keras 3 names weight groups by class, counting in model.layers order (the config order, ops excluded).
    group_of: dict[str, str] = {}
    used: dict[str, int] = {}
    for entry in layer_entries:
        snake = _snake_case(entry["class_name"])
        group_of[_entry_name(entry, path)] = f"{snake}_{used[snake]}" if snake in used else snake
        used[snake] = used.get(snake, 0) + 1

    if model_class == "Sequential":
        if op_names:
            raise LoadError(f"{path}: Sequential config contains op '{sorted(op_names)[0]}', which is not a layer")
        ordered, masks = layer_entries, {}
    else:
        try:
            ordered, masks = _functional_chain(path, body, raw_entries, op_names)
        except LoadError as exc:
            # A layer class nobody here knows (a custom attention layer, say) is the reason to name first.
            unknown = [e for e in layer_entries if e["class_name"] not in _KNOWN_LAYERS]
            if not unknown:
                raise
            named = ", ".join(f"layer '{_entry_name(e, path)}' ({e['class_name']})" for e in unknown)
            raise LoadError(
                f"{path}: {named}: Keras layer class{'es' if len(unknown) > 1 else ''} not supported, and the model "
                f"is not a chain of supported layers ({exc})"
            ) from exc

    input_shape, input_dtype = _input_info(model_class, body, ordered)
    features = input_shape[-1] if input_shape else None
    claimed: set[str] = set()
    layers: list[KerasLayerSpec] = []
    names = [_entry_name(entry, path) for entry in ordered]
    configs = [_normalise_config(e["class_name"], e["config"], path, n) for e, n in zip(ordered, names)]
    plans = [_tensor_plan(e["class_name"], cfg) for e, cfg in zip(ordered, configs)]
    if isinstance(store, _LegacyStore):
        file_group = _legacy_groups(store, names, plans, path)
    for entry, name, cfg, plan in zip(ordered, names, configs, plans):
        class_name = entry["class_name"]
        if isinstance(store, _LegacyStore):
            group = file_group.get(name, name)
            claimed.add(group)
            weights = _legacy_layer_weights(store, group, class_name, plan, path)
        else:
            claimed.add(group_of[name])
            weights = _v3_layer_weights(store, store.layer_path(group_of[name]), name, class_name, plan, path)
        declared = _declared_input_shape(entry, cfg)
        if class_name == "InputLayer":
            features = input_shape[-1] if input_shape else None
        elif plan is None:
            # A layer this reader does not know may change the feature size in any way.
            features = None
        else:
            in_dim = declared[-1] if declared and declared[-1] is not None else features
            features = _check_shapes(class_name, cfg, weights, in_dim, len(declared) if declared else None, path, name)
        layers.append(KerasLayerSpec(class_name, name, cfg, weights, masks.get(name)))

    _check_unclaimed(store, claimed, path)
    return KerasModelSpec(
        keras_version=keras_version,
        backend=backend,
        source_format=source_format,
        model_class=model_class,
        input_shape=input_shape,
        layers=layers,
        input_dtype=input_dtype,
    )


def _legacy_groups(store: _LegacyStore, names: list[str], plans: list, path: str) -> dict[str, str]:
    """The weights group of a legacy file that holds each config layer's tensors, when it is not the layer's name.

    Keras's ``load_weights`` on an HDF5 file pairs the model's layers that have weights with the file's groups that
    have weights, in order, whatever their names: files saved years ago say ``lstm_3`` where a config written today
    says ``lstm_1``. Names are used when they all match; otherwise the layers are paired by order when the counts
    agree (shapes are checked afterwards, as Keras does), with a warning naming each pair; by name otherwise.
    """
    wanted = [n for n, plan in zip(names, plans) if plan]
    if all(store.weight_names(n) is not None for n in wanted) or any(plan is None for plan in plans):
        return {}
    stored = [n for n in store.layer_names if store.weight_names(n)]
    if len(stored) != len(wanted):
        return {}  # not the same model: the name lookup names the first layer the file lacks
    pairs = dict(zip(wanted, stored))
    warnings.warn(
        f"{path}: the file's layer names differ from the config's; layers paired by order, as Keras's load_weights "
        f"does: {', '.join(f'{c} <- {f}' for c, f in pairs.items())}",
        UserWarning,
        stacklevel=5,
    )
    return pairs


def _check_unclaimed(store, claimed: set[str], path: str) -> None:
    """Refuse weights for layers that the config does not name: the config belongs to another model."""
    if isinstance(store, _LegacyStore):
        for name in store.layer_names:
            if name not in claimed and store.weight_names(name):
                raise LoadError(f"{path}: file has weights for layer '{name}', which the model config does not name")
        return
    for group in store.top_groups():
        if group not in claimed and store.tensors_under(store.layer_path(group)):
            raise LoadError(
                f"{path}: file has weights in group '{store.layer_path(group)}', "
                "which no layer of the model config maps to"
            )
