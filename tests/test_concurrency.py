"""Concurrency: 8 threads x 1000 steps over separate sessions, over one pool with streams joining and leaving,
and over one model's forward; each thread's outputs and states equal a serial run of the same work.

Sessions and forward calls must match the serial run bit for bit: the kernels' arithmetic does not depend on
what else runs. Pool streams are batched with whatever else is waiting, and OpenBLAS picks its GEMM kernel by
batch size, so there float32 results may differ from a lone run in the last ulps (1e-6 here; float64 1e-12);
a state bleeding between slots would be off by orders of magnitude more. Every test has a timeout, and every
thread is joined with one: a deadlock fails instead of hanging CI.
"""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

import lstm_engine as le
from helpers import run_threads as _run_threads

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.timeout(180)

THREADS = 8
STEPS = 1000


def _lm(dtype=np.float32):
    """Embedding -> 2-layer LSTM -> Linear: the pool's batched path with every kind of stage."""
    torch.manual_seed(0)
    emb, rnn, head = torch.nn.Embedding(40, 16), torch.nn.LSTM(16, 48, num_layers=2, batch_first=True), \
        torch.nn.Linear(48, 40)
    return le.Model([le.Embedding(emb.weight, dtype=dtype), *le.from_torch(rnn, dtype=dtype).layers,
                     le.Dense(head.weight, head.bias, dtype=dtype)])


def _recurrent(dtype=np.float32):
    """A 2-layer GRU alone: sessions take the direct batch-1 kernel path, its 160 units split across threads
    (300 kB of recurrent weights per layer, over the engine's threshold for using a second core)."""
    torch.manual_seed(1)
    return le.from_torch(torch.nn.GRU(32, 160, num_layers=2), dtype=dtype)


def run_threads(target, n=THREADS, timeout=150):
    _run_threads(target, n, timeout)


def _inputs(model, rng, steps, batch=1):
    if model.takes_ids:
        return rng.integers(0, model.layers[0].num_embeddings, (steps, batch))
    return rng.standard_normal((steps, batch, model.input_size)).astype(model.dtype)


def _session_run(model, xs):
    """Step a fresh session through xs (steps, batch, ...): outputs (steps, batch, out) and the final state."""
    s = model.session(xs.shape[1])
    out = np.stack([s.step(x) for x in xs])
    return out, s.state


@pytest.mark.parametrize("make", [_lm, _recurrent])
def test_sessions_in_8_threads_equal_serial_runs(make):
    model = make()
    rng = np.random.default_rng(2)
    inputs = [_inputs(model, rng, STEPS, batch=1 + i % 3) for i in range(THREADS)]
    serial = [_session_run(model, xs) for xs in inputs]
    got = [None] * THREADS
    run_threads(lambda i: got.__setitem__(i, _session_run(model, inputs[i])))
    for (y, state), (want_y, want_state) in zip(got, serial):
        np.testing.assert_array_equal(y, want_y)
        for layer, want in zip(state, want_state):
            for a, b in zip(layer, want):
                np.testing.assert_array_equal(a, b)


def test_forward_in_8_threads_equals_serial():
    model = _lm()
    rng = np.random.default_rng(3)
    inputs = [rng.integers(0, 40, (1 + i % 4, 125)) for i in range(THREADS)]
    serial = [model.forward(x) for x in inputs]
    got = [None] * THREADS

    def work(i):
        for _ in range(8):  # 8 x 125 steps each
            got[i] = model.forward(inputs[i])

    run_threads(work)
    for (y, state), (want_y, want_state) in zip(got, serial):
        np.testing.assert_array_equal(y, want_y)
        for layer, want in zip(state, want_state):
            for a, b in zip(layer, want):
                np.testing.assert_array_equal(a, b)


def _sequences(rng, total):
    """Random sequence lengths summing to ``total``: a thread's streams join and leave between them."""
    lengths = []
    while sum(lengths) < total:
        lengths.append(min(int(rng.integers(1, 300)), total - sum(lengths)))
    return lengths


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pool_8_threads_with_streams_joining_and_leaving(dtype):
    model = _lm(dtype)
    tol = dict(rtol=0, atol=1e-6 if dtype == np.float32 else 1e-12)
    rng = np.random.default_rng(4)
    work = []  # per thread: list of (ids, reset_at) sequences
    for _ in range(THREADS):
        work.append([(rng.integers(0, 40, n), int(rng.integers(0, n)) if rng.random() < 0.3 else None)
                     for n in _sequences(rng, STEPS)])

    def reference(ids, reset_at):
        s = model.session()
        out = []
        for t, x in enumerate(ids):
            if t == reset_at:
                s.reset()
            out.append(s.step(np.array([x]))[0])
        return np.stack(out), s.state

    want = [[reference(*seq) for seq in seqs] for seqs in work]
    got = [[] for _ in range(THREADS)]
    with model.pool(max_batch=6) as pool:
        def thread(i):
            for ids, reset_at in work[i]:
                with pool.open() as stream:  # joins; leaving frees the slot for the next one
                    out = []
                    for t, x in enumerate(ids):
                        if t == reset_at:
                            stream.reset()
                        out.append(stream.step(int(x)))
                    got[i].append((np.stack(out), stream.state))

        run_threads(thread)
        stats = pool.stats
        assert pool.num_streams == 0
    assert stats["steps"] == THREADS * STEPS
    assert stats["batches"] < stats["steps"]  # steps did share batches
    for i in range(THREADS):
        assert len(got[i]) == len(want[i])
        for (y, state), (want_y, want_state) in zip(got[i], want[i]):
            np.testing.assert_allclose(y, want_y, **tol)
            for layer, ref in zip(state, want_state):
                for a, b in zip(layer, ref):
                    np.testing.assert_allclose(a, b, **tol)


def test_pool_slots_never_bleed():
    """Streams with very different states share batches; each must see only its own state.

    Half the streams are driven to a saturated state, the others run from zero on inputs that keep
    them near it: a row read from the wrong slot would be off by ~1, not by an ulp.
    """
    model = _recurrent()
    rng = np.random.default_rng(5)
    loud = rng.standard_normal((STEPS // 4, 32)).astype(np.float32) * 50
    quiet = np.zeros((STEPS // 4, 32), np.float32)
    s = model.session()
    want_loud = np.stack([s.step(x[None])[0] for x in loud])
    s = model.session()
    want_quiet = np.stack([s.step(x[None])[0] for x in quiet])
    assert np.abs(want_loud - want_quiet).max() > 0.5
    got = [None] * THREADS
    with model.pool(max_batch=THREADS) as pool:
        def thread(i):
            xs = loud if i % 2 else quiet
            with pool.open() as stream:
                got[i] = np.stack([stream.step(x) for x in xs])

        run_threads(thread)
        assert pool.stats["batches"] < THREADS * len(loud)
    for i in range(THREADS):
        np.testing.assert_allclose(got[i], want_loud if i % 2 else want_quiet, rtol=0, atol=1e-5)


def test_pool_threads_and_asyncio_tasks_together():
    model = _lm()
    rng = np.random.default_rng(6)
    seqs = [rng.integers(0, 40, 250) for _ in range(THREADS)]
    want = [model.forward(ids[None])[0][0] for ids in seqs]
    got = [None] * THREADS
    with model.pool(max_batch=8) as pool:
        async def task(i):
            with pool.open() as stream:
                got[i] = np.stack([await stream.astep(int(x)) for x in seqs[i]])

        async def tasks():
            await asyncio.gather(*(task(i) for i in range(THREADS // 2, THREADS)))

        def thread(i):
            if i == 0:
                asyncio.run(tasks())
            elif i < THREADS // 2 + 1:
                with pool.open() as stream:
                    got[i - 1] = np.stack([stream.step(int(x)) for x in seqs[i - 1]])

        run_threads(thread, n=THREADS // 2 + 1)
    for i in range(THREADS):
        np.testing.assert_allclose(got[i], want[i], rtol=0, atol=1e-5)


def test_closing_the_pool_under_load_neither_hangs_nor_loses_a_step():
    """Steps in flight when close() runs either finish or raise RuntimeError; no thread waits forever, and
    every step that returned gave the output a lone session gives for the same tokens."""
    model = _lm()
    outcomes = [[] for _ in range(THREADS)]
    outputs = [[] for _ in range(THREADS)]
    pool = model.pool(max_batch=4)
    started = threading.Event()

    def thread(i):
        try:
            stream = pool.open()
        except RuntimeError:
            outcomes[i].append("closed")
            return
        for t in range(STEPS):
            try:
                outputs[i].append(np.array(stream.step((t + i) % 40)))
                outcomes[i].append("ok")
                started.set()
            except RuntimeError as exc:
                assert "closed" in str(exc)
                outcomes[i].append("closed")
                return

    closer = threading.Thread(target=lambda: (started.wait(30), pool.close()))
    closer.start()
    run_threads(thread)
    closer.join(30)
    assert not closer.is_alive()
    for o in outcomes:  # some steps, then at most one refusal, and nothing after it
        k = o.count("ok")
        assert o in (["ok"] * k, ["ok"] * k + ["closed"]), o
    assert sum(o.count("ok") for o in outcomes) < THREADS * STEPS  # the close did cut them short
    for i in range(THREADS):
        session = model.session()
        for t, got in enumerate(outputs[i]):
            want = session.step(np.array([(t + i) % 40]))
            np.testing.assert_allclose(got, np.asarray(want).reshape(got.shape), rtol=1e-4, atol=1e-5)
    assert pool.closed
