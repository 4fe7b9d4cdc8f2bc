"""Batch scoring on Dask: ``forward`` over a Dask array, ``map_partitions`` over a DataFrame column.

    import dask.array as da
    import lstm_engine.dask

    x = da.from_zarr("features.zarr")                  # (B, T, F), chunked on the batch axis
    y = lstm_engine.dask.forward(x, "model.safetensors", lengths=lengths)
    y.to_zarr("scores.zarr")                           # or y.compute()

The model goes to the workers as a path (each worker process loads it once and keeps it) or as a Model
(pickled once into the graph as the engine's own file bytes). Each task runs one chunk with the worker's
share of the cores (see lstm_engine._threads); ``threads=`` overrides it. Needs the dask extra
(``pip install ".[dask]"`` from a checkout).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

try:
    import dask
    import dask.array as da
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError('lstm_engine.dask needs Dask: pip install ".[dask]" from a checkout (dask[array,dataframe] and distributed)') from exc

from ._scale import score_sequences, worker_model
from .model import Model

__all__ = ["forward", "map_partitions"]


def _concurrent_tasks() -> int:
    """How many tasks this process runs at once: the Dask worker's threads (1 outside a distributed worker;
    the engine's own pool already gives concurrent callers of the local threaded scheduler one core each)."""
    try:
        from distributed import get_worker

        return get_worker().state.nthreads
    except (ImportError, ValueError, AttributeError):
        return 1


def _run_block(x: np.ndarray, lengths: np.ndarray | None, model: Any, threads: int | None) -> np.ndarray:
    model = worker_model(model, threads, _concurrent_tasks())
    y, _ = model.forward(x, lengths, cast=not model.takes_ids)
    return y


def _local_model(model: Any) -> Model:
    """The model on the client, to know the output's shape and dtype before anything runs."""
    if isinstance(model, Model):
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model: expected an lstm_engine Model or a model file path, got {type(model).__name__}")
    return worker_model(model, threads=1)


def _shipped(model: Any) -> Any:
    # A Model becomes one key of the graph, sent once to each worker that needs it, not once per task;
    # a path is only a string.
    return dask.delayed(model, pure=True) if isinstance(model, Model) else os.path.abspath(os.fspath(model))


def forward(x: Any, model: Any, lengths: Any = None, threads: int | None = None, *,
            batch_size: int | None = None) -> da.Array:
    """The model's output for every sequence of x, as a lazy Dask array chunked like x on the batch axis.

    x: (B, T, F) floats or (B, T) token ids, a Dask array (or a NumPy array, then chunked by
    ``batch_size``); steps and features are rechunked to one chunk each. lengths: optional (B,) integers,
    Dask or NumPy. model: a model file path (loaded once per worker process; it must be readable there and
    here) or a Model. Returns (B, T, out), or (B, out) when the last recurrent layer returns only its
    final output, in the model's dtype. ``batch_size`` rechunks the batch axis: each chunk is one forward
    call, so results equal ``model.forward`` run on the same batches, bit for bit.
    """
    local = _local_model(model)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
                                or threads < 1):
        raise ValueError(f"threads: expected a positive int or None, got {threads!r}")
    if not isinstance(x, da.Array):
        x = np.asarray(x)
        x = da.from_array(x, chunks=(batch_size or "auto",) + (-1,) * (x.ndim - 1))
    if local.takes_ids:
        if x.ndim != 2 or x.dtype.kind not in "iu":
            raise ValueError(f"x: expected token ids, integers of shape (batch, steps), got {x.dtype} {x.shape}")
    else:
        if x.dtype.kind not in "fiu":
            raise TypeError(f"x: dtype {x.dtype}, expected real numbers (cast to {local.dtype})")
        if x.ndim != 3 or (local.input_size is not None and x.shape[2] != local.input_size):
            raise ValueError(f"x: expected shape (batch, steps, {local.input_size or 'features'}), got {x.shape}")
    if any(np.isnan(n) for n in x.shape):
        raise ValueError("x: the shape must be known; call x.compute_chunk_sizes() first")
    if x.shape[1] == 0:
        raise ValueError(f"x: expected at least one step, got shape {x.shape}")
    x = x.rechunk({0: batch_size or x.chunks[0], **{axis: -1 for axis in range(1, x.ndim)}})
    args: list = [x, "bt" if x.ndim == 2 else "btf"]
    if lengths is not None:
        lengths = lengths if isinstance(lengths, da.Array) else da.from_array(np.asarray(lengths), chunks=-1)
        if lengths.dtype.kind not in "iu":
            raise TypeError(f"lengths: expected integers, got dtype {lengths.dtype}")
        if lengths.shape != x.shape[:1]:
            raise ValueError(f"lengths: expected shape ({x.shape[0]},), one length per sequence, got {lengths.shape}")
        args += [lengths.rechunk((x.chunks[0],)), "b"]
    else:
        args += [None, None]
    # The output's shape and dtype from one sequence run here: (1, T, out) or (1, out) for any model.
    # (Token 1 rather than 0, which a mask_zero Embedding would mask out entirely.)
    probe = np.ones((1,) + x.shape[1:], dtype=x.dtype) if local.takes_ids else \
        np.zeros((1,) + x.shape[1:], dtype=local.dtype)
    y = local.forward(probe)[0]
    if not isinstance(y, np.ndarray):
        raise ValueError("model: it returns several outputs; lstm_engine.dask.forward gives one array "
                         "(run model.run on each chunk with x.map_blocks instead)")
    if y.ndim == 3 and y.shape[1] == x.shape[1]:
        index, new_axes = "bto", {"o": y.shape[2]}
    elif y.ndim == 2:
        index, new_axes = "bo", {"o": y.shape[1]}
    else:
        raise ValueError(f"model: lstm_engine.dask runs models whose output is (batch, steps, out) or (batch, out); "
                         f"this one gives {y.shape} for one sequence of {x.shape[1]} steps")
    return da.blockwise(_run_block, index, *args, _shipped(model), None, threads, None,
                        new_axes=new_axes, concatenate=True, dtype=y.dtype,
                        meta=np.empty((0,) * len(index), dtype=y.dtype))


def _score_partition(df: Any, model: Any, column: str, output: str, threads: int | None) -> Any:
    df = df.copy()
    if len(df):
        model = worker_model(model, threads, _concurrent_tasks())
        df[output] = list(score_sequences(model, df[column].to_numpy()))
    else:
        df[output] = np.empty(0, dtype=object)
    return df


def map_partitions(df: Any, model: Any, column: str, output: str = "y", threads: int | None = None) -> Any:
    """Score a Dask DataFrame column of sequences, adding column ``output``.

    Each cell of ``column`` is one sequence of its own length: a (T_i, F) array or nested list (or (T_i,)
    token ids). A partition runs as one batch, padded to its longest sequence; each output cell is
    (T_i, out), or (out,) when the model returns only the final output. Dask turns object columns into
    strings unless told not to: build the DataFrame under
    ``dask.config.set({"dataframe.convert-string": False})``.
    """
    import pandas as pd

    _local_model(model)
    if column not in df.columns:
        raise ValueError(f"column: {column!r} is not a column of the DataFrame (it has {list(df.columns)})")
    if isinstance(df._meta[column].dtype, pd.StringDtype):
        raise TypeError(f"column {column!r}: Dask stored the sequences as strings; create the DataFrame under "
                        'dask.config.set({"dataframe.convert-string": False}) so they stay arrays')
    meta = df._meta.assign(**{output: pd.Series([], dtype=object)})
    return df.map_partitions(_score_partition, _shipped(model), column, output, threads, meta=meta)


def _run_chunk(x: np.ndarray, lengths: np.ndarray | None, model: Model, threads: int | None) -> tuple:
    model = worker_model(model, threads, _concurrent_tasks())
    return model.forward(x, lengths)


def score_chunks(scheduler: str, model: Model, batches: Any, threads: int | None = None) -> Any:
    """Run ``(key, x, lengths)`` batches on a Dask cluster, yielding ``(key, y, state)`` as they finish.

    ``scheduler`` is a scheduler address (``tcp://host:8786``) or ``local:N`` for a cluster of N
    single-threaded worker processes on this machine, started here and stopped at the end. The model is
    sent once to every worker; batches are read from ``batches`` only as workers free up, so at most two
    per worker thread are held in memory. (What ``lstm-engine run --dask`` uses.)
    """
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler.startswith("local:"):
        n = scheduler[len("local:"):]
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"--dask {scheduler}: expected local:N with N at least 1 worker")
        # On 127.0.0.1 only, no dashboards: a cluster for this one command.
        cluster = LocalCluster(n_workers=int(n), threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=None, worker_dashboard_address=None)
    try:
        with Client(cluster or scheduler) as client:
            slots = 2 * max(1, sum(client.nthreads().values()))
            shipped = client.scatter(model, broadcast=True)
            batches = iter(batches)
            running = as_completed()
            keys: dict = {}

            def submit() -> bool:
                item = next(batches, None)
                if item is None:
                    return False
                key, x, lengths = item
                future = client.submit(_run_chunk, x, lengths, shipped, threads, pure=False)
                keys[future.key] = key
                running.add(future)
                return True

            for _ in range(slots):
                if not submit():
                    break
            for future in running:
                y, state = future.result()
                yield keys.pop(future.key), y, state
                submit()
    finally:
        if cluster is not None:
            cluster.close()
