"""The core engine against real PyTorch modules and against the NumPy reference."""
from __future__ import annotations

import itertools
import zlib

import numpy as np
import pytest

import lstm_engine as le
from reference import run_layer

torch = pytest.importorskip("torch")

CELLS = {
    "lstm": (torch.nn.LSTM, {}),
    "lstm-proj": (torch.nn.LSTM, {"proj_size": 3}),
    "gru": (torch.nn.GRU, {}),
    "rnn-tanh": (torch.nn.RNN, {"nonlinearity": "tanh"}),
    "rnn-relu": (torch.nn.RNN, {"nonlinearity": "relu"}),
}
TOL = {np.float32: 1e-5, np.float64: 1e-10}


def torch_run(module, x, lengths, state):
    """PyTorch's outputs (padded with zeros) and final states for batch-first x."""
    xt = torch.from_numpy(x)
    if lengths is not None:
        xt = torch.nn.utils.rnn.pack_padded_sequence(xt, torch.from_numpy(lengths), batch_first=True,
                                                     enforce_sorted=False)
    with torch.no_grad():
        y, st = module(xt, state)
    if lengths is not None:
        y, _ = torch.nn.utils.rnn.pad_packed_sequence(y, batch_first=True, total_length=x.shape[1])
    st = st if isinstance(st, tuple) else (st,)
    return y.numpy(), [s.numpy() for s in st]


def engine_state_to_torch(state):
    """Concatenate per-layer states on the first axis, as torch's h_n / c_n."""
    return [np.concatenate([entry[k] for entry in state]) for k in range(len(state[0]))]


def torch_state_to_engine(model, tensors):
    """Split torch's (layers*D, B, W) initial state into the engine's per-layer tuples."""
    out, start = [], 0
    for layer in model.recurrent_layers:
        D = layer.num_directions
        out.append(tuple(t[start:start + D] for t in tensors))
        start += D
    return out


@pytest.mark.parametrize("T", [1, 7, 50])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("cell", list(CELLS))
def test_matches_pytorch(cell, num_layers, bidirectional, bias, batch, T, kernel_variant):
    cls, kwargs = CELLS[cell]
    # A fixed seed per case: zlib.crc32 is the same in every process (hash() of a str is not).
    seed = zlib.crc32(repr((cell, num_layers, bidirectional, bias, batch, T)).encode())
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    module = cls(4, 6, num_layers=num_layers, bidirectional=bidirectional, bias=bias, batch_first=True,
                 **kwargs).eval()
    D = 2 if bidirectional else 1
    for dtype, with_lengths, with_state in itertools.product((np.float32, np.float64), (False, True),
                                                             (False, True)):
        m = module.double() if dtype == np.float64 else module.float()
        model = le.from_torch(m, dtype=dtype)
        x = rng.standard_normal((batch, T, 4)).astype(dtype)
        lengths = rng.integers(1, T + 1, size=batch) if with_lengths else None
        tstate = None
        if with_state:
            P = kwargs.get("proj_size") or 6
            tstate = [torch.from_numpy(rng.standard_normal((num_layers * D, batch, P)).astype(dtype))]
            if cls is torch.nn.LSTM:
                tstate.append(torch.from_numpy(rng.standard_normal((num_layers * D, batch, 6)).astype(dtype)))
        y_ref, st_ref = torch_run(m, x, lengths, tuple(tstate) if tstate and len(tstate) == 2
                                  else (tstate[0] if tstate else None))
        init = torch_state_to_engine(model, [t.numpy() for t in tstate]) if tstate else None
        y, state = model.forward(x, lengths=lengths, initial_state=init)
        assert y.dtype == dtype and y.shape == y_ref.shape
        np.testing.assert_allclose(y, y_ref, rtol=0, atol=TOL[dtype])
        for got, want in zip(engine_state_to_torch(state), st_ref):
            np.testing.assert_allclose(got, want, rtol=0, atol=TOL[dtype])


@pytest.mark.parametrize("batch", [32, 37, 133])
@pytest.mark.parametrize("threads", [1, 2])
def test_many_rows_match_pytorch(batch, threads, kernel_variant):
    """From 32 rows an LSTM step computes its input product in the same tiles as the recurrent one (no
    projection ahead): rows not a multiple of the micro-kernel's, over one row chunk (133), both
    directions, packed lengths and a given state, on one and two threads."""
    from lstm_engine import _kernels

    torch.manual_seed(batch)
    rng = np.random.default_rng(batch)
    module = torch.nn.LSTM(24, 40, num_layers=2, bidirectional=True, batch_first=True).eval()
    model = le.from_torch(module)
    model.threads = threads
    x = rng.standard_normal((batch, 9, 24)).astype(np.float32)
    lengths = rng.integers(1, 10, size=batch)
    tstate = tuple(torch.from_numpy(rng.standard_normal((4, batch, 40)).astype(np.float32)) for _ in range(2))
    min_bytes = _kernels.set_parallel_min_bytes(0)  # split this small layer, to test the split
    try:
        for lens in (None, lengths):
            y_ref, st_ref = torch_run(module, x, lens, tstate)
            init = torch_state_to_engine(model, [t.numpy() for t in tstate])
            y, state = model.forward(x, lengths=lens, initial_state=init)
            np.testing.assert_allclose(y, y_ref, rtol=0, atol=TOL[np.float32])
            for got, want in zip(engine_state_to_torch(state), st_ref):
                np.testing.assert_allclose(got, want, rtol=0, atol=TOL[np.float32])
    finally:
        _kernels.set_parallel_min_bytes(min_bytes)


@pytest.mark.parametrize("cls", [torch.nn.LSTM, torch.nn.GRU])
def test_step_order_and_threads_do_not_change_results(cls, kernel_variant):
    """Every other step runs a thread's panels last to first (cpu_steps.c: the previous step's last
    weights are still in L2), and a streaming call turns around from the last call on the same
    weights: an odd number of steps makes each call start the other way. Whatever the order and the
    threads, the same bits, and PyTorch's results."""
    from lstm_engine import _kernels

    torch.manual_seed(3)
    module = cls(16, 72, batch_first=True).eval()  # 5 panels: uneven ranges on 2 threads
    model = le.from_torch(module)
    x = np.random.default_rng(3).standard_normal((1, 7, 16)).astype(np.float32)
    with torch.no_grad():
        y_ref = module(torch.from_numpy(x))[0].numpy()
    min_bytes = _kernels.set_parallel_min_bytes(0)
    try:
        runs = []
        for threads in (1, 2, 1, 2):
            model.threads = threads
            runs.append(model.forward(x)[0])
            session = model.session(batch_size=1)
            runs.append(np.stack([session.step(x[:, t]) for t in range(x.shape[1])], axis=1))
    finally:
        _kernels.set_parallel_min_bytes(min_bytes)
    for got in runs[2::2]:
        np.testing.assert_array_equal(got, runs[0])
    for got in runs[3::2]:
        np.testing.assert_array_equal(got, runs[1])
    for got in runs[:2]:
        np.testing.assert_allclose(got, y_ref, rtol=0, atol=TOL[np.float32])


def test_cells_and_lstm_cell_modules():
    torch.manual_seed(1)
    x = np.random.default_rng(1).standard_normal((3, 1, 5)).astype(np.float32)
    for cls in (torch.nn.LSTMCell, torch.nn.GRUCell, torch.nn.RNNCell):
        cell = cls(5, 7)
        with torch.no_grad():
            out = cell(torch.from_numpy(x[:, 0]))
        h = out[0] if isinstance(out, tuple) else out
        y, _ = le.from_torch(cell).forward(x)
        np.testing.assert_allclose(y[:, 0], h.numpy(), atol=1e-5)


def test_state_dict_of_numpy_arrays_and_relu_argument():
    torch.manual_seed(2)
    rnn = torch.nn.RNN(3, 4, num_layers=2, nonlinearity="relu", batch_first=True)
    sd = {k: v.numpy() for k, v in rnn.state_dict().items()}
    x = np.random.default_rng(2).standard_normal((2, 5, 3)).astype(np.float32)
    y_ref, _ = torch_run(rnn, x, None, None)
    y, _ = le.from_torch(sd, nonlinearity="relu").forward(x)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    y_tanh, _ = le.from_torch(sd, nonlinearity="tanh").forward(x)
    assert np.abs(y_tanh - y_ref).max() > 1e-3  # the argument matters: state_dicts do not record it
    with pytest.raises(ValueError, match="nonlinearity='tanh' or nonlinearity='relu'"):
        le.from_torch(sd)  # so it is required, not assumed


def test_long_sequence_float32_tracks_float64():
    torch.manual_seed(3)
    lstm = torch.nn.LSTM(8, 16, batch_first=True)
    model = le.from_torch(lstm, dtype=(np.float32, np.float64))
    x = np.random.default_rng(3).standard_normal((1, 5000, 8))
    y64, s64 = model.forward(x)
    y32, s32 = model.forward(x.astype(np.float32))
    assert np.abs(y32 - y64).max() <= 1e-4
    assert np.abs(s32[0][1] - s64[0][1]).max() <= 1e-4


# -- the kernels against the NumPy reference, including the Keras-only options -------------

def random_layer(cls, rng, I=5, H=6, D=1, proj=0, dtype=np.float64, **options):
    G = cls.num_gates
    P = proj or H
    w = dict(weight_ih=rng.standard_normal((D, G * H, I)) * 0.5,
             weight_hh=rng.standard_normal((D, G * H, P)) * 0.5,
             bias_ih=rng.standard_normal((D, G * H)) * 0.5,
             bias_hh=rng.standard_normal((D, G * H)) * 0.5)
    if proj:
        w["weight_hr"] = rng.standard_normal((D, P, H)) * 0.5
    return cls(**w, dtype=dtype, **options)


KERNEL_CASES = [
    (le.LSTM, {}),
    (le.LSTM, {"proj": 3}),
    (le.LSTM, {"activation": "relu", "recurrent_activation": "hard_sigmoid"}),
    (le.LSTM, {"activation": "softsign", "recurrent_activation": "hard_sigmoid_v2"}),
    (le.GRU, {}),
    (le.GRU, {"reset_after": False}),
    (le.GRU, {"reset_after": False, "activation": "elu", "recurrent_activation": "hard_sigmoid"}),
    (le.RNN, {"nonlinearity": "softplus"}),
    (le.RNN, {"nonlinearity": "linear"}),
]


@pytest.mark.parametrize("zero_masked", [True, False])
@pytest.mark.parametrize("D,go_backwards", [(1, False), (1, True), (2, False)])
@pytest.mark.parametrize("cls,options", KERNEL_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernel_matches_reference(cls, options, D, go_backwards, zero_masked, dtype, kernel_variant):
    rng = np.random.default_rng(len(options) * 7 + D)
    options = dict(options)
    proj = options.pop("proj", 0)
    layer = random_layer(cls, rng, D=D, proj=proj, dtype=dtype, go_backwards=go_backwards, **options)
    B, T = 4, 9
    x = rng.standard_normal((B, T, 5)).astype(dtype) * 0.3
    mask = rng.random((B, T)) > 0.3  # arbitrary, not only prefixes: Keras masks can have holes
    state = tuple(rng.standard_normal(s[:1] + (B,) + s[1:]).astype(dtype) for s in layer.state_shapes)
    y_ref, st_ref = run_layer(layer, x, mask, state, zero_masked)
    st = tuple(s.copy() for s in state)
    y = layer.run(x, st, mask.astype(np.uint8), zero_masked)
    tol = 1e-5 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(y, y_ref, rtol=tol, atol=tol)
    for got, want in zip(st, st_ref):
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", sorted(le.activations.CODES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_kernel_activation(name, dtype):
    # An RNN with identity input weights and no recurrence computes act(x) elementwise.
    x = np.linspace(-30, 30, 601, dtype=dtype).reshape(1, 601, 1)
    layer = le.RNN(np.eye(1), np.zeros((1, 1)), nonlinearity=name, dtype=dtype)
    y, _ = le.Model([layer]).forward(x)
    want = le.activations.apply(name, x.astype(np.float64))
    tol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, want, rtol=tol, atol=tol)


def test_saturated_gates_are_exact():
    rng = np.random.default_rng(4)
    layer = random_layer(le.LSTM, rng, dtype=np.float32)
    x = np.full((2, 3, 5), 1e4, np.float32)
    x[1] = -1e4
    y, (state,) = le.Model([layer]).forward(x)
    # Every gate saturates to exactly 0 or 1 (g to -1 or 1), so c counts whole units and h = o * tanh(c):
    # the kernel's fast sigmoid/tanh must hit those values exactly, as the float64 reference does.
    h, c = state
    np.testing.assert_array_equal(c, np.round(c))
    assert np.abs(c).max() >= 2  # the cells really added up over the steps
    y_ref, (h_ref, c_ref) = run_layer(layer, x)
    np.testing.assert_array_equal(c.reshape(c_ref.shape), c_ref)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-7)


def test_nan_propagates_like_pytorch():
    torch.manual_seed(5)
    lstm = torch.nn.LSTM(3, 4, batch_first=True)
    x = np.zeros((2, 4, 3), np.float32)
    x[0, 1, 0] = np.nan
    y_ref, _ = torch_run(lstm, x, None, None)
    y, _ = le.from_torch(lstm).forward(x)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(y_ref))
    np.testing.assert_allclose(y[1], y_ref[1], atol=1e-5)


# -- input checks ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    torch.manual_seed(6)
    return le.from_torch(torch.nn.LSTM(3, 4, num_layers=2, batch_first=True))


def test_wrong_dtype_is_a_type_error(model):
    with pytest.raises(TypeError, match="float64.*cast=True"):
        model.forward(np.zeros((1, 2, 3)))
    with pytest.raises(TypeError):
        model.forward(np.zeros((1, 2, 3), np.int32))
    y, _ = model.forward(np.zeros((1, 2, 3)), cast=True)
    assert y.dtype == np.float32


@pytest.mark.parametrize("shape", [(2, 3), (1, 2, 4), (1, 2, 3, 1), (1, 0, 3)])
def test_wrong_shape_names_the_expected_one(model, shape):
    with pytest.raises(ValueError, match=r"x: expected"):
        model.forward(np.zeros(shape, np.float32))


@pytest.mark.parametrize("lengths,error,match", [
    ([0, 2], ValueError, r"1\.\.3"),
    ([4, 2], ValueError, r"1\.\.3"),
    ([-1, 2], ValueError, r"1\.\.3"),
    ([1, 2, 3], ValueError, r"shape \(2,\)"),
    ([1.0, 2.0], TypeError, "integers"),
])
def test_bad_lengths(model, lengths, error, match):
    with pytest.raises(error, match=match):
        model.forward(np.zeros((2, 3, 3), np.float32), lengths=np.array(lengths))


def test_bad_initial_state(model):
    x = np.zeros((2, 3, 3), np.float32)
    good = [(np.zeros((1, 2, 4), np.float32),) * 2] * 2
    model.forward(x, initial_state=good)
    with pytest.raises(ValueError, match="2 entries"):
        model.forward(x, initial_state=good[:1])
    with pytest.raises(ValueError, match=r"\(1, 2, 4\)"):
        model.forward(x, initial_state=[(np.zeros((1, 3, 4), np.float32),) * 2] * 2)
    with pytest.raises(TypeError, match="dtype"):
        model.forward(x, initial_state=[(np.zeros((1, 2, 4)),) * 2] * 2)
    with pytest.raises(ValueError, match=r"\(h, c\)"):
        model.forward(x, initial_state=[(np.zeros((1, 2, 4), np.float32),)] * 2)


def test_initial_state_is_not_modified(model):
    x = np.ones((2, 3, 3), np.float32)
    init = [(np.ones((1, 2, 4), np.float32), np.ones((1, 2, 4), np.float32)) for _ in range(2)]
    model.forward(x, initial_state=init)
    assert all((a == 1).all() for entry in init for a in entry)


def test_non_contiguous_read_only_and_byteswapped_inputs(model):
    rng = np.random.default_rng(7)
    base = rng.standard_normal((3, 8, 6)).astype(np.float32)
    x = base[:, ::2, ::2]
    want, _ = model.forward(np.ascontiguousarray(x))
    ro = np.ascontiguousarray(x)
    ro.setflags(write=False)
    for variant in (x, ro, np.ascontiguousarray(x).astype(">f4"), np.asfortranarray(x)):
        got, _ = model.forward(variant)
        np.testing.assert_array_equal(got, want)


def test_zero_batch(model):
    y, state = model.forward(np.zeros((0, 3, 3), np.float32))
    assert y.shape == (0, 3, 4) and state[0][0].shape == (1, 0, 4)


def test_layer_weight_checks():
    rng = np.random.default_rng(8)
    with pytest.raises(ValueError, match="4\\*hidden_size"):
        le.LSTM(rng.standard_normal((10, 3)), rng.standard_normal((10, 2)))
    with pytest.raises(ValueError, match="weight_hh"):
        le.LSTM(rng.standard_normal((8, 3)), rng.standard_normal((8, 3)))
    with pytest.raises(ValueError, match="bias_ih"):
        le.GRU(rng.standard_normal((6, 3)), rng.standard_normal((6, 2)), bias_ih=np.zeros(5))
    with pytest.raises(TypeError, match="real-valued"):
        le.RNN(np.array([["a"]]), np.zeros((1, 1)))
    with pytest.raises(TypeError, match="float32 or float64"):
        le.RNN(np.zeros((2, 3)), np.zeros((2, 2)), dtype=np.float16)
    with pytest.raises(ValueError, match="bidirectional"):
        le.RNN(np.zeros((2, 3)), np.zeros((2, 2)), bidirectional=True)
    with pytest.raises(ValueError, match="nonlinearity|activation"):
        le.RNN(np.zeros((2, 3)), np.zeros((2, 2)), nonlinearity="swishy")


def test_model_checks_layer_sizes():
    rng = np.random.default_rng(9)
    a = random_layer(le.LSTM, rng, I=5, H=6)
    b = random_layer(le.GRU, rng, I=7, H=6)
    with pytest.raises(ValueError, match="expects 7 features"):
        le.Model([a, b])
    with pytest.raises(TypeError, match="not an lstm_engine layer"):
        le.Model([a, "dense"])
    with pytest.raises(ValueError, match="no common dtype"):
        le.Model([random_layer(le.LSTM, rng, dtype=np.float32), random_layer(le.LSTM, rng, I=6, dtype=np.float64)])


def test_from_torch_rejects_other_objects():
    with pytest.raises(TypeError, match="nn.Module or a state_dict"):
        le.from_torch("lstm.pt")
    with pytest.raises(ValueError, match="Conv1d is not a bare nn.LSTM/GRU/RNN.*pass an example input"):
        le.from_torch(torch.nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="no recurrent weights"):
        le.from_torch({"foo": np.zeros(3)})
