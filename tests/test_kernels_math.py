"""The float32 kernels' own maths: rational tanh and sigmoid against libm, saturation, NaN, every CPU variant,
and the batch-1 direct path (threads, T=1 fused and T>1) against the general BLAS path and PyTorch."""
from __future__ import annotations

import os

import numpy as np
import pytest

import lstm_engine as le
from lstm_engine import _kernels

@pytest.fixture
def simd_level(kernel_variant):
    """Every variant this CPU runs (conftest's kernel_variant), forced in turn."""
    return kernel_variant


def dense_grid() -> np.ndarray:
    # Every float32 near 0 where tanh is steepest, then 2M evenly spaced points out to saturation.
    near_zero = np.arange(-2**20, 2**20, dtype=np.int32).view(np.float32)
    near_zero = near_zero[np.isfinite(near_zero)]
    return np.concatenate([near_zero, np.linspace(-20, 20, 2_000_001, dtype=np.float32)])


def test_tanh_within_1e6_of_libm(simd_level):
    x = dense_grid()
    got = _kernels.fast_tanh(x)
    err = np.abs(got.astype(np.float64) - np.tanh(x.astype(np.float64))).max()
    assert err <= 1e-6, err
    assert np.abs(got - np.tanh(x)).max() <= 1e-6  # and against float32 libm
    assert np.all(np.abs(got) <= 1)
    assert np.all(np.sign(got) == np.sign(x))  # odd: tanh(-0.0) is -0.0, small x keep their sign


def test_sigmoid_within_1e6_of_libm(simd_level):
    x = dense_grid()
    got = _kernels.fast_sigmoid(x)
    ref = 1 / (1 + np.exp(-x.astype(np.float64)))
    assert np.abs(got - ref).max() <= 1e-6
    assert np.all((got >= 0) & (got <= 1))


def test_saturation_is_exact_and_nan_propagates(simd_level):
    x = np.array([-1e4, -100, -9, 9, 100, 1e4, -np.inf, np.inf, np.nan, -np.nan, 0.0], np.float32)
    t = _kernels.fast_tanh(x)
    s = _kernels.fast_sigmoid(x)
    np.testing.assert_array_equal(t[:8], [-1, -1, -1, 1, 1, 1, -1, 1])
    np.testing.assert_array_equal(s[[0, 1, 4, 5, 6, 7]], [0, 0, 1, 1, 0, 1])
    assert np.isnan(t[8:10]).all() and np.isnan(s[8:10]).all()
    assert t[10] == 0 and s[10] == 0.5


def test_tails_of_every_vector_width(simd_level):
    # Lengths around the 4- and 8-wide loops and their scalar remainders.
    rng = np.random.default_rng(0)
    for n in range(0, 40):
        x = rng.uniform(-12, 12, n).astype(np.float32)
        np.testing.assert_allclose(_kernels.fast_tanh(x), np.tanh(x), atol=1e-6, rtol=0)


def lstm_reference(x, h, c, w_ih, w_hh, b):
    """Float64 LSTM over x (T, I) for one row, PyTorch's equations."""
    H = h.shape[0]
    ys = []
    for t in range(x.shape[0]):
        g = w_ih @ x[t] + w_hh @ h + b
        i, f, gg, o = (1 / (1 + np.exp(-g[:H])), 1 / (1 + np.exp(-g[H:2 * H])), np.tanh(g[2 * H:3 * H]),
                       1 / (1 + np.exp(-g[3 * H:])))
        c = f * c + i * gg
        h = o * np.tanh(c)
        ys.append(h)
    return np.array(ys), h, c


def gru_reference(x, h, w_ih, w_hh, b_ih, b_hh):
    H = h.shape[0]
    ys = []
    for t in range(x.shape[0]):
        gi, gh = w_ih @ x[t] + b_ih, w_hh @ h + b_hh
        r = 1 / (1 + np.exp(-(gi[:H] + gh[:H])))
        z = 1 / (1 + np.exp(-(gi[H:2 * H] + gh[H:2 * H])))
        n = np.tanh(gi[2 * H:] + r * gh[2 * H:])
        h = (1 - z) * n + z * h
        ys.append(h)
    return np.array(ys), h


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("I,H", [(5, 3), (64, 64), (37, 100), (300, 260)])
@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("threads", [1, 2])
def test_fast_path_matches_float64_reference(cell, I, H, B, threads, simd_level):
    """Float32 LSTM/GRU run in _cpu.c: fused one-step product (B=1, T=1), GEMV (B=1), GEMM (B>1),
    units split across threads, whole sequences, step by step, and packed lengths."""
    rng = np.random.default_rng(H + B)
    G = 4 if cell == "lstm" else 3
    s = 1 / np.sqrt(H)
    w_ih, w_hh = rng.uniform(-s, s, (G * H, I)), rng.uniform(-s, s, (G * H, H))
    b_ih, b_hh = rng.uniform(-s, s, G * H), rng.uniform(-s, s, G * H)
    T = 7
    x = rng.standard_normal((B, T, I))
    lengths = np.array([T, 3, 1, 6][:B])
    cls = le.LSTM if cell == "lstm" else le.GRU
    model = le.Model([cls(w_ih, w_hh, b_ih, b_hh)], threads=threads)
    min_bytes = _kernels.set_parallel_min_bytes(0)  # split even small layers, to test the split
    try:
        y_all, state_all = model.forward(x.astype(np.float32))
        y_len, state_len = model.forward(x.astype(np.float32), lengths=lengths)
        state, steps = None, []
        for t in range(T):
            y_t, state = model.forward(x[:, t:t + 1].astype(np.float32), initial_state=state)
            steps.append(y_t)
    finally:
        _kernels.set_parallel_min_bytes(min_bytes)
    for b in range(B):
        if cell == "lstm":
            ref, h, c = lstm_reference(x[b], np.zeros(H), np.zeros(H), w_ih, w_hh, b_ih + b_hh)
            np.testing.assert_allclose(state_all[0][1][0, b], c, atol=1e-5, rtol=0)
            np.testing.assert_allclose(state[0][1][0, b], c, atol=1e-5, rtol=0)
            _, _, c_len = lstm_reference(x[b, :lengths[b]], np.zeros(H), np.zeros(H), w_ih, w_hh, b_ih + b_hh)
            np.testing.assert_allclose(state_len[0][1][0, b], c_len, atol=1e-5, rtol=0)
        else:
            ref, h = gru_reference(x[b], np.zeros(H), w_ih, w_hh, b_ih, b_hh)
        np.testing.assert_allclose(y_all[b], ref, atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.concatenate(steps, 1)[b], ref, atol=1e-5, rtol=0)
        np.testing.assert_allclose(state_all[0][0][0, b], h, atol=1e-5, rtol=0)
        n = lengths[b]
        np.testing.assert_allclose(y_len[b, :n], ref[:n], atol=1e-5, rtol=0)
        np.testing.assert_array_equal(y_len[b, n:], 0)
        np.testing.assert_allclose(state_len[0][0][0, b], ref[n - 1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_fast_path_saturates_and_propagates_nan(cell):
    H, I = 48, 16
    G = 4 if cell == "lstm" else 3
    cls = le.LSTM if cell == "lstm" else le.GRU
    layer = cls(np.full((G * H, I), 1.0), np.zeros((G * H, H)), np.zeros(G * H), np.zeros(G * H))
    model = le.Model([layer])
    big = np.full((1, 1, I), 1e4 / I, np.float32)  # pre-activations of 1e4
    y, state = model.forward(big)
    assert np.isfinite(y).all()
    if cell == "lstm":
        np.testing.assert_array_equal(state[0][1], 1)  # i = f = o = 1, g = 1: c = 1 exactly
        np.testing.assert_allclose(y, np.tanh(1.0), atol=1e-6, rtol=0)
    y, state = model.forward(-big)
    assert np.isfinite(y).all()
    x = np.zeros((1, 3, I), np.float32)
    x[0, 1, 0] = np.nan
    y, state = model.forward(x)
    assert not np.isnan(y[0, 0]).any() and np.isnan(y[0, 1]).all() and np.isnan(y[0, 2]).all()


@pytest.mark.parametrize("B", [1, 3, 16])
def test_threads_are_deterministic(B):
    """The split across threads never changes a result (each output is one thread's fixed sum), and a
    split really happens: the kernel reports how many threads ran each call."""
    if _kernels.cpu_count() < 2:
        pytest.skip(f"this process may run on {_kernels.cpu_count()} core: no second thread to compare with")
    rng = np.random.default_rng(5)
    H, I, T = 256, 256, 48
    layer = le.LSTM(rng.standard_normal((4 * H, I)) / 16, rng.standard_normal((4 * H, H)) / 16)
    kernel = layer._kernels[np.dtype(np.float32)]
    x = rng.standard_normal((B, T, I)).astype(np.float32)

    def run(threads):
        y = np.empty((B, T, H), np.float32)
        h, c = np.zeros((1, B, H), np.float32), np.zeros((1, B, H), np.float32)
        work = np.empty(kernel.work_size(B, T), np.float32)
        used = kernel.run(x, y, h, c, None, work, True, threads)
        return used, np.concatenate([y.ravel(), h.ravel(), c.ravel()])

    used, want = run(1)
    assert used == 1
    # The pool lends its workers only when they are free (another process may hold this machine's cores):
    # run until a call got a second thread; every call, split or not, gives the same bits.
    counts = []
    for _ in range(60):
        for threads in (2, 3):
            used, got = run(threads)
            assert 1 <= used <= threads
            counts.append(used)
            np.testing.assert_array_equal(got, want)
        if max(counts) >= 2:
            break
    if B >= 16:
        # Only jobs this big (>= 4e6 flops a step, cpu_pool.c's CONTENDED_MIN_STEP_FLOPS) keep their workers
        # while the machine is contended; smaller ones then run on the caller's thread, as threads=1 would.
        assert max(counts) >= 2, f"no call ran on a second thread: {counts}"
    outs = [le.Model([layer], threads=threads).forward(x)[0] for threads in (1, 2, 3)]
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


def test_threads_option_is_checked():
    layer = le.GRU(np.zeros((6, 3)), np.zeros((6, 2)))
    with pytest.raises(ValueError, match="at least 1"):
        le.Model([layer], threads=0)
    with pytest.raises(TypeError, match="int or None"):
        le.Model([layer], threads=1.5)
    model = le.Model([layer], threads=None)
    assert model.threads == _kernels.cpu_count()


def test_cpu_info_names_the_variant_and_why():
    info = le.cpu_info()
    assert info["variant"] == _kernels.VARIANTS[_kernels.simd_level()]
    assert info["variants"]["portable"]["supported"]
    assert set(info["variants"]) == {"portable", "avx2", "avx512"}
    for name, v in info["variants"].items():
        assert v["reason"], name
    assert info["threads"] == _kernels.cpu_count() >= 1


def test_forcing_a_variant_and_the_errors():
    best = _kernels.simd_level()
    try:
        _kernels.set_simd_level("portable")
        assert _kernels.simd_level() == 0
        assert le.cpu_info()["reason"].startswith("forced")
        with pytest.raises(ValueError, match="unknown kernel variant 'sse'"):
            _kernels.set_simd_level("sse")
        with pytest.raises(ValueError, match="-1 or 0..2"):
            _kernels.set_simd_level(7)
        for name in _kernels.VARIANTS:
            supported, why = _kernels.variant_supported(name)
            if not supported:
                with pytest.raises(ValueError, match=f"'{name}' cannot run here: .*lacks"):
                    _kernels.set_simd_level(name)
    finally:
        _kernels.set_simd_level(None)
    assert _kernels.simd_level() == best


def _in_child(code, **env):
    import os
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env})
    return out.returncode, out.stdout.strip(), out.stderr.strip()


def test_environment_forces_a_variant_or_names_the_problem():
    code = "import lstm_engine as le; print(le.cpu_info()['variant'])"
    assert _in_child(code, LSTM_ENGINE_KERNELS="portable")[1] == "portable"
    rc, _, err = _in_child(code, LSTM_ENGINE_KERNELS="sse9")
    assert rc != 0 and "LSTM_ENGINE_KERNELS='sse9': unknown kernel variant" in err


def test_default_threads_follow_affinity_and_omp_num_threads():
    code = "import lstm_engine as le; i = le.cpu_info(); print(i['threads'], '|', i['threads_reason'])"
    assert _in_child(code, OMP_NUM_THREADS="1")[1] == "1 | OMP_NUM_THREADS=1"
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); " + code)
    assert _in_child(code, OMP_NUM_THREADS="")[1] == "1 | 1 core(s) in the process's affinity mask"


def test_contention_follows_the_cores_other_processes_leave():
    """The pool's contention rule (cpu_pool.c) on injected samples, in a child process (the rule's state is the
    process's): the cores other processes used, rounded off the usable ones, are the cores left (at least 1), and
    the pool holds the machine for contended while they leave fewer than it may use; a reset forgets them."""
    code = """if True:
        import time
        from lstm_engine import _kernels as k
        hold = time.monotonic_ns() + 10**11
        for others, cores in [(-1, 2), (0.2, 2), (0.6, 2), (1.9, 2), (0.4, 2), (1.4, 4), (0.0, 4), (-1, 2)]:
            c, left = k._contention(others, cores, hold)
            print(int(c), left, end=' ')
    """
    rc, out, err = _in_child(code)
    assert rc == 0, err
    assert out.split() == "0 0 0 2 1 1 1 1 0 2 1 3 0 4 0 0".split()


def test_busy_processes_beside_make_the_pool_run_short_jobs_alone():
    """Two processes spinning beside a child (more runnable threads than its cores): its pool's sample of
    /proc/stat (every 100 ms) finds the cores taken, and short jobs run on the caller alone, counted as
    contended, with the one-thread output."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("this process may run on one core: the pool never asks for a second thread")
    import subprocess
    import sys
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        out = _pool_child("""
deadline = time.monotonic() + 5
while time.monotonic() < deadline and not k.pool_stats()["contended_now"]:
    model.forward(x)
# Jobs soon after a stall (a worker here lost its core before the sample came) count as "stalled": until one
# counts as contended (the stall rule's one thread lasts up to 1 s).
same, split, contended = True, 0, 0
while time.monotonic() < deadline + 5 and not contended:
    y, d, after = delta(lambda: model.forward(x)[0])
    same, split, contended = same and np.array_equal(y, want), split + d["split"], contended + d["contended"]
print(same, split, contended > 0, after["contended_now"])
""")
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    assert out == "True 0 True True"


def _pool_child(body):
    """Run body in a child with an LSTM 256 model on 2 threads (`model`, input `x`, its one-thread output
    `want`) and `k` (_kernels), `delta(f)` (pool_stats change over f()), printing what body prints."""
    code = """if True:
        import os, time
        import numpy as np
        import lstm_engine as le
        from lstm_engine import _kernels as k
        rng = np.random.default_rng(3)
        H = 256
        w = rng.standard_normal((2, 4 * H, H)).astype(np.float32) / 16
        model = le.Model([le.LSTM(w[0], w[1])], threads=2)
        x = rng.standard_normal((1, 64, H)).astype(np.float32)
        want = le.Model([le.LSTM(w[0], w[1])], threads=1).forward(x)[0]  # a layer's threads are its model's
        cpus = sorted(os.sched_getaffinity(0))
        def delta(f):
            before = k.pool_stats()
            out = f()
            after = k.pool_stats()
            return out, {key: after[key] - before[key] for key in k.POOL_STATS}, after
    """ + "\n".join("        " + line for line in body.splitlines())
    rc, out, err = _in_child(code)
    assert rc == 0, err
    return out


def test_pool_runs_on_one_thread_while_the_process_may_use_one_core():
    """sched_setaffinity after the model was made (threads=2): the pool reads the cores again (every 100 ms) and
    runs the jobs on the caller alone, as threads=1; with both cores back it reads 2 and stops counting one_core
    (whether it then splits depends on who else runs here)."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("this process may run on one core: nothing to narrow")
    out = _pool_child("""
model.forward(x)
os.sched_setaffinity(0, {cpus[0]})
time.sleep(0.15)
y, d, after = delta(lambda: model.forward(x)[0])
print(np.array_equal(y, want), d["asked"] > 0, d["one_core"] == d["asked"], d["split"], after["cores"])
os.sched_setaffinity(0, set(cpus))
time.sleep(0.15)
y, d, after = delta(lambda: model.forward(x)[0])
print(np.array_equal(y, want), d["asked"] > 0, d["one_core"], after["cores"] == len(cpus))
""")
    assert out.splitlines() == ["True True True 0 1", "True True 0 True"]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_workers_joining_late_or_never_change_no_bit(cell):
    """Workers held back before each job (injected: none, 20 µs, 300 µs, 3 ms, and longer than the job) join at
    some step or never: the caller takes the ranges of workers that have not come without waiting for them, and
    the outputs stay those of one thread, bit for bit."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("this process may run on one core: the pool never asks for a second thread")
    code = """if True:
        import numpy as np
        import lstm_engine as le
        from lstm_engine import _kernels as k
        rng = np.random.default_rng(4)
        H, G = 256, %d
        cls = le.LSTM if G == 4 else le.GRU
        w = rng.standard_normal((2, G * H, H)).astype(np.float32) / 16
        x = rng.standard_normal((16, 24, H)).astype(np.float32)
        want = le.Model([cls(w[0], w[1])], threads=1).forward(x)[0]
        model = le.Model([cls(w[0], w[1])], threads=2)
        split = 0
        for delay in (0, 20_000, 300_000, 3_000_000, 200_000_000):
            k._pool_join_delay(delay)
            before = k.pool_stats()["split"]
            for _ in range(3):
                assert np.array_equal(model.forward(x)[0], want), delay
            split += k.pool_stats()["split"] - before
        k._pool_join_delay(0)
        print("same", split > 0)
    """ % (4 if cell == "lstm" else 3)
    rc, out, err = _in_child(code)
    assert rc == 0, err
    assert out.startswith("same"), out


def test_pool_runs_short_jobs_alone_while_contended_and_says_so():
    """A sample injected (other processes took all but one core) and held for 10 s holds the pool contended: a
    batch-1 sequence (short steps) runs on the caller alone, counted as contended, and cpu_info()["pool"] says
    contended_now; the output is the one-thread one."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("this process may run on one core: the pool never asks for a second thread")
    out = _pool_child("""
model.forward(x)
k._contention(len(cpus) - 0.8, len(cpus), time.monotonic_ns() + 10**10)
# A stall in the warm-up (a worker that lost its core here) sends jobs to one thread as "stalled" for up to 1 s.
same, split, contended, deadline = True, 0, 0, time.monotonic() + 5
while time.monotonic() < deadline and not contended:
    y, d, after = delta(lambda: model.forward(x)[0])
    same, split, contended = same and np.array_equal(y, want), split + d["split"], contended + d["contended"]
print(same, split, contended > 0, le.cpu_info()["pool"]["contended_now"])
""")
    assert out == "True 0 True True"


@pytest.mark.parametrize("N,K", [(1, 1), (7, 5), (10000, 512), (33, 37), (1000, 129)])
def test_dense_row_matches_numpy(N, K, kernel_variant):
    rng = np.random.default_rng(N * K)
    w = rng.standard_normal((N, K)).astype(np.float32)
    x = rng.standard_normal(K).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    want = w.astype(np.float64) @ x + b
    got = _kernels.dense_row(w, x, b, np.empty(N, np.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(K))
    np.testing.assert_allclose(_kernels.dense_row(w, x, None, np.empty(N, np.float32)), want - b,
                               rtol=1e-5, atol=1e-5 * np.sqrt(K))
    # A batch-1 Dense layer takes this path; more rows go through BLAS: both agree.
    layer = le.Dense(w, b)
    one, _ = layer.forward(x[None, None], None)
    many, _ = layer.forward(np.stack([x, x])[None], None)
    np.testing.assert_allclose(one[0, 0], many[0, 0], rtol=1e-5, atol=1e-5 * np.sqrt(K))
    # Rows split over the engine's threads: each row summed as on one thread, bit for bit (repeated, as
    # a call runs on one thread when no worker is spinning yet).
    min_bytes = _kernels.set_parallel_min_bytes(0)
    try:
        for _ in range(20):
            np.testing.assert_array_equal(_kernels.dense_row(w, x, b, np.empty(N, np.float32), 2), got)
    finally:
        _kernels.set_parallel_min_bytes(min_bytes)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        _kernels.dense_row(w, x[:-1] if K > 1 else np.zeros(2, np.float32), b, np.empty(N, np.float32))
