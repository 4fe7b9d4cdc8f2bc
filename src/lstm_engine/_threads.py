"""How many threads a call may use when the caller does not say: the cores this process was given.

Schedulers say how many cores a worker owns in different ways. Ray sets ``OMP_NUM_THREADS`` to a task's
or actor's ``num_cpus``; Dask's nanny sets it to 1 and runs ``threads_per_worker`` tasks at once in each
worker process; a container or ``taskset`` narrows the process's CPU affinity. The engine takes the
smallest of these, so workers side by side never ask for more threads than there are cores.
"""
from __future__ import annotations

import os

from . import _kernels


def omp_num_threads() -> int | None:
    """``OMP_NUM_THREADS`` as a positive int (its first level when nested, "4,2"), or None if unset or invalid."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def default_threads(concurrent: int = 1) -> int:
    """Threads for one call: the process's cores (its affinity) shared by ``concurrent`` calls running at
    once, and no more than ``OMP_NUM_THREADS`` when that is set; at least 1."""
    threads = max(1, _kernels.cpu_count() // max(1, concurrent))
    omp = omp_num_threads()
    return max(1, min(threads, omp) if omp else threads)
