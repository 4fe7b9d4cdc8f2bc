"""Readers and writers, one module per source format, and ``load``, which picks the right one."""
from __future__ import annotations

import os
from typing import Any, BinaryIO

from ..errors import LoadError
from ..model import Model


def _sniff(path: str) -> str:
    """The container kind of a file from its first bytes: 'zip', 'hdf5', 'safetensors' or 'unknown'."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise LoadError(f"{path}: cannot be read: {exc.strerror or exc}") from exc
    if head.startswith(b"PK"):
        return "zip"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "hdf5"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


def load(path: str | os.PathLike | BinaryIO, *, dtype: Any = None, **options: Any) -> Model:
    """Load a model file: the engine's own ``.safetensors``, a PyTorch state_dict (``.pt``, ``.pth``,
    ``.bin``, ``.safetensors``) or a Keras model (``.keras``, ``.h5``).

    ``path`` may also be a binary file object (e.g. ``io.BytesIO(data)``) holding a safetensors file:
    the engine's own, as ``save`` writes it, or a PyTorch state_dict.

    The format is recognised from the file's content. ``dtype`` picks the weights' float type
    (default: as saved for the engine's own files, float32 otherwise). Other keyword options go to the
    format's loader (e.g. ``nonlinearity='relu'`` for an RNN state_dict, ``config=`` for Keras weights).
    Raises LoadError (naming the file) for anything it cannot load.
    """
    from . import native
    from ._safetensors import read_safetensors
    from .torch import model_from_state_dict

    if hasattr(path, "read"):
        source = path
        path = getattr(source, "name", "<bytes>")
        kind = "safetensors" if source.read(9)[8:9] == b"{" else "unknown"
        if kind != "safetensors":
            raise LoadError(f"{path}: from a file object, load reads safetensors files only (the engine's own "
                            "or a PyTorch state_dict); save other formats to a file and load its path")
    else:
        source = path = os.fspath(path)
        kind = _sniff(path)
    if kind == "safetensors":
        tensors, metadata = read_safetensors(source)
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
    if kind == "hdf5":
        from .keras import load_keras

        return load_keras(path, dtype=dtype, **options)
    raise LoadError(f"{path}: not a model file lstm_engine knows (expected an lstm_engine or PyTorch "
                    "safetensors file, a torch.save zip, a .keras archive or a Keras .h5 file)")
