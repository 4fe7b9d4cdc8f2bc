"""Readers and writers, one module per source format, and ``load``, which picks the right one."""
from __future__ import annotations

import os
from typing import Any, BinaryIO

import numpy as np

from ..errors import LoadError
from ..model import Model

# Compressed archive members (.npz, .keras) and HDF5 datasets may inflate this much and no more: weights
# barely compress.
_MAX_INFLATION = 1000
_INFLATION_FLOOR = 64 << 20


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


# What ``detect`` can say about a file, and how ``describe`` names it.
FILE_KINDS = {
    "lstm_engine": "lstm_engine safetensors",
    "safetensors": "safetensors state_dict",
    "torch": "torch.save zip (state_dict)",
    "torch-legacy": "legacy torch.save stream (state_dict)",
    "torch-export": "torch.export program (.pt2)",
    "npz": "NumPy .npz arrays",
    "keras": "Keras .keras archive",
    "hdf5": "Keras HDF5",
    "pickle": "pickle (madmom network, or NumPy arrays)",
    "onnx": "ONNX model",
    "unknown": "unknown",
}
# Kinds that are zip archives (a .keras file's reader takes any of them and says what is missing).
ZIP_KINDS = frozenset({"keras", "torch", "torch-export", "npz"})
# HDF5 puts its signature at 0 or, after a user block, at 512, 1024, 2048, ... bytes.
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def detect(path: str | os.PathLike | BinaryIO) -> str:
    """What a model file is, from its content (never its name): one of ``FILE_KINDS``.

    ``path`` may be a seekable binary file object (read from its start, left at its start). The one place
    that decides a file's type: ``load``, ``load_state_dict``, the Keras and torch.export readers and the CLI
    all ask here. A file that cannot be opened, or a zip archive whose directory cannot be read, is a
    LoadError naming it.
    """
    import zipfile

    if hasattr(path, "read"):
        path.seek(0)
        head = path.read(16)
        size = path.seek(0, os.SEEK_END)
        path.seek(0)
        return _kind_of_head(head, size)
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            size = os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise LoadError(f"{path}: cannot be read: {exc.strerror or exc}") from exc
    kind = _kind_of_head(head, size)
    if kind == "unknown" and zipfile.is_zipfile(path):  # a zip with bytes in front of it
        kind = "zip"
    if kind == "zip":
        names = _zip_names(path)
        if "config.json" in names:
            return "keras"
        if any(n.endswith("/archive_format") for n in names):
            return "torch-export"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        return "torch"  # its reader says what is wrong if it is not a torch.save archive
    if kind == "safetensors":
        from . import native
        from ._safetensors import read_metadata

        try:
            return "lstm_engine" if native.is_native(read_metadata(path)) else "safetensors"
        except LoadError:
            return "safetensors"  # a damaged file: its reader says what is wrong
    if kind == "unknown" and _has_hdf5_user_block(path, size):
        return "hdf5"
    return kind


def describe(path: str | os.PathLike) -> str:
    """A file's kind as a person reads it (``lstm-engine inspect``), with the engine format's version."""
    kind = detect(path)
    if kind == "lstm_engine":
        from ._safetensors import read_metadata

        return f"{FILE_KINDS[kind]} (format version {read_metadata(path).get('format_version', '?')})"
    return FILE_KINDS[kind]


def _kind_of_head(head: bytes, size: int) -> str:
    """The container a file's first 16 bytes show: 'zip', or a key of FILE_KINDS ('safetensors' for either)."""
    from ._torch_pickle import _LEGACY_HEAD

    if head.startswith(b"\x08") and len(head) > 2 and head[1] < 0x80 and head[2] in (0x12, 0x1a, 0x22, 0x28, 0x32, 0x3a, 0x42):
        # An ONNX ModelProto: ir_version (field 1, a small varint), then producer, domain, graph or opset.
        return "onnx"
    if head.startswith(b"PK"):
        return "zip"
    if head.startswith(_HDF5_SIGNATURE):
        return "hdf5"
    # A safetensors header length (8 bytes, little-endian) that fits the file, then its JSON.
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if head.startswith(_LEGACY_HEAD):
        return "torch-legacy"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    if head.startswith((b"ccopy_reg\n", b"(dp", b"(lp")):  # protocol 0, as Python 2 wrote by default
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"  # a cut file: its reader says what is wrong
    return "unknown"


def _has_hdf5_user_block(path: str, size: int) -> bool:
    offset = 512
    with open(path, "rb") as f:
        while offset + 8 <= size:
            f.seek(offset)
            if f.read(8) == _HDF5_SIGNATURE:
                return True
            offset *= 2
    return False


def _zip_names(path: str) -> list[str]:
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    # A damaged directory also raises ValueError (names that are not UTF-8), NotImplementedError (a
    # version field) or EOFError.
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, EOFError) as exc:
        raise LoadError(f"{path}: not a readable zip archive: {exc}") from exc


def _read_npz(path: str) -> dict[str, np.ndarray]:
    """The arrays of an ``np.savez`` file (no pickled objects: ``allow_pickle=False``)."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if info.file_size > _INFLATION_FLOOR and info.file_size > _MAX_INFLATION * max(info.compress_size, 1):
                raise LoadError(f"{path}: member {info.filename!r} claims {info.file_size} bytes "
                                f"from {info.compress_size}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise LoadError(f"{path}: not a readable .npz of plain arrays: {exc}") from exc
    if not arrays:
        raise LoadError(f"{path}: the .npz holds no arrays")
    return arrays


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The named arrays of a weights file, read without torch and without running code from the file.

    Reads ``torch.save`` files (zip archives and legacy pre-1.6 streams), safetensors, NumPy ``.npz`` and
    pickles of NumPy arrays (a dict of arrays, such as ``pickle.dump(state_dict_as_numpy)``). Nested dicts are
    flattened to dotted keys (``{"model_state": {"lstm.weight_ih_l0": ...}}`` -> ``"model_state.lstm.weight_ih_l0"``);
    values that are not arrays (step counts, names) are left out. Build a model from the arrays with the layer
    classes (``le.LSTM(...)``, ``le.Dense(...)``) or ``le.from_torch(state_dict)``.
    """
    from . import numpy_pickle
    from ._safetensors import read_safetensors
    from ._torch_pickle import read_torch_file

    path = os.fspath(path)
    kind = detect(path)
    if kind in ("safetensors", "lstm_engine"):
        return read_safetensors(path)[0]
    if kind in ("torch", "torch-legacy"):
        return read_torch_file(path)
    if kind == "pickle":
        return numpy_pickle.arrays(numpy_pickle.read_pickle(path), path)
    if kind == "npz":
        return _read_npz(path)
    if kind == "keras":
        raise LoadError(f"{path}: a .keras model archive, not a weights file; load it with le.load")
    if kind == "torch-export":
        raise LoadError(f"{path}: a torch.export program, not a weights file; load it with le.load")
    if kind == "hdf5":
        raise LoadError(f"{path}: a Keras HDF5 file; load it with le.load (config= for weights-only files)")
    raise LoadError(f"{path}: not a weights file lstm_engine knows (expected a torch.save file, safetensors, "
                    ".npz, or a pickle of NumPy arrays)")


def load(path: str | os.PathLike | BinaryIO, *, dtype: Any = None, **options: Any) -> Model:
    """Load a model file, or ``"builtin:charlm"`` (the character model shipped with lstm_engine): the
    engine's own ``.safetensors``, a PyTorch state_dict (``.pt``, ``.pth``, ``.bin``, ``.safetensors``, legacy
    pre-1.6 ``torch.save`` files too), a Keras model (``.keras``, ``.h5``), an ONNX model (``.onnx``, needs the
    onnx package: ``pip install ".[onnx]"`` from a checkout) or a madmom model (its pickled networks).

    ``path`` may also be a binary file object (e.g. ``io.BytesIO(data)``) holding a safetensors file:
    the engine's own, as ``save`` writes it, or a PyTorch state_dict.

    The format is recognised from the file's content. ``dtype`` picks the weights' float type
    (default: as saved for the engine's own files, float32 otherwise). Other keyword options go to the
    format's loader (e.g. ``nonlinearity='relu'`` for an RNN state_dict, ``config=`` for Keras weights).
    Raises LoadError (naming the file) for anything it cannot load. For weights files of whole networks
    (a checkpoint dict, a pickle of NumPy arrays), read the arrays with ``le.load_state_dict`` and build the model.
    """
    from . import native
    from ._safetensors import read_safetensors
    from .torch import model_from_state_dict

    if hasattr(path, "read"):
        source = path
        path = getattr(source, "name", "<bytes>")
        kind = detect(source)
        if kind != "safetensors":
            raise LoadError(f"{path}: from a file object, load reads safetensors files only (the engine's own "
                            "or a PyTorch state_dict); save other formats to a file and load its path")
    else:
        source = path = resolve(path)
        kind = detect(path)
    if kind in ("safetensors", "lstm_engine"):
        tensors, metadata = read_safetensors(source)
        if native.is_native(metadata):
            if options:
                raise TypeError(f"load: options {sorted(options)} do not apply to an lstm_engine file")
            return native.model_from_safetensors(path, tensors, metadata, dtype)
        return model_from_state_dict(tensors, source=path, dtype=dtype, **options)
    if kind == "keras":
        from .keras import load_keras

        return load_keras(path, dtype=dtype, **options)
    if kind == "pickle":
        from . import madmom, numpy_pickle

        value = madmom.read_madmom(path)  # madmom's classes read as inert records, never run
        if madmom.is_madmom(value):
            if options:
                raise TypeError(f"load: options {sorted(options)} do not apply to a madmom model")
            return madmom.model_from_madmom(value, path, dtype)
        return model_from_state_dict(numpy_pickle.arrays(value, path), source=path, dtype=dtype, **options)
    if kind in ("torch", "torch-legacy", "npz"):
        return model_from_state_dict(load_state_dict(path), source=path, dtype=dtype, **options)
    if kind == "onnx" or (kind == "unknown" and path.lower().endswith(".onnx")):
        if options:
            raise TypeError(f"load: options {sorted(options)} do not apply to an ONNX file")
        from .onnx import load_onnx

        return load_onnx(path, dtype=dtype)
    if kind == "hdf5":
        from .keras import load_keras

        return load_keras(path, dtype=dtype, **options)
    if kind == "torch-export":
        raise LoadError(f"{path}: a torch.export program (.pt2); load the module it came from with "
                        "le.from_torch(module, example_input), and verify against this file with "
                        "lstm-engine verify MODEL --source it")
    raise LoadError(f"{path}: not a model file lstm_engine knows (expected an lstm_engine or PyTorch "
                    "safetensors file, a torch.save file, a .keras archive, a Keras .h5 file or an ONNX model)")
