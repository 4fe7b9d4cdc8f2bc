"""Readers and writers, one module per source format, and ``load``, which picks the right one."""
from __future__ import annotations

import os
from typing import Any

from ..errors import LoadError
from ..model import Model


# Models shipped inside the package, by the name every command and ``load`` accept ("builtin:charlm").
BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = {"charlm": "charlm.safetensors"}


def resolve(path: str | os.PathLike) -> str:
    """The file a model name stands for: ``builtin:NAME`` is a model shipped in lstm_engine/data/,
    anything else is a path, returned as given."""
    path = os.fspath(path)
    if not isinstance(path, str) or not path.startswith(BUILTIN_PREFIX):
        return path
    name = path[len(BUILTIN_PREFIX):]
    if name not in BUILTIN_MODELS:
        raise LoadError(f"{path}: no such built-in model; built-in models: "
                        f"{', '.join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)}")
    from importlib import resources

    ref = resources.files("lstm_engine").joinpath("data", BUILTIN_MODELS[name])
    if not ref.is_file():
        raise LoadError(f"{path}: lstm_engine/data/{BUILTIN_MODELS[name]} is missing from this installation")
    return os.fspath(ref)  # a regular package directory: the data file is a path on disk


def _sniff(path: str) -> str:
    """The container kind of a file from its first bytes: 'zip', 'hdf5', 'safetensors', 'onnx' or 'unknown'."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise LoadError(f"{path}: cannot be read: {exc.strerror or exc}") from exc
    if head.startswith(b"\x08") and len(head) > 2 and head[1] < 0x80 and head[2] in (0x12, 0x1a, 0x22, 0x28, 0x32, 0x3a, 0x42):
        # An ONNX ModelProto: ir_version (field 1, a small varint), then producer, domain, graph or opset.
        return "onnx"
    if head.startswith(b"PK"):
        return "zip"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "hdf5"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


def load(path: str | os.PathLike, *, dtype: Any = None, **options: Any) -> Model:
    """Load a model file, or ``"builtin:charlm"`` (the character model shipped with lstm_engine): the
    engine's own ``.safetensors``, a PyTorch state_dict (``.pt``, ``.pth``, ``.bin``, ``.safetensors``), a
    Keras model (``.keras``, ``.h5``) or an ONNX model (``.onnx``, needs the onnx package:
    ``pip install ".[onnx]"`` from a checkout).

    The format is recognised from the file's content. ``dtype`` picks the weights' float type
    (default: as saved for the engine's own files, float32 otherwise). Other keyword options go to the
    format's loader (e.g. ``nonlinearity='relu'`` for an RNN state_dict, ``config=`` for Keras weights).
    Raises LoadError (naming the file) for anything it cannot load.
    """
    from . import native
    from ._safetensors import read_safetensors
    from .torch import model_from_state_dict

    path = resolve(path)
    kind = _sniff(path)
    if kind == "safetensors":
        tensors, metadata = read_safetensors(path)
        if native.is_native(metadata):
            if options:
                raise TypeError(f"load: options {sorted(options)} do not apply to an lstm_engine file")
            return native.model_from_safetensors(path, tensors, metadata, dtype)
        return model_from_state_dict(tensors, source=path, dtype=dtype, **options)
    if kind == "zip":
        import zipfile

        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        # A damaged directory also raises ValueError (names that are not UTF-8), NotImplementedError (a
        # version field) or EOFError.
        except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, EOFError) as exc:
            raise LoadError(f"{path}: not a readable zip archive: {exc}") from exc
        if "config.json" in names:
            from .keras import load_keras

            return load_keras(path, dtype=dtype, **options)
        from ._torch_pickle import read_torch_zip

        return model_from_state_dict(read_torch_zip(path), source=path, dtype=dtype, **options)
    if kind == "onnx" or (kind == "unknown" and path.lower().endswith(".onnx")):
        if options:
            raise TypeError(f"load: options {sorted(options)} do not apply to an ONNX file")
        from .onnx import load_onnx

        return load_onnx(path, dtype=dtype)
    if kind == "hdf5":
        from .keras import load_keras

        return load_keras(path, dtype=dtype, **options)
    raise LoadError(f"{path}: not a model file lstm_engine knows (expected an lstm_engine or PyTorch "
                    "safetensors file, a torch.save zip, a .keras archive, a Keras .h5 file or an ONNX model)")
