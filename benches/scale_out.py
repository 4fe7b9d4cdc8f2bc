"""Batch scoring on 1 and 2 workers of a local Dask cluster and a local Ray instance, against plain forward.

    python benches/scale_out.py [--sequences 20000] [--steps 100] [--hidden 256] [--engines dask,ray] [--rounds 1]

The model: LSTM hidden 256, 2 layers, float32, 64 input features, the second layer returning its final
output (one vector per sequence, as when re-scoring every user's history). The input is a .npy file that
workers read their own slices from (no input data goes through the scheduler); each worker process has one
core (Dask: threads_per_worker=1, Ray: num_cpus=1 per actor, plus one logical CPU for Ray Data's reads),
so plain forward runs with threads=1 too. "plain forward, 2 processes" runs the same batches in two plain
processes side by side, half each: the speed-up any 2-worker cluster could reach at that moment.
Dask workers and the two plain processes are started and have imported the engine before the timing starts
(as on a long-lived cluster); loading the model is inside. Ray Data starts its actors inside the timing.

Each run prints, besides its time: the CPU seconds of every process it used (this one and all it started:
Dask's workers and the scheduler in this process, Ray's raylet, GCS, agents and actors), the seconds its
threads were runnable but waited for a core (Linux /proc/*/task/*/schedstat), and the load average. On a
shared machine the wait is what other jobs took. With /proc/sys/kernel/sched_autogroup_enabled at 1 (as on
the project's machine), Linux shares the cores fairly between sessions first and between threads only within
a session: every process of this bench is in one session, so while another session keeps a core busy
a second worker mostly takes time from the first one, and the 1 -> 2 worker wall-clock ratio tells how busy
the others were. The best-of table also gives the speed-up the CPU seconds allow on two free cores
(2 x CPU s of 1 worker / CPU s of 2 workers), an estimate of what the wall clock shows when no other session
runs: the cluster's own per-second costs (event loops, scheduler, raylet) are counted at the loaded runs' length.
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


class Tree:
    """CPU seconds and seconds waiting for a core of this process and every process it started, while it is
    entered. A thread samples the tree every half second, so processes that end early (Ray Data's actors end
    with their operator) still count, up to their last half second; exited threads of a live process keep
    counting in its CPU times but not in its wait."""

    def __init__(self) -> None:
        import psutil  # a dependency of both distributed and ray

        self.psutil = psutil
        self.me = psutil.Process()
        self.seen: dict = {}  # (pid, start time) -> (CPU s, wait s) at the last look
        self.start: dict = {}

    def look(self) -> None:
        for proc in [self.me, *self.me.children(recursive=True)]:
            try:
                key = (proc.pid, proc.create_time())
                times = proc.cpu_times()
                cpu = times.user + times.system
            except self.psutil.Error:
                continue
            wait = 0.0
            try:
                for tid in os.listdir(f"/proc/{proc.pid}/task"):
                    with open(f"/proc/{proc.pid}/task/{tid}/schedstat") as f:
                        wait += int(f.read().split()[1]) / 1e9
            except (OSError, IndexError, ValueError):
                pass  # not Linux, or the process just ended: its last look stands
            self.seen[key] = (cpu, max(wait, self.seen.get(key, (0, 0))[1]))

    def __enter__(self) -> "Tree":
        import threading

        self.look()
        self.start = dict(self.seen)
        self.stop = threading.Event()

        def sample() -> None:
            while not self.stop.wait(0.5):
                self.look()
            self.own = time.thread_time()  # this sampler's CPU, not the run's: taken off at the end

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.look()
        begin = [self.start.get(key, (0.0, 0.0)) for key in self.seen]
        self.cpu = sum(v[0] - b[0] for v, b in zip(self.seen.values(), begin)) - self.own
        self.wait = sum(v[1] - b[1] for v, b in zip(self.seen.values(), begin))


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


def plain(model_path: str, x_path: str, n: int, batch: int) -> tuple:
    with Tree() as tree:
        t0 = time.perf_counter()
        y = plain_part(model_path, x_path, 0, n, batch)
        seconds = time.perf_counter() - t0
    return seconds, y, tree


def plain_processes(model_path: str, x_path: str, n: int, batch: int) -> tuple:
    """Plain forward in two processes side by side, each on half the batches (the same batches as plain)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    half = min(n, -(-n // batch // 2) * batch)  # on a batch boundary, so each batch is plain's
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"), initializer=importlib.import_module,
                             initargs=("lstm_engine",)) as pool:
        # Both processes started and the engine imported before the timing, as the Dask workers are.
        assert len(set(pool.map(started, [0.5, 0.5]))) == 2, "expected two processes"
        with Tree() as tree:
            t0 = time.perf_counter()
            parts = [pool.submit(plain_part, model_path, x_path, lo, hi, batch)
                     for lo, hi in ((0, half), (half, n)) if lo < hi]
            y = np.concatenate([part.result() for part in parts])
            seconds = time.perf_counter() - t0
        return seconds, y, tree


def started(pause: float) -> int:
    time.sleep(pause)  # long enough that the pool starts a second process for the second call
    return os.getpid()


def plain_part(model_path: str, x_path: str, lo: int, hi: int, batch: int) -> np.ndarray:
    model = le.load(model_path)
    model.threads = 1
    return np.concatenate([model.forward(read_rows(x_path, a, min(hi, a + batch)))[0] for a in range(lo, hi, batch)])


def on_dask(workers: int, model_path: str, x_path: str, n: int, batch: int, shape: tuple) -> tuple:
    import dask
    import dask.array as da
    from distributed import Client, LocalCluster

    import lstm_engine.dask

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, worker_dashboard_address=None) as cluster, Client(cluster) as client:
        # Start-up outside the timing, as on a long-lived cluster: the workers up, with the engine imported.
        client.run(importlib.import_module, "lstm_engine.dask")
        blocks = [da.from_delayed(dask.delayed(read_rows)(x_path, lo, min(n, lo + batch)),
                                  (min(n, lo + batch) - lo,) + shape[1:], np.float32) for lo in range(0, n, batch)]
        with Tree() as tree:
            t0 = time.perf_counter()
            y = lstm_engine.dask.forward(da.concatenate(blocks), model_path).compute()
            seconds = time.perf_counter() - t0
        return seconds, y, tree


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
        with Tree() as tree:
            t0 = time.perf_counter()
            ds = ray.data.read_numpy(x_path, override_num_blocks=max(2 * workers, n // (4 * batch)))
            ds = ds.map_batches(Predictor, fn_constructor_args=(model_path,), fn_constructor_kwargs={"column": "data"},
                                compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1, batch_size=batch)
            y = np.concatenate([b["y"] for b in ds.iter_batches(batch_size=None)])
            seconds = time.perf_counter() - t0
        return seconds, y, tree
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
        best: dict = {}  # run -> (seconds, CPU s, wait s, load) of its fastest round
        least_cpu: dict = {}  # run -> its fewest CPU seconds over the rounds (CPU s vary less than wall time)
        want = None
        print("| round | run | seconds | sequences/s | CPU s, all processes | waited for a core, s | load average after |"
              "\n|---|---|---|---|---|---|---|")
        for r in range(1, args.rounds + 1):
            # Interleaved rounds: the machine's other jobs come and go, so each round times every run once.
            todo = [("plain forward, 1 thread", lambda: plain(model_path, x_path, n, batch)),
                    ("plain forward, 2 processes", lambda: plain_processes(model_path, x_path, n, batch))]
            for engine in engines:
                for workers in (1, 2):
                    todo.append((f"{engine}, {workers} worker(s)",
                                 lambda e=engine, w=workers: on_dask(w, model_path, x_path, n, batch, shape)
                                 if e == "dask" else on_ray(w, model_path, x_path, n, batch)))
            for name, run in todo:
                seconds, y, tree = run()
                now = load()
                print(f"| {r} | {name} | {seconds:.1f} | {n / seconds:,.0f} | {tree.cpu:.1f} | {tree.wait:.1f} "
                      f"| {now} |", flush=True)
                want = y if want is None else want
                # Dask and the plain processes run the same 256-row batches as plain forward: bit for bit; Ray's
                # batches follow its blocks, so rows may be batched with others and differ by rounding.
                same = np.array_equal(y, want) if not name.startswith("ray") else \
                    y.shape == want.shape and np.allclose(y, want, rtol=1e-5, atol=1e-6)
                assert same, name
                if name not in best or seconds < best[name][0]:
                    best[name] = (seconds, tree.cpu, tree.wait, now)
                least_cpu[name] = min(tree.cpu, least_cpu.get(name, tree.cpu))
        base, base_cpu = best["plain forward, 1 thread"][:2]
        print(f"\nBest of {args.rounds} round(s) (CPU s: the fewest of the rounds):\n\n"
              "| run | seconds | sequences/s | vs 1 worker | vs plain forward | CPU s (vs plain) | waited for a core, s "
              "| load average after | speed-up the CPU s allow on 2 free cores |\n|---|---|---|---|---|---|---|---|---|")
        for name, (seconds, cpu, wait, now) in best.items():
            one = "plain forward, 1 thread" if name == "plain forward, 2 processes" else name.replace("2 worker", "1 worker")
            two = one != name
            speedup = f"{best[one][0] / seconds:.2f}x (efficiency {best[one][0] / seconds / 2:.0%})" if two else ""
            # On free cores the 1-worker run keeps one core busy and the 2-worker run two: their times are
            # their CPU seconds and half of them.
            allowed = f"{2 * least_cpu[one] / least_cpu[name]:.2f}x" if two else ""
            print(f"| {name} | {seconds:.1f} | {n / seconds:,.0f} | {speedup} | {seconds / base:.2f} "
                  f"| {least_cpu[name]:.1f} ({least_cpu[name] / least_cpu['plain forward, 1 thread']:.2f}) "
                  f"| {wait:.1f} | {now} | {allowed} |")

if __name__ == "__main__":
    main()
