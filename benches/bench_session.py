"""Session benchmarks: what step() costs outside the kernel, and sessions in parallel threads.

    python benches/bench_session.py                    # prints the figures (about a minute)
    pytest benches/bench_session.py --benchmark-only   # the same calls under pytest-benchmark

1. Overhead split, LSTM 64->64, batch 1: the kernel alone (RecurrentKernel.run on ready buffers) against
   Session.step(x, out=y) and Session.step(x), timed in interleaved rounds; the overhead is the paired
   difference per round (shared machines drift: pairing cancels the drift).
   Chain step: Embedding(100, 64) -> LSTM 64 -> Dense 64, step(token id, out=y) against the bare LSTM 64
   session's step(x, out=y), interleaved; the ratio per round (issue 11's target: <= 1.5x).
2. Threads: sessions of one model (LSTM 256->256 x2 and 512->512, batch 1), one per thread, BLAS
   limited to one thread each (model.threads = 1); aggregate steps/s of 2 threads over 1 thread (alternating rounds,
   medians), and the outputs checked against a serial run.
"""
from __future__ import annotations

import statistics
import threading
import time

import numpy as np
from threadpoolctl import threadpool_limits

import lstm_engine as le


def lstm_model(input_size: int, hidden_size: int, num_layers: int = 1, seed: int = 0) -> le.Model:
    """LSTM layers with PyTorch's default init (uniform in ±1/sqrt(hidden))."""
    rng = np.random.default_rng(seed)
    bound = 1 / np.sqrt(hidden_size)
    layers, size = [], input_size
    for _ in range(num_layers):
        w = [rng.uniform(-bound, bound, s).astype(np.float32)
             for s in ((4 * hidden_size, size), (4 * hidden_size, hidden_size), (4 * hidden_size,), (4 * hidden_size,))]
        layers.append(le.LSTM(*w))
        size = hidden_size
    return le.Model(layers)


def overhead_split(hidden: int = 64, calls: int = 200, rounds: int = 300) -> dict:
    """Median µs per call of the kernel alone, step(out=) and step(), and the paired overheads."""
    model = lstm_model(hidden, hidden)
    model.threads = 1  # a 64-wide layer gains nothing from a second thread
    session = model.session(1)
    kernel = model.layers[0]._kernels[np.dtype(np.float32)]
    x = np.random.default_rng(0).standard_normal((1, hidden)).astype(np.float32)
    x3 = x.reshape(1, 1, hidden)
    y = np.empty((1, hidden), np.float32)
    h = np.zeros((1, 1, hidden), np.float32)
    c = np.zeros((1, 1, hidden), np.float32)
    work = np.empty(kernel.work_size(1, 1), np.float32)
    run, step = kernel.run, session.step
    timer = time.perf_counter
    rows = {"kernel": [], "step(out=)": [], "step()": []}
    with threadpool_limits(1):
        for _ in range(rounds):
            t0 = timer()
            for _ in range(calls):
                run(x3, y, h, c, None, work, False)
            t1 = timer()
            for _ in range(calls):
                step(x, out=y)
            t2 = timer()
            for _ in range(calls):
                step(x)
            t3 = timer()
            rows["kernel"].append((t1 - t0) / calls * 1e6)
            rows["step(out=)"].append((t2 - t1) / calls * 1e6)
            rows["step()"].append((t3 - t2) / calls * 1e6)
    k = rows["kernel"]
    return {
        **{name: statistics.median(v) for name, v in rows.items()},
        "overhead step(out=)": statistics.median(a - b for a, b in zip(rows["step(out=)"], k)),
        "overhead step()": statistics.median(a - b for a, b in zip(rows["step()"], k)),
        "best kernel": min(k),
        "best step(out=)": min(rows["step(out=)"]),
    }


def chain_overhead(hidden: int = 64, vocab: int = 100, calls: int = 200, rounds: int = 300) -> dict:
    """Median µs per step of Embedding -> LSTM -> Dense and of the bare LSTM, and their paired ratio."""
    rng = np.random.default_rng(0)
    bound = 1 / np.sqrt(hidden)
    bare = lstm_model(hidden, hidden)
    head = rng.uniform(-bound, bound, (hidden, hidden)).astype(np.float32)
    chain = le.Model([le.Embedding(rng.standard_normal((vocab, hidden)).astype(np.float32)), *lstm_model(hidden, hidden).layers,
                      le.Dense(head, np.zeros(hidden, np.float32))])
    for m in (bare, chain):
        m.threads = 1
    s_bare, s_chain = bare.session(1), chain.session(1)
    x = rng.standard_normal((1, hidden)).astype(np.float32)
    token = np.array([7])
    y, z = np.empty((1, hidden), np.float32), np.empty((1, hidden), np.float32)
    step_bare, step_chain = s_bare.step, s_chain.step
    timer = time.perf_counter
    rows: dict = {"bare LSTM step": [], "chain step": []}
    with threadpool_limits(1):
        for _ in range(rounds):
            t0 = timer()
            for _ in range(calls):
                step_bare(x, out=y)
            t1 = timer()
            for _ in range(calls):
                step_chain(token, out=z)
            t2 = timer()
            rows["bare LSTM step"].append((t1 - t0) / calls * 1e6)
            rows["chain step"].append((t2 - t1) / calls * 1e6)
    return {**{name: statistics.median(v) for name, v in rows.items()},
            "ratio": statistics.median(c / b for b, c in zip(rows["bare LSTM step"], rows["chain step"]))}


def thread_scaling(hidden: int, num_layers: int = 1, seconds: float = 1.5, rounds: int = 4,
                   threads: int = 2) -> dict:
    """Aggregate steps/s of `threads` sessions in as many threads, over one session in one thread.

    The two are measured in alternating rounds (1, 2, 1, 2, ...) and the medians compared, so that a
    neighbour's load on this shared machine hits both alike.
    """
    model = lstm_model(hidden, hidden, num_layers)
    model.threads = 1  # each session's kernel on one core: the Python threads are the parallelism
    xs = np.random.default_rng(1).standard_normal((threads, 1, hidden)).astype(np.float32)

    def run(n: int) -> float:
        counts = [0] * n
        stop = threading.Event()
        start = threading.Barrier(n + 1)

        def worker(k: int) -> None:
            s = model.session(1)
            x = xs[k]
            start.wait()
            while not stop.is_set():
                for _ in range(10):
                    s.step(x)
                counts[k] += 10

        pool = [threading.Thread(target=worker, args=(k,)) for k in range(n)]
        for t in pool:
            t.start()
        start.wait()
        t0, c0 = time.perf_counter(), time.process_time()
        time.sleep(seconds)
        stop.set()
        for t in pool:
            t.join()
        wall = time.perf_counter() - t0
        return sum(counts) / wall, (time.process_time() - c0) / wall

    ones, manys, cpus = [], [], []
    with threadpool_limits(1):
        for _ in range(rounds):
            rate, _ = run(1)
            ones.append(rate)
            rate, cpu = run(threads)
            manys.append(rate)
            cpus.append(cpu)
    # Results of parallel sessions equal a serial run bit for bit.
    steps = 50
    seqs = np.random.default_rng(2).standard_normal((threads, steps, 1, hidden)).astype(np.float32)
    serial = [np.stack([s.step(x) for x in seq]) for s, seq in ((model.session(1), q) for q in seqs)]
    par: list = [None] * threads

    def replay(k: int) -> None:
        s = model.session(1)
        par[k] = np.stack([s.step(x) for x in seqs[k]])

    ts = [threading.Thread(target=replay, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    one, many = statistics.median(ones), statistics.median(manys)
    # Cores the process got while its threads ran: under 2 means neighbours took the rest.
    return {"1 thread steps/s": one, f"{threads} threads steps/s": many, "ratio": many / one,
            "cores used by 2 threads": statistics.median(cpus),
            "identical to serial": all(np.array_equal(a, b) for a, b in zip(par, serial))}


# -- pytest-benchmark ----------------------------------------------------------------------------

def test_bench_step_lstm64(benchmark):
    model = lstm_model(64, 64)
    s = model.session(1)
    x = np.ones((1, 64), np.float32)
    y = np.empty((1, 64), np.float32)
    with threadpool_limits(1):
        benchmark(s.step, x, out=y)


def test_bench_kernel_lstm64(benchmark):
    model = lstm_model(64, 64)
    kernel = model.layers[0]._kernels[np.dtype(np.float32)]
    x = np.ones((1, 1, 64), np.float32)
    y, h, c = (np.zeros((1, 1, 64), np.float32) for _ in range(3))
    work = np.empty(kernel.work_size(1, 1), np.float32)
    with threadpool_limits(1):
        benchmark(kernel.run, x, y, h, c, None, work, False)


def test_bench_step_chain_lstm64(benchmark):
    rng = np.random.default_rng(0)
    model = le.Model([le.Embedding(rng.standard_normal((100, 64)).astype(np.float32)), *lstm_model(64, 64).layers,
                      le.Dense(rng.standard_normal((64, 64)).astype(np.float32))])
    s = model.session(1)
    token, y = np.array([7]), np.empty((1, 64), np.float32)
    with threadpool_limits(1):
        benchmark(s.step, token, out=y)


def test_bench_feed_lstm256_chunk32(benchmark):
    model = lstm_model(256, 256, 2)
    s = model.session(1)
    x = np.ones((1, 32, 256), np.float32)
    benchmark(s.feed, x)


def main() -> None:
    split = overhead_split()
    print("step() overhead, LSTM 64->64, batch 1 (median µs per call, one BLAS thread)")
    for name in ("kernel", "step(out=)", "step()"):
        print(f"  {name:<12} {split[name]:7.2f}")
    print(f"  outside the kernel: step(out=) {split['overhead step(out=)']:.2f} µs, "
          f"step() {split['overhead step()']:.2f} µs (best rounds: kernel {split['best kernel']:.2f}, "
          f"step(out=) {split['best step(out=)']:.2f})")
    chain = chain_overhead()
    print("chain step, Embedding(100, 64) -> LSTM 64 -> Dense 64, batch 1, against the bare LSTM 64 step "
          "(median µs per call, interleaved)")
    print(f"  bare LSTM step {chain['bare LSTM step']:7.2f}\n  chain step     {chain['chain step']:7.2f}\n"
          f"  ratio          {chain['ratio']:7.2f}  (target <= 1.5)")
    for hidden, layers in ((256, 2), (512, 1)):
        scale = thread_scaling(hidden, layers)
        print(f"sessions in threads, LSTM {hidden}->{hidden} x{layers}, batch 1, one BLAS thread per session")
        for name, value in scale.items():
            print(f"  {name:<22} {value:.2f}" if isinstance(value, float) else f"  {name:<22} {value}")


if __name__ == "__main__":
    main()
