"""Stream pool benchmark: 32 concurrent streams in one pool against 32 sessions stepped one at a time.

    python benches/bench_pool.py                     # prints steps/s and ratios (about a minute)
    python benches/bench_pool.py --models lstm512    # one model
    pytest benches/bench_pool.py --benchmark-only    # a pool round under pytest-benchmark

Every way uses the model's default threads. The baseline is the best a service can do without
batching: one thread stepping each stream's own session in turn. The pool runs each stream in its own
thread, or as an asyncio task; steps that wait together run as one batch. One session of batch 32
shows the ceiling. The figure is aggregate steps per second, each way measured in short interleaved
rounds (the machine is shared: interleaving spreads a neighbour's load over all of them alike), each
starting from a reset of the engine's contention state, with the share of its jobs that ran on two threads.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import threading
import time

import numpy as np

import lstm_engine as le
from lstm_engine import _kernels

STREAMS = 32


def _uniform(rng, bound, *shape):
    return rng.uniform(-bound, bound, shape).astype(np.float32)


def build(name: str, seed: int = 0) -> le.Model:
    """Mid-size models: bare LSTMs, and a token LM (the issue-5 token-lm workload)."""
    rng = np.random.default_rng(seed)

    def lstm(i, h):
        b = 1 / np.sqrt(h)
        return le.LSTM(_uniform(rng, b, 4 * h, i), _uniform(rng, b, 4 * h, h), _uniform(rng, b, 4 * h),
                       _uniform(rng, b, 4 * h))

    if name == "lstm256x2":
        return le.Model([lstm(256, 256), lstm(256, 256)])
    if name == "lstm512":
        return le.Model([lstm(512, 512)])
    if name == "token-lm":
        V, E, H = 10000, 128, 512
        return le.Model([le.Embedding(_uniform(rng, 1.0, V, E)), lstm(E, H), lstm(H, H),
                         le.Dense(_uniform(rng, 1 / np.sqrt(H), V, H), _uniform(rng, 0.01, V))])
    raise ValueError(name)


def step_input(model: le.Model, rng, n: int):
    if model.takes_ids:
        return [int(i) for i in rng.integers(0, model.layers[0].num_embeddings, n)]
    return list(rng.standard_normal((n, model.input_size)).astype(np.float32))


class Sessions:
    """32 sessions stepped one at a time in the calling thread: the baseline."""

    def __init__(self, model: le.Model) -> None:
        xs = step_input(model, np.random.default_rng(0), STREAMS)
        self.xs = [np.array([x]) if model.takes_ids else x[None] for x in xs]
        self.sessions = [model.session(1) for _ in range(STREAMS)]

    def measure(self, seconds: float) -> tuple[float, float]:
        steps = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for s, x in zip(self.sessions, self.xs):
                s.step(x)
            steps += STREAMS
        return steps / (time.perf_counter() - t0), 1.0

    def close(self) -> None:
        pass


class BatchSession(Sessions):
    """One session of batch 32: the ceiling of any batching (no pool, no threads)."""

    def __init__(self, model: le.Model) -> None:
        xs = step_input(model, np.random.default_rng(0), STREAMS)
        self.x = np.array(xs) if model.takes_ids else np.stack(xs)
        self.session = model.session(STREAMS)

    def measure(self, seconds: float) -> tuple[float, float]:
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            self.session.step(self.x)
            n += 1
        return n * STREAMS / (time.perf_counter() - t0), float(STREAMS)


class PoolThreads:
    """32 threads, each stepping its own stream of one pool while the gate is open."""

    def __init__(self, model: le.Model) -> None:
        xs = step_input(model, np.random.default_rng(0), STREAMS)
        self.pool = model.pool(max_batch=64)
        self.gate = threading.Event()
        self.stop = False
        self.counts = [0] * STREAMS

        def worker(k: int) -> None:
            with self.pool.open() as s:
                x = xs[k]
                while not self.stop:
                    self.gate.wait()
                    s.step(x)
                    self.counts[k] += 1

        self.threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(STREAMS)]
        for t in self.threads:
            t.start()

    def measure(self, seconds: float) -> tuple[float, float]:
        self.gate.set()
        time.sleep(min(0.2, seconds / 4))  # every stream is stepping
        c0, s0, t0 = sum(self.counts), dict(self.pool.stats), time.perf_counter()
        time.sleep(seconds)
        c1, s1, t1 = sum(self.counts), dict(self.pool.stats), time.perf_counter()
        self.gate.clear()
        time.sleep(0.05)  # the last steps drain
        return (c1 - c0) / (t1 - t0), (s1["steps"] - s0["steps"]) / max(1, s1["batches"] - s0["batches"])

    def close(self) -> None:
        self.stop = True
        self.gate.set()
        for t in self.threads:
            t.join(30)
        self.pool.close()


class PoolAsyncio:
    """32 asyncio tasks on an event loop in its own thread, each stepping its own stream."""

    def __init__(self, model: le.Model) -> None:
        xs = step_input(model, np.random.default_rng(0), STREAMS)
        self.pool = model.pool(max_batch=64)
        self.counts = [0] * STREAMS
        self.loop = asyncio.new_event_loop()
        self.running = False
        self.stop = False
        ready = threading.Event()

        async def stream(k: int, wake: asyncio.Event) -> None:
            with self.pool.open() as s:
                while not self.stop:
                    if not self.running:
                        await wake.wait()
                        continue
                    await s.astep(xs[k])
                    self.counts[k] += 1

        async def main() -> None:
            self.wake = asyncio.Event()
            ready.set()
            await asyncio.gather(*(stream(k, self.wake) for k in range(STREAMS)))

        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(main(),), daemon=True)
        self.thread.start()
        ready.wait()

    def _set(self, running: bool) -> None:
        def flip() -> None:
            self.running = running
            if running:
                self.wake.set()
            else:
                self.wake.clear()

        self.loop.call_soon_threadsafe(flip)

    def measure(self, seconds: float) -> tuple[float, float]:
        self._set(True)
        time.sleep(min(0.2, seconds / 4))
        c0, s0, t0 = sum(self.counts), dict(self.pool.stats), time.perf_counter()
        time.sleep(seconds)
        c1, s1, t1 = sum(self.counts), dict(self.pool.stats), time.perf_counter()
        self._set(False)
        time.sleep(0.05)
        return (c1 - c0) / (t1 - t0), (s1["steps"] - s0["steps"]) / max(1, s1["batches"] - s0["batches"])

    def close(self) -> None:
        self.stop = True
        self._set(True)
        self.thread.join(30)
        self.loop.close()
        self.pool.close()


def compare(model: le.Model, seconds: float, rounds: int) -> dict:
    """Median steps/s, mean batch and the process's CPU µs a step of each way, measured in interleaved rounds.

    This machine is shared: interleaving gives every way the same share of its neighbours' load. The CPU
    time a step (every thread of the process, spinning included) is the work a way costs, which a
    neighbour's load changes much less than the rate (a way whose threads wait for cores loses rate, not CPU).
    """
    ways = {"sessions": Sessions(model), "pool, threads": PoolThreads(model),
            "pool, asyncio": PoolAsyncio(model), "one batch-32 session": BatchSession(model)}
    rates: dict = {name: [] for name in ways}
    batches: dict = {name: [] for name in ways}
    cpus: dict = {name: [] for name in ways}
    splits: dict = {name: [0, 0] for name in ways}
    try:
        for _ in range(rounds):
            for name, way in ways.items():
                # Each way starts as a process that runs only it: no sample of the other processes' use
                # taken during the previous way (one thread a job while they took a core) carries over.
                _kernels._contention(-1)
                s0 = _kernels.pool_stats()
                c0, t0 = time.process_time(), time.perf_counter()
                rate, batch = way.measure(seconds)
                # measure() may run a moment before and after its timed part: CPU over all of it, steps by rate.
                cpus[name].append((time.process_time() - c0) / max(1.0, rate * (time.perf_counter() - t0)))
                rates[name].append(rate)
                batches[name].append(batch)
                s1 = _kernels.pool_stats()
                splits[name][0] += s1["split"] - s0["split"]
                splits[name][1] += s1["asked"] - s0["asked"]
    finally:
        for way in ways.values():
            way.close()
    return {name: (statistics.median(rates[name]), statistics.median(batches[name]),
                   statistics.median(cpus[name]) * 1e6, splits[name][0] / max(1, splits[name][1]))
            for name in ways}


# -- pytest-benchmark ------------------------------------------------------------------------------

def test_bench_pool_round_lstm512(benchmark):
    """One round: every one of 32 streams takes a step (threads), through the pool."""
    model = build("lstm512")
    xs = step_input(model, np.random.default_rng(0), STREAMS)
    with model.pool(max_batch=64) as pool:
        streams = [pool.open() for _ in range(STREAMS)]

        def round_() -> None:
            threads = [threading.Thread(target=s.step, args=(x,)) for s, x in zip(streams, xs)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        benchmark(round_)


def test_bench_sessions_round_lstm512(benchmark):
    model = build("lstm512")
    sessions = [model.session(1) for _ in range(STREAMS)]
    xs = [x[None] for x in step_input(model, np.random.default_rng(0), STREAMS)]

    def round_() -> None:
        for s, x in zip(sessions, xs):
            s.step(x)

    benchmark(round_)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["lstm256x2", "lstm512", "token-lm"])
    ap.add_argument("--seconds", type=float, default=1.0, help="per way and round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    print(f"{STREAMS} streams: aggregate steps/s, median of {args.rounds} interleaved rounds "
          f"(ratio over {STREAMS} sessions stepped one at a time; mean batch the pool formed; the process's CPU "
          f"µs a step; the share of its jobs that asked for two threads and got them); kernel variant "
          f"{le.cpu_info()['variant']}")
    for name in args.models:
        res = compare(build(name), args.seconds, args.rounds)
        base = res["sessions"][0]
        cells = [f"sessions {base:7.0f} (cpu {res['sessions'][2]:5.1f}, split {res['sessions'][3]:.0%})"]
        for way in ("pool, threads", "pool, asyncio", "one batch-32 session"):
            rate, batch, cpu, split = res[way]
            extra = f", batch {batch:4.1f}" if way.startswith("pool") else ""
            cells.append(f"{way} {rate:7.0f} ({rate / base:4.2f}x{extra}, cpu {cpu:5.1f}, split {split:.0%})")
        print(f"  {name:<10} " + " | ".join(cells) + f" | load average {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
