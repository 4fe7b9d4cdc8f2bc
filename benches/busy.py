"""The engine on a busy machine: default threads against one thread, with 0, 1 and 2 busy co-runner processes.

    python benches/busy.py [--corunners 0 1 2] [--only NAME ...] [--reps N]

A co-runner is a Python process spinning on a core (started here and stopped at the end). For each number of
co-runners, the shipped character model's `forward` over 100 tokens (what `lstm-engine bench` times as
"whole sequence") and the workloads of peers.py run with the model's default threads and with threads=1,
interleaved round after round; the ratio default / one thread should stay at or below 1 (issue 12: at most 1.3
for the character model with 2 co-runners on a 2-core machine). A second one-thread model in the same rounds gives
the noise floor (one / one again): on a machine others load too, a ratio is only as good as that one.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads as wl  # noqa: E402

import lstm_engine as le  # noqa: E402
from lstm_engine.cli import SHIPPED_MODEL, _random_input  # noqa: E402


def interleaved(calls: dict[str, Callable[[], object]], reps: int, budget: float) -> dict[str, float]:
    """Median microseconds per call of each, timed in turn `reps` times, about `budget` seconds a block."""
    counts = {}
    for k, f in calls.items():
        f()
        t0 = time.perf_counter()
        f()
        counts[k] = max(1, int(budget / max(time.perf_counter() - t0, 1e-7)))
    samples: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(reps):
        for k, f in calls.items():
            t0 = time.perf_counter()
            for _ in range(counts[k]):
                f()
            samples[k].append((time.perf_counter() - t0) / counts[k] * 1e6)
    return {k: statistics.median(v) for k, v in samples.items()}


def cases(only: list[str] | None) -> dict[str, tuple[Callable[[], object], ...]]:
    """name -> (call with default threads, call with one thread, the same with another one-thread model)."""
    out = {}
    if not only or "charlm-100" in only:
        default, one, again = (le.load(SHIPPED_MODEL) for _ in range(3))
        one.threads = again.threads = 1
        ids = _random_input(default, 1, 100, np.random.default_rng(0))
        out["charlm-100"] = (lambda: default.forward(ids), lambda: one.forward(ids), lambda: again.forward(ids))
    for w in wl.WORKLOADS:
        if only and w.name not in only:
            continue
        weights = wl.make_weights(w)
        x = wl.make_inputs(w)[0]
        runs = [wl.engine_runner(w, wl.engine_model(w, weights, **opts)) for opts in ({}, {"threads": 1}, {"threads": 1})]
        out[w.name] = tuple(lambda run=run, x=x: run(x) for run in runs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corunners", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--only", nargs="*", help="charlm-100 and/or workload names (default: all but batch-large)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--budget", type=float, default=0.1, help="seconds per timed block, about")
    args = parser.parse_args()
    only = args.only or ["charlm-100"] + [w.name for w in wl.WORKLOADS if w.name != "batch-large"]
    info = le.cpu_info()
    print(f"{info['cpu']}; kernels {info['variant']}; default threads {info['threads']} ({info['threads_reason']})")
    todo = cases(only)
    print("| co-runners | case | default threads µs | 1 thread µs | default / 1 thread | 1 thread / 1 thread again "
          "(noise) | load average |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n in args.corunners:
        spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
        try:
            time.sleep(0.5)
            for name, (default, one, again) in todo.items():
                med = interleaved({"default": default, "one": one, "again": again}, args.reps, args.budget)
                print(f"| {n} | {name} | {med['default']:,.1f} | {med['one']:,.1f} | "
                      f"{med['default'] / med['one']:.2f} | {med['one'] / med['again']:.2f} | "
                      f"{os.getloadavg()[0]:.1f} |", flush=True)
        finally:
            for p in spinners:
                p.kill()
                p.wait()


if __name__ == "__main__":
    main()
