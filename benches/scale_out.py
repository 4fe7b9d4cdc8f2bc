"""Batch scoring on 1 and 2 workers of a local Dask cluster and a local Ray instance, against plain forward.

    python benches/scale_out.py [--sequences 20000] [--steps 100] [--hidden 256]
                                [--engines dask,ray-run,ray-data] [--rounds 1] [--per-process]

The model: LSTM hidden 256, 2 layers, float32, 64 input features, the second layer returning its final
output (one vector per sequence, as when re-scoring every user's history). The input is a .npy file; each
worker process has one core, so plain forward runs with threads=1 too. Every run scores the same batches of
--batch-size rows as plain forward, and its results are checked bit for bit against plain forward's.

- "plain forward, 2 processes": the same batches in two plain processes side by side, half each: the
  speed-up any 2-worker cluster could reach at that moment.
- dask: lstm_engine.dask.forward on a LocalCluster (threads_per_worker=1) whose workers read their own
  slices of the file (no input data goes through the scheduler).
- ray-run: what `lstm-engine run MODEL X.npy -o Y.npy --ray auto --batch-size 256` does (its own code, in
  this process) on a Ray instance of 1 or 2 CPUs: one actor per CPU holds the model, this process reads the
  chunks and ships them through the object store.
- ray-data: the README's Ray Data recipe: read_numpy, blocks re-cut to the batch size, the Predictor on an
  actor pool (num_cpus=1 each), on an instance with one logical CPU more for Ray Data's read tasks.

Dask workers, the two plain processes and Ray's worker processes (and Ray Data's detached helper actors) are
started before the timing, as on a long-lived cluster; loading the model, and starting Ray's actors, is
inside.

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
With --per-process, each run's CPU seconds are also given per process (by the name it runs under: Ray's
workers are named by their actor, ray::IDLE when they ran only tasks) and per thread of this process.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import tempfile
import threading
import time

import numpy as np

import lstm_engine as le


ENGINES = ("dask", "ray-run", "ray-data")  # ray-run: lstm-engine run --ray; ray-data: the Predictor in Ray Data


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
        self.names: dict = {}  # (pid, start time) -> what the process calls itself (Ray retitles its workers)
        self.threads: dict = {}  # this process's threads: name -> CPU s at the last look, summed by name

    def look(self) -> None:
        for proc in [self.me, *self.me.children(recursive=True)]:
            try:
                key = (proc.pid, proc.create_time())
                times = proc.cpu_times()
                cpu = times.user + times.system
                # Ray renames its worker processes as they take a role (ray::IDLE, then ray::MapWorker(...)):
                # the last name seen is the one the process did its work under.
                self.names[key] = process_name(proc.cmdline()) or proc.name()
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
        threads: dict = {}
        python = {t.native_id: t.name for t in threading.enumerate()}  # Python 3.11 does not name OS threads
        for thread in self.me.threads():  # in this process: the driver's threads (Ray Data's executor, Ray's own)
            name = python.get(thread.id)
            if name is None:
                try:
                    with open(f"/proc/self/task/{thread.id}/comm") as f:
                        name = f.read().strip()
                except OSError:
                    name = "?"
            threads[name] = threads.get(name, 0.0) + thread.user_time + thread.system_time
        self.threads = {name: max(cpu, self.threads.get(name, 0.0)) for name, cpu in threads.items()}

    def __enter__(self) -> "Tree":
        self.look()
        self.start = dict(self.seen)
        self.threads_start = dict(self.threads)
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

    def breakdown(self) -> list:
        """(CPU s, wait s, name) of each process that used CPU while entered, summed by name, most first; then
        this process's threads by name, as (CPU s, None, "  thread NAME"). The sampler thread is left out."""
        by_name: dict = {}
        for key, (cpu, wait) in self.seen.items():
            b_cpu, b_wait = self.start.get(key, (0.0, 0.0))
            name = "this process (driver)" if key[0] == self.me.pid else self.names.get(key, "?")
            c, w = by_name.get(name, (0.0, 0.0))
            by_name[name] = (c + cpu - b_cpu, w + wait - b_wait)
        name = "this process (driver)"
        if name in by_name:
            by_name[name] = (by_name[name][0] - self.own, by_name[name][1])
        rows = sorted(((c, w, n) for n, (c, w) in by_name.items() if c >= 0.05), reverse=True)
        threads = {n: c - self.threads_start.get(n, 0.0) for n, c in self.threads.items()}
        threads.pop(self.thread.name, None)
        return rows + [(c, None, f"  thread {n}") for n, c in sorted(threads.items(), key=lambda t: -t[1]) if c >= 0.05]


def process_name(cmdline: list) -> str:
    """What a process is, in a few words: Ray's own title (ray::...), else its program and, for Python, its script
    or module (Ray's raylet, gcs_server, log_monitor.py, monitor.py; multiprocessing's and Dask's spawned workers)."""
    if not cmdline:
        return ""
    if cmdline[0].startswith("ray::"):
        return cmdline[0].split(".", 1)[0] if cmdline[0].count("(") == 0 else cmdline[0]
    words = [os.path.basename(cmdline[0])]
    rest = [a for a in cmdline[1:] if not a.startswith("-")]
    if words[0].startswith("python") and rest:
        words.append(os.path.basename(rest[0]) if rest[0].endswith(".py") else rest[0][:30])
    return " ".join(words)


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


class _Identity:
    def __call__(self, batch: dict) -> dict:
        return batch


@contextlib.contextmanager
def ray_instance(cpus: int, data: bool):
    """A local Ray instance of ``cpus`` CPUs, settled as a long-lived cluster is before a job arrives: its
    pre-started worker processes up and, with ``data``, Ray Data's detached helper actors (statistics,
    autoscaling coordinator, actor locations) started by a one-row job. Each job still starts its own actors."""
    from lstm_engine.ray import init_local

    init_local(cpus)  # before importing Ray: on 127.0.0.1 only
    import ray

    try:
        ray.get([ray.remote(lambda: None).remote() for _ in range(cpus)])
        if data:
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = False
            context.execution_options.preserve_order = True  # rows back in input order, to compare with plain
            ray.data.range(1).map_batches(_Identity, compute=ray.data.ActorPoolStrategy(size=1)).take_all()
        time.sleep(2)  # the start-up's last CPU seconds (workers importing Ray) out of the timing
        yield ray
    finally:
        ray.shutdown()


def on_ray_data(workers: int, model_path: str, x_path: str, n: int, batch: int) -> tuple:
    """The README's Ray Data recipe: read_numpy, blocks of exactly ``batch`` rows (so that each batch is the one
    plain forward runs: bit for bit the same results), the Predictor on an actor pool of ``workers``."""
    from lstm_engine.ray import Predictor

    # One logical CPU more than the actors hold, for Ray Data's read and repartition tasks (next to no work);
    # with only the actors' CPUs they never get scheduled (Ray 2.60, even with num_cpus=0).
    with ray_instance(workers + 1, data=True) as ray:
        with Tree() as tree:
            t0 = time.perf_counter()
            ds = ray.data.read_numpy(x_path).repartition(target_num_rows_per_block=batch, strict=True)
            ds = ds.map_batches(Predictor, fn_constructor_args=(model_path,), fn_constructor_kwargs={"column": "data"},
                                compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1, batch_size=batch)
            y = np.concatenate([b["y"] for b in ds.iter_batches(batch_size=None)])
            seconds = time.perf_counter() - t0
        return seconds, y, tree


def on_ray_run(workers: int, model_path: str, x_path: str, n: int, batch: int) -> tuple:
    """``lstm-engine run MODEL X.npy -o Y.npy --ray auto --batch-size BATCH -q`` on a running instance of
    ``workers`` CPUs (the command's own code, in this process): one actor per CPU, the chunks read here."""
    from lstm_engine.cli import main as cli

    with ray_instance(workers, data=False), tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "y.npy")
        with Tree() as tree, contextlib.redirect_stdout(io.StringIO()):
            t0 = time.perf_counter()
            code = cli(["run", model_path, x_path, "-o", out, "--ray", "auto", "--batch-size", str(batch), "-q"])
            seconds = time.perf_counter() - t0
        assert code == 0, code
        return seconds, np.load(out), tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--engines", default=",".join(ENGINES), help="which of: " + ", ".join(ENGINES))
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; the best time of each run counts")
    parser.add_argument("--per-process", action="store_true",
                        help="after each run, its CPU seconds per process (by name) and per thread of this process")
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
            if engine not in ENGINES:
                raise SystemExit(f"--engines: unknown engine {engine!r} ({', '.join(ENGINES)})")
        best: dict = {}  # run -> (seconds, CPU s, wait s, load) of its fastest round
        least_cpu: dict = {}  # run -> its fewest CPU seconds over the rounds (CPU s vary less than wall time)
        want = None
        print("| round | run | seconds | sequences/s | CPU s, all processes | waited for a core, s | load average after |"
              "\n|---|---|---|---|---|---|---|")
        for r in range(1, args.rounds + 1):
            # Interleaved rounds: the machine's other jobs come and go, so each round times every run once.
            todo = [("plain forward, 1 thread", lambda: plain(model_path, x_path, n, batch)),
                    ("plain forward, 2 processes", lambda: plain_processes(model_path, x_path, n, batch))]
            runs = {"dask": lambda w: on_dask(w, model_path, x_path, n, batch, shape),
                    "ray-data": lambda w: on_ray_data(w, model_path, x_path, n, batch),
                    "ray-run": lambda w: on_ray_run(w, model_path, x_path, n, batch)}
            for engine in engines:
                for workers in (1, 2):
                    todo.append((f"{engine}, {workers} worker(s)", lambda e=engine, w=workers: runs[e](w)))
            for name, run in todo:
                seconds, y, tree = run()
                now = load()
                print(f"| {r} | {name} | {seconds:.1f} | {n / seconds:,.0f} | {tree.cpu:.1f} | {tree.wait:.1f} "
                      f"| {now} |", flush=True)
                if args.per_process:
                    for cpu, wait, what in tree.breakdown():
                        print(f"|   | {what} | | | {cpu:.2f} | {'' if wait is None else f'{wait:.2f}'} | |")
                want = y if want is None else want
                # Every run scores the same batches as plain forward: bit for bit the same results.
                assert np.array_equal(y, want), name
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
