"""Numerical stability: 100,000 steps with saturated forget/update gates, and pre-activations of ±1e4.

A float32 run of 100,000 steps whose forget gates sit at (or round to) 1 keeps accumulating into c; it must stay
finite and within 1e-3 of the float64 run (c, which grows into the tens of thousands, within 1e-3 relative).
The float64 run is itself checked against PyTorch (a shorter sequence by default, the full one under -m slow:
PyTorch takes ~40 s for it). Pre-activations of ±1e4 (and beyond) must give gates of exactly 0 or 1 and
candidates of exactly ±1 in every kernel — the vectorised and portable float32 ones, the batch-1 direct path
and the batched one, float64 — never NaN.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

import lstm_engine as le
from lstm_engine import _kernels

torch = pytest.importorskip("torch")

BOTH = (np.float32, np.float64)


@pytest.fixture
def simd(kernel_variant):
    """Every float32 kernel variant this CPU runs, forced in turn (conftest)."""
    return kernel_variant


def _saturated(cell, gate_bias, hidden=8, inputs=4, seed=0):
    """A torch LSTM whose forget gate, or a GRU whose update gate, has bias ``gate_bias`` (σ ≈ 1)."""
    torch.manual_seed(seed)
    module = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell](inputs, hidden, batch_first=True)
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-0.5, 0.5)
        block = slice(hidden, 2 * hidden)  # LSTM rows i, f, g, o; GRU rows r, z, n: the second block either way
        module.bias_ih_l0[block] = gate_bias
    return module.eval()


@functools.lru_cache(maxsize=None)
def _float64_run(cell, gate_bias, batch, steps):
    """The module, input and float64 result; float64 never takes the SIMD kernels, so one run serves both."""
    module = _saturated(cell, gate_bias)
    x = np.random.default_rng(1).standard_normal((batch, steps, 4))
    return module, x, le.from_torch(module, dtype=np.float64).forward(x)


def _long_run(cell, gate_bias, batch, steps):
    module, x, run64 = _float64_run(cell, gate_bias, batch, steps)
    return module, x, le.from_torch(module).forward(x.astype(np.float32)), run64


def _check_float32_tracks_float64(run32, run64):
    (y32, s32), (y64, s64) = run32, run64
    assert np.isfinite(y32).all() and all(np.isfinite(s).all() for s in s32[0])
    np.testing.assert_allclose(y32, y64, rtol=0, atol=1e-3)
    np.testing.assert_allclose(s32[0][0], s64[0][0], rtol=0, atol=1e-3)  # h
    if len(s32[0]) > 1:  # c: the accumulator
        np.testing.assert_allclose(s32[0][1], s64[0][1], rtol=1e-3, atol=1e-3)


# σ(6) = 0.9975; σ(20) rounds to exactly 1 in float32. Batch 1 takes the direct path, batch 3 the batched one.
# The portable float32 kernels (simd level 0) run the hardest case on both paths.
LONG_RUNS = [(cell, bias, batch, -1) for cell in ("lstm", "gru") for bias in (6.0, 20.0) for batch in (1, 3)] + [
    (cell, 20.0, batch, 0) for cell in ("lstm", "gru") for batch in (1, 3)]


@pytest.mark.parametrize("cell, gate_bias, batch, level", LONG_RUNS)
def test_100k_saturated_steps_float32_tracks_float64(cell, gate_bias, batch, level):
    _kernels.set_simd_level(level)
    try:
        _, _, run32, run64 = _long_run(cell, gate_bias, batch, 100_000)
    finally:
        _kernels.set_simd_level(-1)
    _check_float32_tracks_float64(run32, run64)
    if cell == "lstm" and gate_bias == 20.0:
        # The accumulation is real: c has grown far beyond anything a decaying cell reaches.
        assert np.abs(run64[1][0][1]).max() > 1000


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_saturated_float64_matches_torch(cell):
    module, x, (y64, s64) = _float64_run(cell, 20.0, 2, 500)
    with torch.no_grad():
        y, state = module.double()(torch.from_numpy(x))
    state = state if isinstance(state, tuple) else (state,)
    np.testing.assert_allclose(y64, y.numpy(), rtol=0, atol=1e-10)
    for got, want in zip(s64[0], state):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-12, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_100k_saturated_steps_match_torch(cell):
    module, x, run32, run64 = _long_run(cell, 20.0, 2, 100_000)
    _check_float32_tracks_float64(run32, run64)
    with torch.no_grad():
        y, state = module.double()(torch.from_numpy(x))
    state = state if isinstance(state, tuple) else (state,)
    np.testing.assert_allclose(run64[0], y.numpy(), rtol=0, atol=1e-9)
    for got, want in zip(run64[1][0], state):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-11, atol=1e-9)


# ----------------------------------------------------------------------------------------------------------
# Huge pre-activations: exact 0/1 gates


@pytest.mark.parametrize("value", [1e4, 88.0, 1e30, 3e38, np.inf])
def test_fast_activations_saturate_exactly(value):
    x = np.array([value, -value], np.float32)
    for level in range(_kernels.simd_level() + 1):  # every variant this CPU runs
        _kernels.set_simd_level(level)
        try:
            np.testing.assert_array_equal(_kernels.fast_sigmoid(x), [1.0, 0.0])
            np.testing.assert_array_equal(_kernels.fast_tanh(x), [1.0, -1.0])
        finally:
            _kernels.set_simd_level(-1)


def _sign_pattern(rng, rows, steps):
    return rng.choice([-1.0, 1.0], (steps, rows))


def _exact_lstm(signs_ih, x, scale):
    """Expected outputs of an LSTM whose gate pre-activations are ±scale: gates exactly 0/1, g exactly ±1."""
    B, T, _ = x.shape
    H = signs_ih.shape[0] // 4
    c = np.zeros((B, H))
    hs = np.zeros((B, T, H))
    cs = np.zeros((B, T, H))
    for t in range(T):
        pre = x[:, t] @ (signs_ih * scale).T
        i, f, g, o = (pre[:, k * H:(k + 1) * H] for k in range(4))
        i, f, o = (i > 0).astype(float), (f > 0).astype(float), (o > 0).astype(float)
        c = f * c + i * np.sign(g)
        cs[:, t] = c
        hs[:, t] = o * np.tanh(c)
    return hs, cs


@pytest.mark.parametrize("hidden", [3, 300])  # 300: the batch-1 path splits its units across threads
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("scale", [1e4, 1e30])
@pytest.mark.parametrize("dtype", BOTH)
def test_lstm_gates_exact_at_huge_preactivations(dtype, scale, batch, hidden, simd):
    rng = np.random.default_rng(5)
    T, inputs = 12, 2
    w_ih = rng.choice([-1.0, 1.0], (4 * hidden, inputs))
    w_ih[:, 1] = 0.0
    # Recurrent weights large too, but |h| <= 1 keeps their sum within 0.1 * scale: the sign stays x's.
    w_hh = rng.uniform(-1.0, 1.0, (4 * hidden, hidden)) * (0.1 * scale / hidden)
    x = np.zeros((batch, T, inputs))
    x[:, :, 0] = rng.choice([-1.0, 1.0], (batch, T))
    layer = le.LSTM(w_ih * scale, w_hh, np.zeros(4 * hidden), np.zeros(4 * hidden), dtype=dtype)
    y, (state,) = le.Model([layer]).forward(x.astype(dtype))
    want_h, want_c = _exact_lstm(w_ih, x, scale)
    assert not np.isnan(y).any()
    np.testing.assert_array_equal(state[1][0], want_c[:, -1])  # c: sums of exact 0/±1 terms
    np.testing.assert_allclose(y, want_h, rtol=0, atol=2e-7 if dtype is np.float32 else 1e-15)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("scale", [1e4, 1e30])
@pytest.mark.parametrize("dtype", BOTH)
def test_gru_gates_exact_at_huge_preactivations(dtype, scale, batch, simd):
    rng = np.random.default_rng(6)
    T, hidden = 12, 5
    w_ih = rng.choice([-1.0, 1.0], (3 * hidden, 1))
    x = rng.choice([-1.0, 1.0], (batch, T, 1))
    layer = le.GRU(w_ih * scale, np.zeros((3 * hidden, hidden)), dtype=dtype)
    y, _ = le.Model([layer]).forward(x.astype(dtype))
    h = np.zeros((batch, hidden))
    want = np.zeros((batch, T, hidden))
    for t in range(T):
        pre = x[:, t] @ w_ih.T
        r, z, n = (pre[:, k * hidden:(k + 1) * hidden] for k in range(3))
        z = (z > 0).astype(float)
        h = (1 - z) * np.sign(n) + z * h
        want[:, t] = h
    np.testing.assert_array_equal(y, want)  # every value is exactly -1, 0 or 1


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("dtype", BOTH)
def test_rnn_at_huge_preactivations_never_nan(dtype, nonlinearity):
    rng = np.random.default_rng(7)
    w_ih = rng.choice([-1.0, 1.0], (4, 1)) * 1e30
    x = rng.choice([-1.0, 1.0], (3, 9, 1))
    y, _ = le.Model([le.RNN(w_ih, np.zeros((4, 4)), nonlinearity=nonlinearity, dtype=dtype)]).forward(
        x.astype(dtype))
    pre = x @ w_ih.T
    want = np.sign(pre) if nonlinearity == "tanh" else np.maximum(pre, 0)
    np.testing.assert_array_equal(y, want.astype(dtype))
