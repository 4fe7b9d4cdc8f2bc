"""Batch scoring on Ray Data: ``Predictor``, a callable class for ``Dataset.map_batches``.

    import ray
    from lstm_engine.ray import Predictor

    ds = ray.data.read_parquet("s3://bucket/features/")        # a column "x" of sequences
    scored = ds.map_batches(Predictor, fn_constructor_args=("model.safetensors",),
                            fn_constructor_kwargs={"column": "x", "output_column": "y"},
                            concurrency=8, batch_size=256)

Each actor of the pool loads the model once (from a path readable on every node, or a Model pickled as
the engine's own file bytes) and runs with the CPUs Ray assigned it (its ``num_cpus``). Needs the ray
extra (``pip install ".[ray]"`` from a checkout); this module itself imports nothing from Ray, so a
Predictor also works in plain Python.
"""
from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from ._scale import score_sequences, worker_model

__all__ = ["Predictor", "init_local"]

# Read by Ray when it is imported: "0" makes a node loopback-only (its default on macOS and Windows). On
# Linux Ray otherwise takes the machine's network address as the node's, even when given 127.0.0.1, and
# its servers listen there.
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def init_local(num_cpus: int, **kwargs: Any) -> None:
    """Start a Ray instance of ``num_cpus`` CPUs on this machine whose servers listen on 127.0.0.1 only.

    Call it before anything in the process imports Ray (or run the process with
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``): Ray decides where its node listens when it is imported.
    ``kwargs`` go to ``ray.init``. Raises RuntimeError, with the instance stopped, if Ray would not
    keep to the loopback address.
    """
    if isinstance(num_cpus, bool) or not isinstance(num_cpus, int) or num_cpus < 1:
        raise ValueError(f"num_cpus: expected a positive int, got {num_cpus!r}")
    if "ray" not in sys.modules:
        os.environ.setdefault(LOCAL_ONLY_ENV, "0")
    import ray

    ray.init(num_cpus=num_cpus, **{"include_dashboard": False, "log_to_driver": False, **kwargs})
    address = ray.util.get_node_ip_address()
    if address not in ("127.0.0.1", "::1", "localhost"):
        ray.shutdown()
        raise RuntimeError(f"Ray would listen on {address}, not only on 127.0.0.1: Ray was imported before "
                           f"init_local; start Python with {LOCAL_ONLY_ENV}=0 or call init_local first")


def _assigned_threads(threads: int | None) -> int | None:
    """``threads`` if given, else the CPUs Ray assigned to the running task or actor (at most the process's
    cores), else None (outside Ray: the engine's default). Ray also sets OMP_NUM_THREADS from num_cpus, but a
    task can run in a worker process started for another task's num_cpus, so its environment may be stale."""
    if threads is not None or "ray" not in sys.modules:  # never import Ray just to ask
        return threads
    import ray

    if not ray.is_initialized():
        return None
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    # Capped by the affinity mask, not by the engine's cpu_count(), which honours OMP_NUM_THREADS, which is
    # exactly what may be stale in a reused worker process.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(int(cpus), cores)) if cpus else None


class Predictor:
    """Adds ``output_column`` to each batch: the model's output for the sequences in ``column``.

    ``column`` holds (n, T, F) floats or (n, T) token ids, or one sequence per row of its own length
    ((T_i, F) or (T_i,)); ``lengths_column`` (optional, dense input only) gives packed-sequence lengths.
    Outputs are (n, T, out) or (n, out) for dense input, one (T_i, out) or (out,) array per row otherwise.
    Batches come as dicts of NumPy arrays (Ray's default) or as pandas DataFrames.
    """

    def __init__(self, model: Any, *, column: str = "x", lengths_column: str | None = None,
                 output_column: str = "y", threads: int | None = None) -> None:
        self.model = worker_model(model, _assigned_threads(threads))
        self.column, self.lengths_column, self.output_column = column, lengths_column, output_column

    def __call__(self, batch: Any) -> Any:
        if isinstance(batch, dict):
            columns = batch
        elif hasattr(batch, "columns"):  # a pandas DataFrame
            columns = batch
        else:
            raise TypeError(f"Predictor: expected a batch as a dict of arrays or a DataFrame, got {type(batch).__name__}")
        for name in (self.column, self.lengths_column):
            if name is not None and name not in columns:
                raise ValueError(f"Predictor: the batch has no column {name!r} (it has {list(columns)})")
        x = columns[self.column]
        if not isinstance(batch, dict):
            x = x.to_numpy()
            if x.dtype == object and len(x) and isinstance(x[0], np.ndarray) and \
                    all(np.shape(row) == np.shape(x[0]) for row in x):
                x = np.stack(list(x))
        lengths = None if self.lengths_column is None else np.asarray(columns[self.lengths_column])
        y = score_sequences(self.model, x, lengths)
        if isinstance(batch, dict):
            return {**batch, self.output_column: y}
        out = batch.copy()
        out[self.output_column] = list(y)
        return out


class _Scorer:
    """One actor's model, for score_chunks."""

    def __init__(self, model: Any, threads: int | None) -> None:
        self.model = worker_model(model, _assigned_threads(threads))

    def forward(self, key: Any, x: np.ndarray, lengths: np.ndarray | None) -> tuple:
        y, state = self.model.forward(x, lengths)
        return key, y, state


def score_chunks(address: str, model: Any, batches: Any, threads: int | None = None) -> Any:
    """Run ``(key, x, lengths)`` batches on a Ray cluster, yielding ``(key, y, state)`` as they finish.

    ``address`` is ``auto`` (the running cluster), a cluster address (``ray://host:10001`` or
    ``host:6379``), or ``local:N`` for a Ray instance with N CPUs on this machine (listening on 127.0.0.1
    only, see init_local), started here and stopped at the end. One actor per ``threads`` CPUs (default 1)
    of the cluster holds the model, sent once through the object store; batches are read from ``batches``
    only as actors free up, two per actor at most. Each batch is one ``forward`` call, so the results are
    bit for bit those of one process at the same batches. An actor that dies (its worker or node lost) is
    restarted with the model and its batches are run again, as Ray Data does for its actor pools.
    (What ``lstm-engine run --ray`` uses: plain actors and NumPy batches, without Ray Data's read tasks,
    executor and helper actors, which took the bench's job from 1.17x to 1.65x plain forward's CPU seconds.)
    """
    if address.startswith("local:") and "ray" not in sys.modules:
        os.environ.setdefault(LOCAL_ONLY_ENV, "0")  # before Ray is imported: see init_local
    import ray
    from ray.util import ActorPool

    if ray.is_initialized():
        started = False
    elif address.startswith("local:"):
        n = address[len("local:"):]
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"--ray {address}: expected local:N with N at least 1 CPU")
        init_local(int(n))
        started = True
    else:
        ray.init(address=address, log_to_driver=False)
        started = True
    try:
        cpus = threads or 1
        actors = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus))
        # A lost actor is restarted (its __init__ run again with the model, which `shipped` keeps in the object
        # store until the end) and its lost calls are retried, as Ray Data's actor pools do; but a batch is
        # tried at most 4 times, where Ray Data retries forever: a batch that kills its worker every time (out
        # of memory, say) fails the job instead of hanging it. The model's own errors are never retried.
        scorer = ray.remote(num_cpus=cpus, max_restarts=-1, max_task_retries=3)(_Scorer)
        shipped = ray.put(model)
        pool = ActorPool([scorer.remote(shipped, threads) for _ in range(actors)])
        batches = iter(batches)
        pending = 0
        for item in batches:
            pool.submit(lambda actor, item: actor.forward.remote(*item), item)
            pending += 1
            if pending >= 2 * actors:
                break
        while pending:
            yield pool.get_next_unordered()
            pending -= 1
            item = next(batches, None)
            if item is not None:
                pool.submit(lambda actor, item: actor.forward.remote(*item), item)
                pending += 1
    finally:
        if started:
            ray.shutdown()
