"""The batched workloads on one thread, in CPU time: the engine (its variant and AVX2 forced), PyTorch
(torch.set_num_threads(1)) and ONNX Runtime (intra_op_num_threads=1), against NumPy's sgemm on one thread.

    python benches/one_thread.py [--only NAME ...] [--reps N]

CPU time of the calling thread (time.thread_time) is what a busy shared machine disturbs least: waiting for a core
does not count, so these ratios hold steadier than peers.py's wall times while other processes run. Each system
runs one call in turn, round after round; prints GFLOP/s best and median over the rounds, the engine's time over
the best peer's, and its fraction of sgemm.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402
import workloads as wl  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=["batch", "batch-large"], help="workload names")
    parser.add_argument("--reps", type=int, default=7, help="rounds")
    args = parser.parse_args()

    import torch
    from threadpoolctl import threadpool_limits

    import lstm_engine as le

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    info = le.cpu_info()
    print(f"{peers.machine()}; lstm_engine kernels {info['variant']}; one thread, CPU time; "
          f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    a = np.random.default_rng(0).standard_normal((2048, 2048), np.float32)
    c = np.empty_like(a)
    print("GFLOP/s, best / median of the rounds; the ratios from the best.")
    print("| workload | engine | engine[avx2] | PyTorch | ORT | NumPy sgemm | engine / best peer | engine / sgemm |")
    print("| --- " * 8 + "|")
    for name in args.only:
        w = wl.BY_NAME[name]
        weights = wl.make_weights(w)
        engine = wl.engine_runner(w, wl.engine_model(w, weights, threads=1))
        runs = {"engine": engine, "avx2": peers.with_variant(engine, "avx2"), "torch": peers.torch_runner(w, weights),
                "ort": peers.ort_runner(w, weights, 1)}
        if info["variant"] != "avx512":
            del runs["avx2"]
        x = wl.make_inputs(w, calls=1)[0]
        ref = runs["torch"](x)
        for k, run in runs.items():
            err = float(np.abs(run(x) - ref).max())
            if err > 1e-4:
                raise AssertionError(f"{name}: {k} differs from torch by {err:.2e}")
        calls = {k: (lambda run=run: run(x)) for k, run in runs.items()}
        calls["sgemm"] = lambda: np.matmul(a, a, out=c)
        flops = {k: w.flops() for k in runs} | {"sgemm": 2 * 2048**3}
        seconds: dict[str, list[float]] = {k: [] for k in calls}
        with threadpool_limits(1):
            for _ in range(args.reps):
                for k, f in calls.items():
                    t0 = time.thread_time()
                    f()
                    seconds[k].append(time.thread_time() - t0)
        best = {k: flops[k] / min(v) / 1e9 for k, v in seconds.items()}
        med = {k: flops[k] / statistics.median(v) / 1e9 for k, v in seconds.items()}
        cols = " | ".join(f"{best[k]:.1f} / {med[k]:.1f}" if k in best else "–"
                          for k in ("engine", "avx2", "torch", "ort", "sgemm"))
        peer = max(best["torch"], best["ort"])
        print(f"| {name} | {cols} | {peer / best['engine']:.3f} | {best['engine'] / best['sgemm']:.0%} |")
    print(f"load average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
