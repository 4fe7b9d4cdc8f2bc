"""The stream pool: concurrent streams batched together, each with its own state; joining, leaving, closing."""
import asyncio
import gc
import threading
import time

import numpy as np
import pytest

import lstm_engine as le
from helpers import run_threads

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.timeout(60)

# Measured: a stream's outputs differ from running it alone by a few float32 ulps, because OpenBLAS
# picks different GEMM kernels for different batch sizes (see the README); float64 shows the same at 1e-15.
F32 = dict(atol=1e-6, rtol=0)


def lm(dtype=np.float32, seed=0):
    torch.manual_seed(seed)
    emb, rnn, head = torch.nn.Embedding(17, 8), torch.nn.LSTM(8, 24, 2, batch_first=True), torch.nn.Linear(24, 17)
    return le.Model([le.Embedding(emb.weight, dtype=dtype), *le.from_torch(rnn, dtype=dtype).layers,
                     le.Dense(head.weight, head.bias, dtype=dtype)])


def float_model(dtype=np.float32, seed=0):
    torch.manual_seed(seed)
    rnn = torch.nn.GRU(6, 20, batch_first=True)
    head = torch.nn.Linear(20, 3)
    return le.Model([*le.from_torch(rnn, dtype=dtype).layers, le.Dense(head.weight, head.bias, dtype=dtype)])


@pytest.mark.parametrize("make", [lm, float_model])
def test_threads_get_their_own_results(make):
    model = make()
    rng = np.random.default_rng(0)
    N, T = 12, 30
    if model.takes_ids:
        xs = rng.integers(0, 17, (N, T))
    else:
        xs = rng.standard_normal((N, T, 6)).astype(np.float32)
    want = model.forward(xs)[0]
    got = [None] * N
    with model.pool(max_batch=8) as pool:
        def stream(i):
            with pool.open() as s:
                got[i] = np.stack([s.step(xs[i, t]) for t in range(T)])

        run_threads(stream, N)
        stats = pool.stats
    for i in range(N):
        np.testing.assert_allclose(got[i], want[i], **F32)
    assert stats["steps"] == N * T
    assert stats["batches"] < N * T  # some steps did share a batch


def test_results_do_not_depend_on_batch_mates():
    """One stream's inputs, run with different companions each time (or alone)."""
    model = lm()
    rng = np.random.default_rng(1)
    T = 25
    mine = rng.integers(0, 17, T)
    alone = model.session(1)
    want = np.stack([alone.step(np.array([i]))[0] for i in mine])
    for companions in (0, 3, 11):
        others = rng.integers(0, 17, (companions, T))
        result = {}
        with model.pool(max_batch=16) as pool:
            def stream(i):
                with pool.open() as s:
                    seq = mine if i == 0 else others[i - 1]
                    out = []
                    for t in range(T):
                        out.append(s.step(int(seq[t])))
                        if i and rng.random() < 0.2:
                            time.sleep(0.0005)  # shuffle who is batched with whom
                    result[i] = np.stack(out)

            run_threads(stream, companions + 1)
        np.testing.assert_allclose(result[0], want, **F32)


def test_float64_pool_matches_forward():
    model = float_model(np.float64)
    rng = np.random.default_rng(2)
    xs = rng.standard_normal((5, 12, 6))
    want = model.forward(xs)[0]
    with model.pool(max_batch=4) as pool:
        got = [None] * 5

        def stream(i):
            with pool.open() as s:
                got[i] = np.stack([s.step(xs[i, t]) for t in range(12)])

        run_threads(stream, 5)
    for i in range(5):
        np.testing.assert_allclose(got[i], want[i], atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_chain_pool_runs_batches_of_every_size_in_one_call(dtype):
    """A chain of recurrent layers steps each batch through its one compiled step (plan.chain_step, bound to the
    gather buffers, run on the batch's first rows); float64 takes the layers' own run() inside it. Batches of
    1..max_batch rows, streams in scattered slots, against forward."""
    torch.manual_seed(4)
    model = le.from_torch(torch.nn.LSTM(5, 12, 2, batch_first=True), dtype=dtype)
    rng = np.random.default_rng(4)
    N, T = 7, 9
    xs = rng.standard_normal((N, T, 5)).astype(dtype)
    want = model.forward(xs)[0]
    with model.pool(max_batch=4) as pool:
        assert pool._core.chain is not None
        spare = [pool.open() for _ in range(5)]  # the streams below get slots 5.. after these close
        for s in spare[::2]:
            s.close()
        got = [None] * N

        def stream(i):
            with pool.open() as s:
                out = []
                for t in range(T):
                    out.append(s.step(xs[i, t]))
                    if rng.random() < 0.3:
                        time.sleep(0.0005)  # vary the batches
                got[i] = np.stack(out)

        run_threads(stream, N)
        sizes = pool.stats
    tol = dict(atol=1e-6, rtol=0) if dtype == np.float32 else dict(atol=1e-12, rtol=0)
    for i in range(N):
        np.testing.assert_allclose(got[i], want[i], **tol)
    assert sizes["steps"] == N * T


def test_row_copies():
    """The pool's gather, scatter and stacking helpers, and what they refuse."""
    from lstm_engine import _kernels

    rng = np.random.default_rng(5)
    src = rng.standard_normal((6, 3)).astype(np.float32)
    dst = np.zeros((4, 3), np.float32)
    idx = np.array([4, 0, 5], np.intp)
    _kernels.take_rows(src, idx, dst)
    np.testing.assert_array_equal(dst[:3], src[idx])
    assert not dst[3].any()
    back = np.zeros_like(src)
    _kernels.put_rows(dst, idx, back)
    np.testing.assert_array_equal(back[idx], src[idx])
    assert not back[[1, 2, 3]].any()
    for bad in (np.array([6], np.intp), np.array([-1], np.intp)):
        with pytest.raises(ValueError, match="out of range"):
            _kernels.take_rows(src, bad, dst)
        with pytest.raises(ValueError, match="out of range"):
            _kernels.put_rows(dst, bad, src)
    with pytest.raises(ValueError, match="intp"):
        _kernels.take_rows(src, idx.astype(np.int32), dst)
    with pytest.raises(ValueError, match="one dtype and width"):
        _kernels.take_rows(src, idx, np.zeros((4, 3), np.float64))
    with pytest.raises(ValueError, match="one dtype and width"):
        _kernels.take_rows(src, idx, np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError, match="rows"):
        _kernels.take_rows(src, np.arange(5, dtype=np.intp), dst)
    rows = list(src)
    out = np.zeros((8, 3), np.float32)
    assert _kernels.stack_rows(rows, out)
    np.testing.assert_array_equal(out[:6], src)
    out[:] = 0
    for odd in (src[:, 0], src[0].astype(np.float64), [1.0, 2.0, 3.0], src[0, :2]):
        assert not _kernels.stack_rows(rows[:2] + [odd], out)
    assert not out.any()
    with pytest.raises(ValueError, match="rows"):
        _kernels.stack_rows(rows, out[:5])


def test_steps_waiting_together_run_as_one_batch():
    model = float_model()
    pool = model.pool(max_batch=16)
    streams = [pool.open() for _ in range(8)]
    x = np.ones(6, np.float32)
    core = pool._core
    core.state_lock.acquire()  # the worker stalls on its first batch while the other steps queue
    try:
        threads = [threading.Thread(target=s.step, args=(x,)) for s in streams]
        threads[0].start()
        deadline = time.time() + 10
        while not (streams[0]._busy and not core.pending) and time.time() < deadline:
            time.sleep(0.001)  # the worker holds the first step
        for t in threads[1:]:
            t.start()
        while len(core.pending) < 7 and time.time() < deadline:
            time.sleep(0.001)
        assert core.batches == 0 and len(core.pending) == 7
    finally:
        core.state_lock.release()
    for t in threads:
        t.join(10)
    assert pool.stats == {"batches": 2, "steps": 8}
    pool.close()


def test_asyncio_streams():
    model = lm()
    rng = np.random.default_rng(3)
    xs = rng.integers(0, 17, (10, 20))
    want = model.forward(xs)[0]

    async def main(pool):
        async def stream(i):
            with pool.open() as s:
                return np.stack([await s.astep(int(t)) for t in xs[i]])

        return await asyncio.gather(*(stream(i) for i in range(10)))

    with model.pool() as pool:
        got = asyncio.run(main(pool))
        assert pool.stats["batches"] < 200
    for i in range(10):
        np.testing.assert_allclose(got[i], want[i], **F32)


def test_cancelled_async_step_frees_the_stream():
    model = lm()

    async def main(pool):
        s = pool.open()
        pool._core.state_lock.acquire()
        task = asyncio.create_task(s.astep(3))
        await asyncio.sleep(0.01)
        task.cancel()
        pool._core.state_lock.release()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):  # the step still ran; the stream becomes free when it has
            if not s._busy:
                break
            await asyncio.sleep(0.01)
        return await s.astep(4)

    with model.pool() as pool:
        y = asyncio.run(main(pool))
    ref = model.session(1)
    ref.step(3)
    np.testing.assert_allclose(y, ref.step(4)[0], **F32)


def test_streams_join_and_leave_while_others_run():
    model = float_model()
    with model.pool(max_batch=4) as pool:
        def churn(i):
            local = np.random.default_rng(i)
            for _ in range(6):
                n = int(local.integers(1, 8))
                xs = local.standard_normal((n, 6)).astype(np.float32)
                with pool.open() as s:
                    got = np.stack([s.step(x) for x in xs])
                np.testing.assert_allclose(got, model.forward(xs[None])[0][0], **F32)

        run_threads(churn, 10)
        assert pool.num_streams == 0
        # Slots were reused: fewer were made than streams opened.
        assert pool._core.capacity < 60


def test_stream_state_reset_and_slots():
    model = lm()
    with model.pool(max_batch=2) as pool:
        a = pool.open()
        a.step(1)
        a.step(2)
        state = a.state
        b = pool.open()
        b.state = state
        ref = model.session(1)
        ref.feed(np.array([[1, 2]]))
        np.testing.assert_allclose(b.step(5), ref.step(5)[0], **F32)
        a.reset()
        np.testing.assert_allclose(a.step(5), model.session(1).step(5)[0], **F32)
        with pytest.raises(ValueError, match=r"expected shape \(1, 1, 24\)"):
            a.state = [(np.zeros((1, 2, 24)), np.zeros((1, 2, 24)))] * 2
        a.close()
        a.close()  # twice is fine
        with pytest.raises(RuntimeError, match="closed"):
            a.step(1)
        c = pool.open()  # takes a's slot, with a zero state
        np.testing.assert_allclose(c.step(5), model.session(1).step(5)[0], **F32)
        many = [pool.open() for _ in range(10)]  # more streams than max_batch: slots grow
        assert pool.num_streams == 12
        for s in many:
            s.close()


def test_stream_input_checks():
    with lm().pool() as pool, pool.open() as s:
        with pytest.raises(ValueError, match="out of range"):
            s.step(17)
        with pytest.raises(TypeError, match="token id"):
            s.step(1.5)
        s.step(np.array([3]))
    with float_model().pool() as pool, pool.open() as s:
        with pytest.raises(ValueError, match=r"shape \(6,\)"):
            s.step(np.zeros((1, 6), np.float32))
        with pytest.raises(TypeError, match="float64"):
            s.step(np.zeros(6, np.float64))
        assert s.step([0.1] * 6).shape == (3,)
    for bad in (0, -2, 2.5):
        with pytest.raises(ValueError, match="max_batch"):
            lm().pool(max_batch=bad)
    for bad in (-0.001, 2, "1ms"):
        with pytest.raises(ValueError, match="max_delay"):
            lm().pool(max_delay=bad)


def test_one_stream_from_two_threads_raises():
    model = float_model()
    with model.pool() as pool, pool.open() as s:
        pool._core.state_lock.acquire()
        t = threading.Thread(target=s.step, args=(np.ones(6, np.float32),))
        t.start()
        try:
            deadline = time.time() + 10
            while not s._busy and time.time() < deadline:
                time.sleep(0.001)
            with pytest.raises(RuntimeError, match="already stepping"):
                s.step(np.ones(6, np.float32))
            with pytest.raises(RuntimeError, match="stepping"):
                s.close()
        finally:
            pool._core.state_lock.release()
        t.join(10)


def test_close_fails_waiting_steps_and_stops_the_worker():
    model = float_model()
    pool = model.pool()
    s1, s2 = pool.open(), pool.open()
    x = np.ones(6, np.float32)
    s1.step(x)
    errors = []
    pool._core.state_lock.acquire()

    def step(s):
        try:
            s.step(x)
        except RuntimeError as exc:
            errors.append(str(exc))

    core = pool._core
    t1 = threading.Thread(target=step, args=(s1,))
    t1.start()
    deadline = time.time() + 10
    while not (s1._busy and not core.pending) and time.time() < deadline:
        time.sleep(0.001)  # s1's step is in the worker's hands, stalled on the lock
    t2 = threading.Thread(target=step, args=(s2,))
    t2.start()
    while not core.pending and time.time() < deadline:
        time.sleep(0.001)  # s2's step waits for a batch
    closer = threading.Thread(target=pool.close)
    closer.start()
    time.sleep(0.01)
    pool._core.state_lock.release()
    for t in (t1, t2, closer):
        t.join(10)
        assert not t.is_alive()
    assert errors == ["the pool was closed before this step ran"]
    assert not pool._core.thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        s1.step(x)
    with pytest.raises(RuntimeError, match="closed"):
        pool.open()
    pool.close()  # twice is fine


def test_dropped_pool_stops_its_worker():
    pool = float_model().pool()
    thread = pool._core.thread
    del pool
    gc.collect()
    thread.join(10)
    assert not thread.is_alive()


def test_dropped_stream_gives_its_slot_back():
    with lm().pool(max_batch=2) as pool:
        s = pool.open()
        s.step(1)
        del s
        gc.collect()
        assert pool.num_streams == 0
        t = pool.open()
        assert t._slot == 0
        np.testing.assert_array_equal(t.state[0][0], 0)


def test_masked_steps_in_a_pool():
    """Embedding(mask_zero): a padding id repeats the stream's previous output, across batches."""
    rng = np.random.default_rng(6)
    w = lambda *s: rng.uniform(-0.6, 0.6, s)
    model = le.Model([le.Embedding(w(9, 4), mask_zero=True), le.LSTM(w(24, 4), w(24, 6), w(24), w(24)),
                      le.Dense(w(3, 6), w(3))])
    xs = rng.integers(1, 9, (4, 15))
    xs[0, :3] = 0
    xs[1, 4:9] = 0
    xs[3, 10:] = 0
    want = model.forward(xs)[0]
    got = [None] * 4
    with model.pool(max_batch=3) as pool:
        def stream(i):
            with pool.open() as s:
                got[i] = np.stack([s.step(int(t)) for t in xs[i]])

        run_threads(stream, 4)
    for i in range(4):
        np.testing.assert_allclose(got[i], want[i], **F32)


def test_masked_stream_state_round_trips_through_save_state():
    """save_state keeps whether a masked stream has output yet: a padding id right after load_state
    repeats the previous output, as in the uninterrupted run (the ``state`` setter starts afresh)."""
    rng = np.random.default_rng(7)
    w = lambda *s: rng.uniform(-0.6, 0.6, s)
    model = le.Model([le.Embedding(w(9, 4), mask_zero=True), le.LSTM(w(24, 4), w(24, 6), w(24), w(24)),
                      le.Dense(w(3, 6), w(3))])
    xs = np.array([0, 3, 5, 0, 0, 7, 0, 2])
    want = model.forward(xs[None])[0][0]
    assert np.abs(want[3]).max() > 0.05  # the padding step repeats a non-zero output
    with model.pool() as pool:
        a = pool.open()
        got = [a.step(int(t)) for t in xs[:3]]
        blob = a.save_state()
        b = pool.open()
        b.step(4)  # a stream with a state of its own, overwritten whole
        b.load_state(blob)
        got += [b.step(int(t)) for t in xs[3:]]
        np.testing.assert_allclose(np.stack(got), want, **F32)
        # The bytes are a batch-1 session's, both ways.
        s = model.session(1)
        s.load_state(blob)
        np.testing.assert_allclose(s.step(np.array([0]))[0], want[3], **F32)
        a.load_state(s.save_state())
        np.testing.assert_allclose(a.step(0), want[4], **F32)
        with pytest.raises(ValueError, match="different model"):
            b.load_state(lm().session(1).save_state())
        with pytest.raises(TypeError, match="bytes"):
            b.load_state("text")
