"""What lstm_engine.dask, lstm_engine.ray and ``lstm-engine run --dask/--ray`` share on a worker: the model
loaded once per process, threads sized to the worker, and scoring of a batch of sequences.

No scheduler is imported here; the callers pass what their scheduler says about the worker.
"""
from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

from ._threads import default_threads
from .model import Model

_cache: dict[tuple, Model] = {}
_cache_lock = threading.Lock()


def worker_model(model: Any, threads: int | None = None, concurrent: int = 1) -> Model:
    """The Model to run in this process: ``model`` itself, or the file at that path loaded once per process
    (again if the file changes), with threads set: ``threads`` if given, else the worker's share of the cores."""
    if not isinstance(model, Model):
        if not isinstance(model, (str, os.PathLike)):
            raise TypeError(f"model: expected an lstm_engine Model or a model file path, got {type(model).__name__}")
        from .formats import resolve

        path = os.path.realpath(resolve(model))  # builtin:charlm: the file this installation ships
        stat = os.stat(path)
        key = (path, stat.st_mtime_ns, stat.st_size)
        with _cache_lock:
            cached = _cache.get(key)
            if cached is None:
                from .formats import load

                for old in [k for k in _cache if k[0] == path]:
                    del _cache[old]
                cached = _cache[key] = load(path)
        model = cached
    model.threads = threads if threads is not None else default_threads(concurrent)
    return model


def forward_output(model: Model, x: np.ndarray, lengths: Any = None) -> np.ndarray:
    """The model's output for a dense batch, (B, T, out) or (B, out); float input is cast to the model's dtype."""
    y, _ = model.forward(x, lengths, cast=not model.takes_ids)
    return y


def score_sequences(model: Model, sequences: Any, lengths: Any = None) -> Any:
    """Outputs for a batch of sequences as a column holds them.

    A dense array — (n, T, F) floats or (n, T) ids — gives a dense (n, T, out) or (n, out) array (lengths,
    if given, pack it). A list or object array of sequences of their own lengths — each (T_i, F) or (T_i,)
    — runs as one batch padded to the longest, and gives an object array of (T_i, out) or (out,) arrays.
    """
    if isinstance(sequences, np.ndarray) and sequences.dtype != object:
        return forward_output(model, sequences, lengths)
    if lengths is not None:
        raise ValueError("lengths: sequences of their own lengths carry them; pass lengths only with a dense array")
    # Arrow list columns come as arrays of arrays: stack them into one (T_i, F) array.
    rows = [np.stack(s) if isinstance(s, np.ndarray) and s.dtype == object and s.size else np.asarray(s)
            for s in sequences]
    if not rows:
        raise ValueError("sequences: expected at least one sequence")
    ndim = 1 if model.takes_ids else 2
    for i, row in enumerate(rows):
        if row.ndim != ndim or len(row) == 0:
            want = "(steps,) token ids" if model.takes_ids else "(steps, features)"
            raise ValueError(f"sequences[{i}]: expected {want} with at least one step, got shape {row.shape}")
    steps = np.array([len(r) for r in rows])
    dtype = rows[0].dtype if model.takes_ids else model.dtype
    x = np.zeros((len(rows), steps.max()) + rows[0].shape[1:], dtype=dtype)
    for i, row in enumerate(rows):
        if row.shape[1:] != x.shape[2:]:
            raise ValueError(f"sequences[{i}]: shape {row.shape}, but sequences[0] has {rows[0].shape[1:]} features")
        x[i, :len(row)] = row
    y = forward_output(model, x, steps if (steps < x.shape[1]).any() else None)
    out = np.empty(len(rows), dtype=object)
    for i in range(len(rows)):
        out[i] = y[i, :steps[i]] if y.ndim == 3 else y[i]
    return out
