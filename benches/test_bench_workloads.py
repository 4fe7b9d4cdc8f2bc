"""pytest-benchmark timings of the engine alone on the issue's workloads (no PyTorch or ONNX Runtime needed).

    pytest benches/test_bench_workloads.py --benchmark-columns=median,iqr,rounds

peers.py runs the same workloads against the peers; these track the engine between changes.
"""
from __future__ import annotations

import numpy as np
import pytest

import workloads as wl


@pytest.mark.parametrize("workload", wl.WORKLOADS, ids=lambda w: w.name)
def test_workload(benchmark, workload):
    model = wl.engine_model(workload, wl.make_weights(workload))
    run = wl.engine_runner(workload, model)
    x = wl.make_inputs(workload)[0]
    out = run(x)
    assert np.isfinite(out).all()
    rounds = 2000 if workload.stateful and not workload.vocab else (200 if workload.stateful else 5)
    benchmark.extra_info["gflops"] = workload.flops() / 1e9
    benchmark.pedantic(run, args=(x,), rounds=rounds, iterations=1, warmup_rounds=1)
