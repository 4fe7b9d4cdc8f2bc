"""Gates: forward(record=True) against the kernels and torch; memory horizon; Jacobian products against autograd."""
import numpy as np
import pytest

import lstm_engine as le
from lstm_engine import gates

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.timeout(120)


def _w(rng, *shape, scale=0.5):
    return rng.uniform(-scale, scale, shape)


def _layers(kind, dtype, rng, I=5, H=6):
    """Recurrent layers covering every option the recording path follows."""
    if kind == "lstm_proj_bi":
        return [le.LSTM(_w(rng, 2, 4 * H, I), _w(rng, 2, 4 * H, 3), _w(rng, 2, 4 * H), _w(rng, 2, 4 * H),
                        _w(rng, 2, 3, H), dtype=dtype)]
    if kind == "lstm_keras":
        return [le.LSTM(_w(rng, 4 * H, I), _w(rng, 4 * H, H), _w(rng, 4 * H), None,
                        recurrent_activation="hard_sigmoid", activation="softsign", go_backwards=True, dtype=dtype)]
    if kind == "gru_bi_sum":
        return [le.GRU(_w(rng, 2, 3 * H, I), _w(rng, 2, 3 * H, H), _w(rng, 2, 3 * H), _w(rng, 2, 3 * H),
                       merge_mode="sum", dtype=dtype)]
    if kind == "gru_reset_before_last":
        return [le.GRU(_w(rng, 3 * H, I), _w(rng, 3 * H, H), _w(rng, 3 * H), _w(rng, 3 * H), reset_after=False,
                       return_sequences=False, dtype=dtype)]
    if kind == "rnn_relu_stack":
        return [le.RNN(_w(rng, H, I), _w(rng, H, H), _w(rng, H), _w(rng, H), nonlinearity="relu", dtype=dtype),
                le.LSTM(_w(rng, 4 * H, H), _w(rng, 4 * H, H), dtype=dtype)]
    raise AssertionError(kind)


KINDS = ["lstm_proj_bi", "lstm_keras", "gru_bi_sum", "gru_reset_before_last", "rnn_relu_stack"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("masking", ["none", "lengths", "mask_zero"])
def test_recorded_forward_equals_kernels(kind, dtype, masking):
    rng = np.random.default_rng(KINDS.index(kind))
    layers = _layers(kind, dtype, rng)
    B, T, V = 4, 7, 9
    lengths = np.array([7, 3, 1, 5]) if masking == "lengths" else None
    if masking == "mask_zero":
        model = le.Model([le.Embedding(_w(rng, V, 5), mask_zero=True, dtype=dtype)] + layers)
        x = rng.integers(1, V, (B, T))
        x[1, 4:] = 0
        x[2, 2] = 0  # a masked step in the middle: state carried, output repeated
    else:
        model = le.Model(layers)
        x = rng.standard_normal((B, T, 5)).astype(dtype)
    init = [tuple(rng.standard_normal(a.shape).astype(dtype) for a in layer.zero_state(B, dtype))
            for layer in model.recurrent_layers]
    y, state = model.forward(x, lengths, init)
    y2, state2, recorded = model.forward(x, lengths, init, record=True)
    tol = dict(atol=1e-5, rtol=0) if dtype == np.float32 else dict(atol=1e-10, rtol=0)
    assert y2.dtype == y.dtype and y2.shape == y.shape
    np.testing.assert_allclose(y2, y, **tol)
    for s, s2 in zip(state, state2):
        for a, b in zip(s, s2):
            np.testing.assert_allclose(b, a, **tol)
    assert len(recorded) == len(model.recurrent_layers)
    for layer, rec in zip(model.recurrent_layers, recorded):
        kind_name = type(layer).__name__
        assert tuple(rec) == gates.GATES[kind_name]
        D = layer.num_directions
        for name, arr in rec.items():
            width = (layer.proj_size or layer.hidden_size) if name == "h" else layer.hidden_size
            assert arr.shape == (D, B, T, width) and arr.dtype == np.dtype(dtype)
        if masking == "lengths":
            assert np.isnan(rec["h"][:, 2, 1:]).all() and not np.isnan(rec["h"][:, 2, 0]).any()


def test_initial_state_not_modified_and_normal_path_unchanged():
    rng = np.random.default_rng(3)
    model = le.Model(_layers("lstm_proj_bi", np.float32, rng))
    x = rng.standard_normal((2, 5, 5)).astype(np.float32)
    init = [tuple(np.ones(a.shape, np.float32) for a in model.recurrent_layers[0].zero_state(2, np.float32))]
    y_rec, state_rec, recorded = model.forward(x, initial_state=init, record=True)
    assert all((a == 1).all() for a in init[0])
    y, state = model.forward(x, initial_state=init)
    np.testing.assert_allclose(y_rec, y, rtol=0, atol=1e-6)
    for a, b in zip(state_rec[0], state[0]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    # The recorded h at the last step of each direction is the output at that step.
    h = recorded[0]["h"]  # (D, B, T, P)
    P = h.shape[-1]
    np.testing.assert_allclose(h[0, :, -1], y[:, -1, :P], rtol=0, atol=1e-6)
    np.testing.assert_allclose(h[1, :, 0], y[:, 0, P:], rtol=0, atol=1e-6)


def _torch_lstm_gates(net, x):
    """i, f, g, o, c, h per step from torch: LSTMCell arithmetic on the module's own parameters."""
    H = net.hidden_size
    xt = torch.from_numpy(x).double()
    B, T, _ = xt.shape
    h = torch.zeros(B, H, dtype=torch.float64)
    c = torch.zeros(B, H, dtype=torch.float64)
    out = {k: [] for k in "ifgoch"}
    W_ih, W_hh = net.weight_ih_l0.double(), net.weight_hh_l0.double()
    b = (net.bias_ih_l0 + net.bias_hh_l0).double()
    for t in range(T):
        a = torch.nn.functional.linear(xt[:, t], W_ih) + torch.nn.functional.linear(h, W_hh) + b
        i, f, g, o = a.chunk(4, 1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * c + i * g
        h = o * torch.tanh(c)
        for k, v in zip("ifgoch", (i, f, g, o, c, h)):
            out[k].append(v)
    return {k: torch.stack(v, 1).detach().numpy() for k, v in out.items()}, h


def test_lstm_gates_match_torch():
    torch.manual_seed(0)
    net = torch.nn.LSTM(4, 8, batch_first=True)
    x = np.random.default_rng(0).standard_normal((3, 10, 4)).astype(np.float32)
    model = le.from_torch(net)
    _, _, rec = model.forward(x, record=True)
    want, h_last = _torch_lstm_gates(net, x)
    for k in "ifgoch":
        np.testing.assert_allclose(rec[0][k][0], want[k], atol=1e-5, rtol=0)
    with torch.no_grad():
        _, (h_n, _) = net(torch.from_numpy(x))
    np.testing.assert_allclose(h_last.detach().numpy(), h_n[0].numpy(), atol=1e-5)


def test_gru_gates_match_torch():
    torch.manual_seed(1)
    net = torch.nn.GRU(4, 8, batch_first=True)
    x = np.random.default_rng(1).standard_normal((2, 6, 4)).astype(np.float32)
    _, _, rec = le.from_torch(net).forward(x, record=True)
    H = 8
    xt = torch.from_numpy(x).double()
    h = torch.zeros(2, H, dtype=torch.float64)
    gi = torch.nn.functional.linear(xt, net.weight_ih_l0.double(), net.bias_ih_l0.double())
    for t in range(6):
        gh = torch.nn.functional.linear(h, net.weight_hh_l0.double(), net.bias_hh_l0.double())
        r = torch.sigmoid(gi[:, t, :H] + gh[:, :H])
        z = torch.sigmoid(gi[:, t, H:2 * H] + gh[:, H:2 * H])
        n = torch.tanh(gi[:, t, 2 * H:] + r * gh[:, 2 * H:])
        h = (1 - z) * n + z * h
        for name, v in (("r", r), ("z", z), ("n", n), ("h", h)):
            np.testing.assert_allclose(rec[0][name][0, :, t], v.detach().numpy(), atol=1e-5, rtol=0)


# -- memory horizon ----------------------------------------------------------------------------------

def test_memory_horizon_counts_steps_until_product_below_one_over_e():
    layer = le.LSTM(np.zeros((8, 1)), np.zeros((8, 2)))
    f = np.empty((1, 1, 6, 2))
    f[..., 0] = 0.5  # 0.5 > 1/e, 0.25 < 1/e: 2 steps
    f[..., 1] = 0.999  # never below within 6 steps: counts 6
    assert gates.memory_horizon(layer, {"f": f})[0] == pytest.approx(4.0)
    f[0, 0, 1, 0] = np.nan  # a skipped step carries the state: counts as a gate of 1
    assert gates.memory_horizon(layer, {"f": f})[0] == pytest.approx(4.5)
    rnn = le.RNN(np.zeros((2, 1)), np.zeros((2, 2)))
    assert gates.memory_horizon(rnn, {"h": f}) is None


def _forced_lstm(bias, H=16, I=4, seed=0, recurrent_scale=0.01):
    """An LSTM with random weights and its forget-gate bias forced to `bias`.

    With f ~ 1 the cell state is an integrator: any loop back through h (c -> h -> the gates -> c)
    lifts the gradient above 1, so the "flow ~ 1" checks use weak recurrent weights.
    """
    rng = np.random.default_rng(seed)
    b_ih = _w(rng, 4 * H, scale=0.1)
    b_ih[H:2 * H] = bias
    return le.LSTM(_w(rng, 4 * H, I, scale=0.3), _w(rng, 4 * H, H, scale=recurrent_scale), b_ih, np.zeros(4 * H),
                   dtype=np.float64)


@pytest.mark.parametrize("bias", [10.0, -10.0])
def test_forced_forget_bias_horizon_and_flow(bias):
    T = 40
    model = le.Model([_forced_lstm(bias)])
    x = np.random.default_rng(1).standard_normal((2, T, 4))
    (rep,) = gates.analyse(model, x)
    flow_c = rep.flow["c"][0]
    if bias > 0:
        assert rep.horizon[0] == pytest.approx(T)  # the product of f ~ 0.99995 never falls below 1/e
        assert np.all((flow_c > 0.99) & (flow_c < 1.5))  # the cell state passes the gradient back ~unchanged
    else:
        assert rep.horizon[0] == pytest.approx(1.0)
        assert np.all(flow_c[:, 1] < 1e-3) and np.all(flow_c[:, 5] < 1e-10)
    assert np.all(flow_c[:, 0] == 1)


def test_rnn_gradient_vanishes_where_an_lstm_of_the_same_size_keeps_it():
    T, H, I = 60, 16, 4
    rng = np.random.default_rng(2)
    rnn = le.RNN(_w(rng, H, I, scale=0.3), _w(rng, H, H, scale=0.3), _w(rng, H, scale=0.1), None,
                 dtype=np.float64)
    lstm = _forced_lstm(10.0, H=H, I=I, recurrent_scale=0.3)
    x = rng.standard_normal((1, T, I))
    (r,) = gates.analyse(le.Model([rnn]), x)
    (m,) = gates.analyse(le.Model([lstm]), x)
    assert r.horizon is None and "c" not in r.flow
    assert r.flow["h"][0, 0, T] < 1e-6 < m.flow["c"][0, 0, T]
    assert m.flow["c"][0, 0, T] > 0.9


# -- Jacobians against autograd ----------------------------------------------------------------------

def _torch_state_jacobian(net, x, state0):
    """d s_T / d s_0 by torch.autograd for one batch row; s = (h, c) flattened for LSTM, h otherwise."""
    xt = torch.from_numpy(x).double()

    def final(*s0):
        s = tuple(v[None, None] for v in s0)
        _, sT = net(xt, s if len(s) > 1 else s[0])
        sT = sT if isinstance(sT, tuple) else (sT,)
        return torch.cat([v.reshape(-1) for v in sT])

    jac = torch.autograd.functional.jacobian(final, tuple(torch.from_numpy(v) for v in state0))
    return torch.cat(list(jac), dim=1).numpy()


@pytest.mark.parametrize("kind", ["lstm", "lstm_proj", "gru", "rnn"])
def test_jacobian_products_equal_autograd(kind):
    torch.manual_seed(4)
    I, H, T = 3, 5, 6
    if kind == "lstm":
        net = torch.nn.LSTM(I, H, batch_first=True)
    elif kind == "lstm_proj":
        net = torch.nn.LSTM(I, H, proj_size=2, batch_first=True)
    elif kind == "gru":
        net = torch.nn.GRU(I, H, batch_first=True)
    else:
        net = torch.nn.RNN(I, H, batch_first=True)
    net = net.double()
    model = le.from_torch(net, dtype=np.float64)
    layer = model.layers[0]
    x = np.random.default_rng(5).standard_normal((1, T, I))
    _, trace = gates.run_layer(layer, x, None, layer.zero_state(1, np.float64), True)
    products = dict(gates.jacobian_products(layer, trace))
    for t in (0, 2):  # from the initial state and from a state reached after two steps
        state = [trace.h_prev[0, 0, t]] + ([trace.c_prev[0, 0, t]] if trace.c_prev is not None else [])
        want = _torch_state_jacobian(net, x[:, t:], state)
        np.testing.assert_allclose(products[T - t][0], want, atol=1e-10, rtol=0)


def test_jacobian_of_keras_reset_before_gru_by_finite_differences():
    rng = np.random.default_rng(6)
    H, I, T = 4, 3, 5
    layer = le.GRU(_w(rng, 3 * H, I), _w(rng, 3 * H, H), _w(rng, 3 * H), _w(rng, 3 * H), reset_after=False,
                   recurrent_activation="hard_sigmoid", dtype=np.float64)
    x = rng.standard_normal((1, T, I))
    h0 = rng.standard_normal((1, 1, H)) * 0.5
    _, trace = gates.run_layer(layer, x, None, (h0.copy(),), True)
    J = dict(gates.jacobian_products(layer, trace))[T][0]
    eps = 1e-6
    num = np.empty((H, H))
    for j in range(H):
        hp, hm = h0.copy(), h0.copy()
        hp[0, 0, j] += eps
        hm[0, 0, j] -= eps
        sp, sm = (hp,), (hm,)
        gates.run_layer(layer, x, None, sp, True)
        gates.run_layer(layer, x, None, sm, True)
        num[:, j] = (sp[0] - sm[0])[0, 0] / (2 * eps)
    np.testing.assert_allclose(J, num, atol=1e-7)


def test_plot_writes_an_image(tmp_path):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(0)
    model = le.Model([_forced_lstm(1.0, H=6), le.GRU(_w(rng, 18, 6), _w(rng, 18, 6), dtype=np.float64)])
    reports = gates.analyse(model, np.random.default_rng(0).standard_normal((1, 12, 4)))
    path = tmp_path / "g.png"
    gates.plot(reports, str(path), labels=list("abcdefghijkl"))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
