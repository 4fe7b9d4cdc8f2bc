"""Batch scoring on 1 and 2 workers of a local Dask cluster and a local Ray instance, against plain forward.

    python benches/scale_out.py [--sequences 20000] [--steps 100] [--hidden 256] [--engines dask,ray] [--rounds 1]

The model: LSTM hidden 256, 2 layers, float32, 64 input features, the second layer returning its final
output (one vector per sequence, as when re-scoring every user's history). The input is a .npy file that
workers read their own slices from (no input data goes through the scheduler); each worker process has one
core (Dask: threads_per_worker=1, Ray: num_cpus=1 per actor, plus one logical CPU for Ray Data's reads),
so plain forward runs with threads=1 too.
Prints each run as it ends (with the load average: on a shared machine other jobs take cores), then the best
of the interleaved rounds: sequences/s, the speed-up from 1 to 2 workers with its efficiency (speed-up / 2),
the 1-worker time over plain forward's, and (Dask) the CPU seconds the workers spent, which other jobs change
less than wall time. Dask workers are started and have imported the engine before the timing starts (as on a
long-lived cluster); loading the model is inside. Ray Data starts its actors inside the timing.
"""
from __future__ import annotations

import argparse
import importlib
import os
import tempfile
import time

import numpy as np

import lstm_engine as le


def machine() -> str:
    from peers import machine

    return machine()


def load() -> str:
    """The 1-minute load average: how many other jobs shared the cores with the run just timed."""
    return f"{os.getloadavg()[0]:.1f}"


def build(path: str, features: int, hidden: int, seed: int = 0) -> le.Model:
    rng = np.random.default_rng(seed)
    s = 1 / np.sqrt(hidden)
    w = lambda *shape: rng.uniform(-s, s, shape).astype(np.float32)  # noqa: E731
    model = le.Model([le.LSTM(w(4 * hidden, features), w(4 * hidden, hidden), w(4 * hidden), w(4 * hidden)),
                      le.LSTM(w(4 * hidden, hidden), w(4 * hidden, hidden), w(4 * hidden), w(4 * hidden),
                              return_sequences=False)])
    le.save(model, path)
    return model


def read_rows(path: str, lo: int, hi: int) -> np.ndarray:
    return np.ascontiguousarray(np.load(path, mmap_mode="r")[lo:hi])


def plain(model_path: str, x_path: str, n: int, batch: int) -> np.ndarray:
    model = le.load(model_path)
    model.threads = 1
    return np.concatenate([model.forward(read_rows(x_path, lo, min(n, lo + batch)))[0] for lo in range(0, n, batch)])


def on_dask(workers: int, model_path: str, x_path: str, n: int, batch: int, shape: tuple) -> tuple:
    import dask
    import dask.array as da
    from distributed import Client, LocalCluster

    import lstm_engine.dask

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, worker_dashboard_address=None) as cluster, Client(cluster) as client:
        # Start-up outside the timing, as on a long-lived cluster: the workers up, with the engine imported.
        client.run(importlib.import_module, "lstm_engine.dask")
        cpu0 = sum(client.run(time.process_time).values())
        blocks = [da.from_delayed(dask.delayed(read_rows)(x_path, lo, min(n, lo + batch)),
                                  (min(n, lo + batch) - lo,) + shape[1:], np.float32) for lo in range(0, n, batch)]
        t0 = time.perf_counter()
        y = lstm_engine.dask.forward(da.concatenate(blocks), model_path).compute()
        seconds = time.perf_counter() - t0
        return seconds, y, sum(client.run(time.process_time).values()) - cpu0


def on_ray(workers: int, model_path: str, x_path: str, n: int, batch: int) -> tuple:
    from lstm_engine.ray import Predictor, init_local

    # One logical CPU more than the actors hold, for Ray Data's read tasks (a memory-mapped slice each, next to
    # no work); with only the actors' CPUs the reads never get scheduled (Ray 2.60, even with num_cpus=0).
    init_local(workers + 1)  # before importing Ray: on 127.0.0.1 only
    import ray

    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.execution_options.preserve_order = True  # rows back in input order, to compare with plain
        t0 = time.perf_counter()
        ds = ray.data.read_numpy(x_path, override_num_blocks=max(2 * workers, n // (4 * batch)))
        ds = ds.map_batches(Predictor, fn_constructor_args=(model_path,), fn_constructor_kwargs={"column": "data"},
                            compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1, batch_size=batch)
        y = np.concatenate([b["y"] for b in ds.iter_batches(batch_size=None)])
        return time.perf_counter() - t0, y, None
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--engines", default="dask,ray")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; the best time of each run counts")
    args = parser.parse_args()
    n, batch = args.sequences, args.batch_size
    shape = (n, args.steps, args.features)
    with tempfile.TemporaryDirectory() as tmp:
        model_path, x_path = os.path.join(tmp, "model.safetensors"), os.path.join(tmp, "x.npy")
        build(model_path, args.features, args.hidden)
        x = np.lib.format.open_memmap(x_path, mode="w+", dtype=np.float32, shape=shape)
        rng = np.random.default_rng(1)
        for lo in range(0, n, 1000):
            x[lo:lo + 1000] = rng.standard_normal((min(n, lo + 1000) - lo,) + shape[1:], dtype=np.float32)
        x.flush()
        del x
        print(f"{machine()}, kernel variant: {le.cpu_info()['variant']}")
        print(f"{n} sequences x {args.steps} steps, LSTM {args.features}->{args.hidden} x2, float32, "
              f"batch {batch}\n")
        engines = args.engines.split(",")
        for engine in engines:
            if engine not in ("dask", "ray"):
                raise SystemExit(f"--engines: unknown engine {engine!r} (dask, ray)")
        best: dict = {}  # run -> (seconds, CPU seconds or None), the fastest of the rounds
        want = None
        print("| round | run | seconds | sequences/s | CPU s, all workers | load average after |\n"
              "|---|---|---|---|---|---|")
        for r in range(1, args.rounds + 1):
            # Interleaved rounds: the machine's other jobs come and go, so each round times every run once.
            t0, cpu0 = time.perf_counter(), time.process_time()
            y = plain(model_path, x_path, n, batch)
            runs = [("plain forward, 1 thread", time.perf_counter() - t0, time.process_time() - cpu0, y)]
            print(f"| {r} | {runs[-1][0]} | {runs[-1][1]:.1f} | {n / runs[-1][1]:,.0f} | {runs[-1][2]:.1f} "
                  f"| {load()} |", flush=True)
            want = y if want is None else want
            for engine in engines:
                for workers in (1, 2):
                    seconds, y, cpu = on_dask(workers, model_path, x_path, n, batch, shape) if engine == "dask" \
                        else on_ray(workers, model_path, x_path, n, batch)
                    runs.append((f"{engine}, {workers} worker(s)", seconds, cpu, y))
                    print(f"| {r} | {runs[-1][0]} | {seconds:.1f} | {n / seconds:,.0f} | "
                          f"{'' if cpu is None else f'{cpu:.1f}'} | {load()} |", flush=True)
            for name, seconds, cpu, y in runs:
                # Dask runs the same 256-row batches as plain forward: bit for bit; Ray's batches follow its
                # blocks, so rows may be batched with others and differ by rounding.
                same = np.array_equal(y, want) if not name.startswith("ray") else \
                    y.shape == want.shape and np.allclose(y, want, rtol=1e-5, atol=1e-6)
                assert same, name
                if name not in best or seconds < best[name][0]:
                    best[name] = (seconds, cpu)
        base, base_cpu = best["plain forward, 1 thread"]
        print(f"\nBest of {args.rounds} round(s):\n\n| run | seconds | sequences/s | vs 1 worker | vs plain forward "
              "| CPU s, all workers (vs plain) |\n|---|---|---|---|---|---|")
        for name, (seconds, cpu) in best.items():
            one = best.get(name.replace("2 worker", "1 worker"))
            speedup = f"{one[0] / seconds:.2f}x (efficiency {one[0] / seconds / 2:.0%})" if "2 worker" in name else ""
            cpu_text = "" if cpu is None else f"{cpu:.1f} ({cpu / base_cpu:.2f})"
            print(f"| {name} | {seconds:.1f} | {n / seconds:,.0f} | {speedup} | {seconds / base:.2f} | {cpu_text} |")


if __name__ == "__main__":
    main()
