"""Fuzzing Model.forward: every input layout gives PyTorch's answer, every bad input a clear TypeError/ValueError.

Valid inputs come in every layout NumPy can make — strides, negative strides, Fortran order, zero strides,
big-endian, read-only, zero-size batches, lists, castable dtypes — with or without packed lengths and initial
states, on both the vectorised and the portable float32 kernels; the answer is PyTorch's (run in float64),
NaN and Inf included. Invalid ones must raise TypeError or ValueError saying what was expected; hypothesis also
throws arbitrary arrays and objects at every argument, and nothing else may come out.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import lstm_engine as le
from lstm_engine import _kernels

torch = pytest.importorskip("torch")

TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-10}
BOTH = (np.float32, np.float64)


def _seeded(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand(p.shape, generator=gen) * 1.2 - 0.6)
    return module.eval()


def _engine(module, dtype):
    """The engine's model of a bare RNN, or of the Embedding -> RNN -> Linear stack the ids case holds (which
    torch runs child by child in run_torch: an nn.Sequential would pass the RNN's tuple on)."""
    if not isinstance(module, torch.nn.Sequential):
        return le.from_torch(module, dtype=dtype)
    emb, rnn, head = module
    return le.Model([le.Embedding(emb.weight, dtype=dtype), *le.from_torch(rnn, dtype=dtype).layers,
                     le.Dense(head.weight, head.bias, dtype=dtype)])


class Case:
    """A torch module, the engine's model of it, and how to run torch as the reference."""

    def __init__(self, name, module, ids=None):
        self.name = name
        self.module = module
        self.ids = ids  # vocabulary size when the model takes token ids
        self.model = _engine(module, BOTH)
        self.reference = copy.deepcopy(module).double()
        self.rnn = next(m for m in self.reference.modules() if isinstance(m, torch.nn.RNNBase))

    def __repr__(self):
        return self.name

    def run_torch(self, x, lengths=None, state=None):
        """(y, [per-layer state tuples]) from PyTorch in float64; x (B, T, F) floats or (B, T) ids."""
        rnn = self.rnn
        layers, D = rnn.num_layers, 2 if rnn.bidirectional else 1
        hx = None
        if state is not None:
            hx = []
            for k in range(2 if isinstance(rnn, torch.nn.LSTM) else 1):
                hx.append(torch.from_numpy(np.concatenate(
                    [np.asarray(s[k], np.float64) if s is not None else np.zeros(self._shape(i, k, x.shape[0]))
                     for i, s in enumerate(state)])))
            hx = tuple(hx) if isinstance(rnn, torch.nn.LSTM) else hx[0]
        with torch.no_grad():
            h = torch.from_numpy(np.asarray(x, np.int64 if self.ids else np.float64))
            for child in (self.reference if isinstance(self.reference, torch.nn.Sequential) else [self.reference]):
                if child is rnn:
                    if lengths is not None:
                        h = torch.nn.utils.rnn.pack_padded_sequence(
                            h, torch.as_tensor(np.asarray(lengths, np.int64)), batch_first=True, enforce_sorted=False)
                    h, hn = rnn(h, hx)
                    if lengths is not None:
                        h, _ = torch.nn.utils.rnn.pad_packed_sequence(h, batch_first=True, total_length=x.shape[1])
                else:
                    h = child(h if child.__class__.__name__ == "Embedding" else h.double())
            y = h.numpy()
        hn = hn if isinstance(hn, tuple) else (hn,)
        states = [tuple(t[i * D:(i + 1) * D].numpy() for t in hn) for i in range(layers)]
        return y, states

    def _shape(self, layer, k, batch):
        rnn = self.rnn
        D = 2 if rnn.bidirectional else 1
        width = rnn.proj_size if (k == 0 and getattr(rnn, "proj_size", 0)) else rnn.hidden_size
        return (D, batch, width)

    def state_shapes(self, batch):
        return [[self._shape(i, k, batch) for k in range(2 if isinstance(self.rnn, torch.nn.LSTM) else 1)]
                for i in range(self.rnn.num_layers)]


def _cases():
    torch.manual_seed(0)
    return [
        Case("lstm-2layers", _seeded(torch.nn.LSTM(3, 4, num_layers=2, batch_first=True), 1)),
        Case("lstm-proj-bi", _seeded(torch.nn.LSTM(3, 5, proj_size=2, bidirectional=True, batch_first=True), 2)),
        Case("gru-bi", _seeded(torch.nn.GRU(3, 4, bidirectional=True, batch_first=True), 3)),
        Case("rnn-relu", _seeded(torch.nn.RNN(3, 4, nonlinearity="relu", batch_first=True), 4)),
        Case("rnn-tanh-nobias", _seeded(torch.nn.RNN(3, 4, bias=False, batch_first=True), 5)),
        Case("gru", _seeded(torch.nn.GRU(3, 4, num_layers=2, batch_first=True), 7)),
        Case("ids-lstm-linear", _seeded(torch.nn.Sequential(torch.nn.Embedding(7, 3), torch.nn.LSTM(
            3, 4, batch_first=True), torch.nn.Linear(4, 7)), 6), ids=7),
    ]


CASES = _cases()


@pytest.fixture
def simd(kernel_variant):
    """Every float32 kernel variant this CPU runs, forced in turn (conftest)."""
    return kernel_variant


def assert_close(got, want, dtype, what):
    """Equal NaN and ±Inf positions, finite values within the dtype's tolerance."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{what}: NaN positions")
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want), err_msg=f"{what}: +Inf positions")
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg=f"{what}: -Inf positions")
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=0, atol=TOL[np.dtype(dtype)], err_msg=what)


def check_against_torch(case, x, y, state, lengths=None, initial=None, dtype=np.float32):
    want_y, want_state = case.run_torch(x, lengths, initial)
    assert y.dtype == np.dtype(dtype)
    assert_close(y, want_y, dtype, "y")
    assert len(state) == len(want_state)
    for k, (got, want) in enumerate(zip(state, want_state)):
        assert len(got) == len(want)
        for name, g, w in zip("hc", got, want):
            assert g.dtype == np.dtype(dtype)
            assert_close(g, w, dtype, f"state[{k}] {name}")


# ----------------------------------------------------------------------------------------------------------
# Valid inputs in every layout


def relayout(rng, a, how):
    """The same values as ``a`` in another memory layout (or container)."""
    if how == "c":
        return a
    if how == "fortran":
        return np.asfortranarray(a)
    if how == "strided":
        big = np.zeros(tuple(2 * n + 1 for n in a.shape), a.dtype)
        view = big[tuple(slice(1, None, 2) for _ in a.shape)]
        view[...] = a
        return view
    if how == "reversed":
        every_axis = (slice(None, None, -1),) * a.ndim
        return np.ascontiguousarray(a[every_axis])[every_axis]  # negative strides on every axis
    if how == "big-endian":
        return a.astype(a.dtype.newbyteorder(">"))
    if how == "read-only":
        a = a.copy()
        a.flags.writeable = False
        return a
    if how == "broadcast" and a.shape[0]:
        # A zero stride on the batch axis: every row is row 0.
        return np.broadcast_to(a[:1], a.shape)
    if how == "list":
        return a.tolist()
    return a


LAYOUTS = ["c", "fortran", "strided", "reversed", "big-endian", "read-only", "broadcast", "list"]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_valid_inputs_match_torch(data, simd):
    case = data.draw(st.sampled_from(CASES))
    dtype = data.draw(st.sampled_from(BOTH))
    B = data.draw(st.integers(0, 4))
    T = data.draw(st.integers(1, 6))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    layout = data.draw(st.sampled_from(LAYOUTS if B else LAYOUTS[:-1]))  # [] has no shape to check
    if case.ids or layout == "list":
        dtype = case.model.dtype  # what the embedding gives the recurrent layers; what a list is read as
    if case.ids:
        x = rng.integers(0, case.ids, (B, T)).astype(data.draw(st.sampled_from([np.int64, np.int32, np.uint8])))
    else:
        x = rng.standard_normal((B, T, 3)).astype(dtype)
    if layout == "broadcast" and B:
        x = np.broadcast_to(x[:1], x.shape).copy()
    lengths = None
    if B and data.draw(st.booleans()):
        lengths = rng.integers(1, T + 1, B).astype(data.draw(st.sampled_from([np.int64, np.int8, np.uint16])))
        if data.draw(st.booleans()):
            lengths = lengths.tolist()
    initial = None
    if data.draw(st.booleans()):
        initial = [[rng.standard_normal(shape).astype(dtype) for shape in layer]
                   for layer in case.state_shapes(B)]
        # Broadcasting would change a state's values; lists would not give the dtype.
        state_layout = layout if layout not in ("broadcast", "list") else "c"
        initial = [None if data.draw(st.booleans()) else tuple(relayout(rng, s, state_layout) for s in layer)
                   for layer in initial]
    given_x = relayout(rng, x, layout)
    before = copy.deepcopy(given_x)
    y, state = case.model.forward(given_x, lengths, initial)
    # Inputs are never written to.
    np.testing.assert_array_equal(np.asarray(given_x), np.asarray(before))
    if B == 0:
        assert y.shape[:2] == (0, T)
        return
    check_against_torch(case, x, y, state, lengths, initial, dtype)


@pytest.mark.parametrize("given_dtype", [np.float16, np.int32, np.int64, np.uint8, ">f8"])
def test_cast_converts_like_numpy(given_dtype):
    case = CASES[0]
    model = _engine(case.module, np.float32)  # float32 only
    x = (np.random.default_rng(0).standard_normal((2, 4, 3)) * 3).astype(given_dtype)
    with pytest.raises(TypeError, match="cast=True"):
        model.forward(x)
    y, state = model.forward(x, cast=True)
    check_against_torch(case, x.astype(np.float32), y, state)


def test_zero_size_batch_gives_empty_outputs_and_states():
    for case in CASES:
        x = np.zeros((0, 3), np.int64) if case.ids else np.zeros((0, 3, 3), np.float32)
        y, state = case.model.forward(x)
        assert y.shape[0] == 0 and y.shape[1] == 3
        assert [[s.shape for s in layer] for layer in state] == [[tuple(shape) for shape in layer]
                                                                 for layer in case.state_shapes(0)]


# ----------------------------------------------------------------------------------------------------------
# NaN and Inf propagate as in PyTorch


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", BOTH)
@pytest.mark.parametrize("case, where", [(case, where) for case in CASES if not case.ids for where in ("x", "h0", "c0")
                                         if where != "c0" or isinstance(case.rnn, torch.nn.LSTM)],
                         ids=lambda v: repr(v) if isinstance(v, Case) else v)
def test_nan_and_inf_propagate_as_in_torch(case, where, dtype, batch, value, simd):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((batch, 5, 3)).astype(dtype)
    initial = [tuple(rng.standard_normal(shape).astype(dtype) for shape in layer) for layer in case.state_shapes(batch)]
    if where == "x":
        x[0, 2, 1] = value
    else:
        initial[0]["hc".index(where[0])][0, 0, 1] = value
    y, state = case.model.forward(x, initial_state=initial)
    check_against_torch(case, x, y, state, initial=initial, dtype=dtype)
    if np.isnan(value):
        assert np.isnan(y).any()  # it reached the output (an Inf may saturate into finite values, as in torch)


@pytest.mark.parametrize("dtype", BOTH)
def test_nan_in_packed_padding_is_ignored(dtype):
    """Steps past a row's length are not read: NaN there changes nothing, as in PyTorch."""
    case = CASES[2]
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 6, 3)).astype(dtype)
    lengths = np.array([6, 2, 4])
    clean, clean_state = case.model.forward(x, lengths)
    x[1, 2:] = np.nan
    x[2, 4:] = np.inf
    y, state = case.model.forward(x, lengths)
    np.testing.assert_array_equal(y, clean)
    for got, want in zip(state, clean_state):
        np.testing.assert_array_equal(got[0], want[0])
    check_against_torch(case, x, y, state, lengths, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------
# Invalid inputs: TypeError or ValueError saying what was expected


def _x(shape=(2, 4, 3), dtype=np.float32):
    return np.zeros(shape, dtype)


def _state(case, batch=2, dtype=np.float32):
    return [tuple(np.zeros(shape, dtype) for shape in layer) for layer in case.state_shapes(batch)]


LSTM2 = CASES[0]
IDS = next(case for case in CASES if case.ids)
INVALID = {
    # x
    "x int": (LSTM2, dict(x=_x(dtype=np.int64)), TypeError, "dtype int64.*float32.*cast=True"),
    "x bool cast": (LSTM2, dict(x=_x(dtype=bool), cast=True), TypeError, "dtype bool"),
    "x float16": (LSTM2, dict(x=_x(dtype=np.float16)), TypeError, "dtype float16"),
    "x complex": (LSTM2, dict(x=_x(dtype=np.complex64), cast=True), TypeError, "dtype complex64"),
    "x object": (LSTM2, dict(x=_x().astype(object), cast=True), TypeError, "dtype object"),
    "x strings": (LSTM2, dict(x=_x().astype(str), cast=True), TypeError, "dtype <U"),
    "x bytes": (LSTM2, dict(x=_x().astype("S2")), TypeError, "dtype \\|S2"),
    "x datetime": (LSTM2, dict(x=_x().astype("datetime64[s]"), cast=True), TypeError, "datetime64"),
    "x structured": (LSTM2, dict(x=np.zeros((2, 4, 3), [("a", "f4")]), cast=True), TypeError, "dtype"),
    "x list of str": (LSTM2, dict(x=[[["a", "b", "c"]]]), TypeError, "expected an array of floats"),
    "x ragged": (LSTM2, dict(x=[[[1.0, 2.0, 3.0]], [[1.0]]]), TypeError, "expected an array of floats"),
    "x list of numeric str": (LSTM2, dict(x=[[["1", "2", "3"]]]), TypeError, "expected an array of floats"),
    "x list of complex": (LSTM2, dict(x=[[[1j, 2.0, 3.0]]]), TypeError, "expected an array of floats"),
    "x list of bool": (LSTM2, dict(x=[[[True, False, True]]]), TypeError, "expected an array of floats"),
    "x list with None": (LSTM2, dict(x=[[[None, 1.0, 2.0]]]), TypeError, "expected an array of floats"),
    "x 2-D": (LSTM2, dict(x=_x((4, 3))), ValueError, r"expected shape \(batch, steps, 3\), got \(4, 3\)"),
    "x 4-D": (LSTM2, dict(x=_x((1, 2, 4, 3))), ValueError, r"expected shape \(batch, steps, 3\)"),
    "x features": (LSTM2, dict(x=_x((2, 4, 5))), ValueError, r"expected shape \(batch, steps, 3\), got \(2, 4, 5\)"),
    "x no features": (LSTM2, dict(x=_x((2, 4, 0))), ValueError, r"expected shape \(batch, steps, 3\)"),
    "x no steps": (LSTM2, dict(x=_x((2, 0, 3))), ValueError, "at least one step"),
    "x scalar": (LSTM2, dict(x=1.0), ValueError, r"expected shape \(batch, steps, 3\), got \(\)"),
    "x None": (LSTM2, dict(x=None), TypeError, "expected an array of floats, got NoneType"),
    # token ids
    "ids float": (IDS, dict(x=np.zeros((2, 4))), TypeError, "token ids must be integers, got dtype float64"),
    "ids bool": (IDS, dict(x=np.zeros((2, 4), bool)), TypeError, "token ids must be integers, got dtype bool"),
    "ids object": (IDS, dict(x=np.zeros((2, 4), object)), TypeError, "token ids must be integers"),
    "ids strings": (IDS, dict(x=np.zeros((2, 4), "U3")), TypeError, "token ids must be integers"),
    "ids too large": (IDS, dict(x=np.full((2, 4), 7)), ValueError, r"token id 7 is out of range \[0, 7\)"),
    "ids negative": (IDS, dict(x=np.full((2, 4), -1)), ValueError, r"token id -1 is out of range \[0, 7\)"),
    "ids uint64 max": (IDS, dict(x=np.full((2, 4), 2**64 - 1, np.uint64)), ValueError, "out of range"),
    "ids 3-D": (IDS, dict(x=np.zeros((2, 4, 1), np.int64)), ValueError, r"shape \(batch, steps\)"),
    "ids 1-D": (IDS, dict(x=np.zeros(4, np.int64)), ValueError, r"shape \(batch, steps\)"),
    "ids no steps": (IDS, dict(x=np.zeros((2, 0), np.int64)), ValueError, "at least one step"),
    # lengths
    "lengths 0": (LSTM2, dict(x=_x(), lengths=[0, 4]), ValueError, r"in 1\.\.4.*has 0"),
    "lengths > T": (LSTM2, dict(x=_x(), lengths=[5, 4]), ValueError, r"in 1\.\.4.*has 5"),
    "lengths negative": (LSTM2, dict(x=_x(), lengths=[4, -3]), ValueError, r"in 1\.\.4.*row 1 has -3"),
    "lengths huge": (LSTM2, dict(x=_x(), lengths=np.array([2**64 - 1, 1], np.uint64)), ValueError, r"1\.\.4"),
    "lengths float": (LSTM2, dict(x=_x(), lengths=[2.0, 3.0]), TypeError, "expected integers, got dtype float64"),
    "lengths bool": (LSTM2, dict(x=_x(), lengths=[True, True]), TypeError, "expected integers, got dtype bool"),
    "lengths str": (LSTM2, dict(x=_x(), lengths=["2", "3"]), TypeError, "expected integers"),
    "lengths object": (LSTM2, dict(x=_x(), lengths=[2, None]), TypeError, "expected integers"),
    "lengths complex": (LSTM2, dict(x=_x(), lengths=np.array([1, 2], complex)), TypeError, "expected integers"),
    "lengths too many": (LSTM2, dict(x=_x(), lengths=[1, 2, 3]), ValueError, r"expected shape \(2,\)"),
    "lengths scalar": (LSTM2, dict(x=_x(), lengths=3), ValueError, r"expected shape \(2,\)"),
    "lengths 2-D": (LSTM2, dict(x=_x(), lengths=[[1], [2]]), ValueError, r"expected shape \(2,\)"),
    # initial_state
    "state not a list": (LSTM2, dict(x=_x(), initial_state={}), ValueError, "expected a list of 2 entries"),
    "state too short": (LSTM2, dict(x=_x(), initial_state=[None]), ValueError, "expected a list of 2 entries"),
    "state too long": (LSTM2, dict(x=_x(), initial_state=[None] * 3), ValueError, "list of 2 entries"),
    "state h only": (LSTM2, dict(x=_x(), initial_state=[np.zeros((1, 2, 4), np.float32), None]), ValueError,
                     r"expected a tuple \(h, c\)"),
    "state batch": (LSTM2, dict(x=_x(), initial_state=_state(LSTM2, batch=3)), ValueError,
                    r"expected shape \(1, 2, 4\) \(directions, batch, width\), got \(1, 3, 4\)"),
    "state dtype": (LSTM2, dict(x=_x(), initial_state=_state(LSTM2, dtype=np.float64)), TypeError,
                    "dtype float64, expected float32 like x"),
    "state int": (LSTM2, dict(x=_x(), initial_state=_state(LSTM2, dtype=np.int32)), TypeError, "dtype int32"),
    "state complex cast": (LSTM2, dict(x=_x(), initial_state=_state(LSTM2, dtype=np.complex64), cast=True),
                           TypeError, "dtype complex64"),
    "state object": (LSTM2, dict(x=_x(), initial_state=[(None, None), None]), TypeError, "dtype object"),
    "state strings": (LSTM2, dict(x=_x(), initial_state=_state(LSTM2, dtype="U2")), TypeError, "dtype <U2"),
    "state bidirectional": (CASES[2], dict(x=_x(), initial_state=[(np.zeros((1, 2, 4), np.float32),)]),
                            ValueError, r"expected shape \(2, 2, 4\)"),
    "state projection": (CASES[1], dict(x=_x(), initial_state=[(np.zeros((2, 2, 5), np.float32),
                                                               np.zeros((2, 2, 5), np.float32))]),
                         ValueError, r"h: expected shape \(2, 2, 2\)"),
}


@pytest.mark.parametrize("name", list(INVALID))
def test_invalid_inputs_raise_what_was_expected(name):
    case, kwargs, error, message = INVALID[name]
    with pytest.raises(error, match=message):
        case.model.forward(**kwargs)


def test_float64_input_on_float32_model_says_how_to_convert():
    model = le.from_torch(torch.nn.LSTM(3, 4))
    with pytest.raises(TypeError, match="dtype float64, but this model runs float32; pass cast=True"):
        model.forward(np.zeros((1, 2, 3)))
    with pytest.raises(TypeError, match="dtype complex128 cannot be cast"):
        model.forward(np.zeros((1, 2, 3), complex), cast=True)


# ----------------------------------------------------------------------------------------------------------
# Anything at all: a result or TypeError/ValueError, nothing else


def _any_array():
    return hnp.arrays(
        dtype=st.one_of(hnp.scalar_dtypes(), hnp.byte_string_dtypes(), hnp.unicode_string_dtypes(),
                        st.just(np.dtype(object)), st.just(np.dtype(">f4")), st.just(np.dtype(">i8"))),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4))


def _anything():
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=3),
                        st.complex_numbers())
    return st.one_of(scalars, _any_array(), st.lists(scalars, max_size=4),
                     st.lists(st.lists(st.floats(), max_size=3), max_size=3),
                     st.tuples(_any_array(), _any_array()), st.lists(st.one_of(st.none(), _any_array()), max_size=3))


def _anything_to_forward(case, x, lengths, initial, cast):
    try:
        with np.errstate(all="ignore"):
            y, state = case.model.forward(x, lengths, initial, cast=cast)
    except (TypeError, ValueError) as exc:
        assert str(exc)
        return
    assert isinstance(y, np.ndarray) and y.dtype in case.model.dtypes
    assert len(state) == len(case.model.recurrent_layers)


def _any_array_of_a_valid_shape(case, x, cast):
    """Arrays of any dtype reshaped to a valid shape: a float answer or a dtype error, never garbage."""
    assume(x.size)
    shape = (1, x.size) if case.ids else (1, x.size, 1)
    if not case.ids:
        x = np.repeat(x.reshape(shape), 3, axis=2)
    else:
        x = x.reshape(shape)
    try:
        with np.errstate(all="ignore"):
            y, _ = case.model.forward(x, cast=cast)
    except (TypeError, ValueError) as exc:
        assert "dtype" in str(exc) or "out of range" in str(exc)
        return
    assert x.dtype.kind in ("iu" if case.ids else "fiu")
    assert y.shape[:2] == shape[:2]


ANYTHING = dict(case=st.sampled_from(CASES), x=st.one_of(_any_array(), _anything()),
                lengths=st.one_of(st.none(), _anything()), initial=st.one_of(st.none(), _anything()),
                cast=st.booleans())
ANY_ARRAY = dict(case=st.sampled_from(CASES), x=_any_array(), cast=st.booleans())
# The default run, and ~30x more examples under -m slow.
test_anything_gives_a_result_or_a_clear_error = settings(max_examples=150, deadline=None)(
    given(**ANYTHING)(_anything_to_forward))
test_any_array_of_the_right_shape = settings(max_examples=60, deadline=None)(given(**ANY_ARRAY)(
    _any_array_of_a_valid_shape))
test_anything_long = pytest.mark.slow(settings(max_examples=5000, deadline=None)(
    given(**ANYTHING)(_anything_to_forward)))
test_any_array_long = pytest.mark.slow(settings(max_examples=2000, deadline=None)(
    given(**ANY_ARRAY)(_any_array_of_a_valid_shape)))


# ----------------------------------------------------------------------------------------------------------
# Sessions, streams and generate: the same inputs, one step or chunk at a time

STREAMING = [case for case in CASES if not case.rnn.bidirectional]


def _split(draw, T):
    """Chunk lengths summing to T; 1 is run with step(), longer ones with feed()."""
    sizes = []
    while sum(sizes) < T:
        sizes.append(draw(st.integers(1, T - sum(sizes))))
    return sizes


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_session_chunks_in_any_layout_match_torch(data, simd):
    case = data.draw(st.sampled_from(STREAMING))
    dtype = case.model.dtype if case.ids else data.draw(st.sampled_from(BOTH))
    B = data.draw(st.integers(1, 3))
    T = data.draw(st.integers(1, 8))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    if case.ids:
        x = rng.integers(0, case.ids, (B, T))
    else:
        x = rng.standard_normal((B, T, 3)).astype(dtype)
        if data.draw(st.booleans()):
            x[rng.integers(B), rng.integers(T), rng.integers(3)] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    session = case.model.session(B, dtype=dtype)
    outputs, t = [], 0
    for size in _split(data.draw, T):
        layout = data.draw(st.sampled_from(["c", "fortran", "strided", "reversed", "big-endian", "read-only", "list"]))
        chunk = x[:, t:t + size]
        if size == 1 and data.draw(st.booleans()):
            outputs.append(session.step(relayout(rng, np.ascontiguousarray(chunk[:, 0]), layout))[:, None])
        else:
            outputs.append(session.feed(relayout(rng, np.ascontiguousarray(chunk), layout)))
        t += size
    y = np.concatenate(outputs, axis=1)
    check_against_torch(case, x, y, session.state, dtype=dtype)


@pytest.mark.timeout(120)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_pool_streams_in_any_layout_match_torch(data):
    case = data.draw(st.sampled_from(STREAMING))
    n = data.draw(st.integers(1, 4))
    T = data.draw(st.integers(1, 6))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x = rng.integers(0, case.ids, (n, T)) if case.ids else rng.standard_normal((n, T, 3)).astype(np.float32)
    with case.model.pool(max_batch=data.draw(st.integers(1, 4))) as pool:
        streams = [pool.open() for _ in range(n)]
        ys = [[] for _ in range(n)]
        for t in range(T):
            for i in data.draw(st.permutations(range(n))):
                value = x[i, t]
                if not case.ids:
                    value = relayout(rng, value[None], data.draw(st.sampled_from(
                        ["c", "strided", "big-endian", "read-only", "list"])))
                    value = value[0] if not isinstance(value, list) else value[0]
                ys[i].append(streams[i].step(value))
        states = [s.state for s in streams]
    y = np.stack([np.stack(row) for row in ys])
    want_y, want_state = case.run_torch(x)
    assert_close(y, want_y, np.float32, "pool y")
    for i, state in enumerate(states):
        for layer, want in zip(state, want_state):
            for got, w in zip(layer, want):
                assert_close(got[:, 0], w[:, i], np.float32, f"stream {i} state")


SESSION_INVALID = {
    "step float64": ("lstm-2layers", "step", np.zeros((2, 3)), TypeError, "float64.*float32"),
    "step strings": ("lstm-2layers", "step", [["1", "2", "3"]] * 2, TypeError, "expected an array of floats"),
    "step complex list": ("lstm-2layers", "step", [[1j, 0.0, 0.0]] * 2, TypeError, "expected an array of floats"),
    "step batch": ("lstm-2layers", "step", np.zeros((3, 3), np.float32), ValueError, r"expected shape \(2, 3\)"),
    "step features": ("lstm-2layers", "step", np.zeros((2, 4), np.float32), ValueError, r"expected shape \(2, 3\)"),
    "step 0-d": ("lstm-2layers", "step", np.array(0.0, np.float32), ValueError, r"expected shape \(2, 3\)"),
    "step 1-D": ("lstm-2layers", "step", np.zeros(3, np.float32), ValueError, r"expected shape \(2, 3\)"),
    "step empty": ("lstm-2layers", "step", np.zeros((0, 3), np.float32), ValueError, r"expected shape \(2, 3\)"),
    "feed 2-D": ("lstm-2layers", "feed", np.zeros((2, 3), np.float32), ValueError, r"\(2, 'steps', 3\)"),
    "feed bool": ("lstm-2layers", "feed", np.zeros((2, 4, 3), bool), TypeError, "dtype bool"),
    "ids float": ("ids-lstm-linear", "step", np.zeros(2), TypeError, "token ids must be integers"),
    "ids range": ("ids-lstm-linear", "step", np.array([0, 7]), ValueError, r"token id 7 is out of range \[0, 7\)"),
    "ids negative": ("ids-lstm-linear", "feed", np.full((2, 3), -5), ValueError, "token id -5 is out of range"),
    "ids batch": ("ids-lstm-linear", "step", np.array([1, 2, 3]), ValueError, r"shape \(batch,\) with batch = 2"),
    "state shape": ("lstm-2layers", "state", [(np.zeros((1, 3, 4)), np.zeros((1, 3, 4))), None], ValueError,
                    "expected a tuple|expected shape"),
    "state ints": ("gru", "state", [np.zeros((1, 2, 4), int), np.zeros((1, 2, 4), int)], TypeError, "expected floats"),
    "load_state text": ("lstm-2layers", "load_state", "state", TypeError, "expected bytes"),
    "load_state bytes": ("lstm-2layers", "load_state", b"\0" * 64, ValueError, "not a saved session state"),
    "reset row": ("lstm-2layers", "reset", 2, ValueError, r"row 2 is out of range \[0, 2\)"),
    "reset float": ("lstm-2layers", "reset", 0.5, TypeError, "row index"),
}


@pytest.mark.parametrize("name", list(SESSION_INVALID))
def test_session_invalid_inputs(name):
    case_name, method, value, error, message = SESSION_INVALID[name]
    session = next(case for case in CASES if case.name == case_name).model.session(2)
    before = session.state
    with pytest.raises(error, match=message):
        if method == "state":
            session.state = value
        else:
            getattr(session, method)(value)
    for got, want in zip(session.state, before):  # a refused call changed nothing
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


@pytest.mark.timeout(60)
def test_stream_invalid_inputs():
    float_case, ids_case = CASES[0], IDS
    with float_case.model.pool(max_batch=2) as pool, ids_case.model.pool(max_batch=2) as ids_pool:
        s, t = pool.open(), ids_pool.open()
        for bad, error, message in [(np.zeros(3), TypeError, "float64"), (np.zeros((1, 3), np.float32), ValueError,
                                     r"one step of shape \(3,\)"), (["a", "b", "c"], TypeError, "floats"),
                                    ([1j, 0, 0], TypeError, "floats"), (None, TypeError, "floats")]:
            with pytest.raises(error, match=message):
                s.step(bad)
        for bad, error, message in [(7, ValueError, r"out of range \[0, 7\)"), (-1, ValueError, "out of range"),
                                    (1.0, TypeError, "one token id"), (True, TypeError, "one token id"),
                                    (np.array([1, 2]), TypeError, "one token id")]:
            with pytest.raises(error, match=message):
                t.step(bad)
        np.testing.assert_array_equal(s.state[0][0], 0)
        assert np.isfinite(s.step(np.ones(3, np.float32))).all()  # the stream still works


def _stream_anything(case, session, stream, which, value):
    if which == "step":
        return session.step(value)
    if which == "feed":
        return session.feed(value)
    if which == "out":
        return session.step(np.zeros((2, 3), session.dtype) if not case.ids else np.zeros(2, int), out=value)
    if which == "stream":
        return stream.step(value)
    if which == "state":
        session.state = value
        return None
    if which == "stream_state":
        stream.state = value
        return None
    if which == "load_state":
        return session.load_state(value.tobytes() if isinstance(value, np.ndarray) else value)
    if which == "reset":
        return session.reset(value)
    return list(case.model.session().generate(value, 2, seed=0))


@pytest.fixture(scope="module")
def pools():
    opened = {case.name: case.model.pool(max_batch=4) for case in STREAMING}
    yield opened
    for pool in opened.values():
        pool.close()


def _anything_to_streaming(pools, case, value, which):
    session = case.model.session(2)
    stream = pools[case.name].open()
    try:
        with np.errstate(all="ignore"):
            _stream_anything(case, session, stream, which, value)
    except (TypeError, ValueError) as exc:
        assert str(exc)
    finally:
        stream.close()
    # Whatever happened, both still run.
    if case.ids:
        assert session.step(np.zeros(2, int)).shape[0] == 2
    else:
        assert session.step(np.zeros((2, 3), np.float32)).shape[0] == 2


STREAMING_ANYTHING = dict(case=st.sampled_from(STREAMING), value=st.one_of(_any_array(), _anything()),
                          which=st.sampled_from(["step", "feed", "out", "stream", "state", "stream_state",
                                                 "load_state", "reset", "generate"]))
_FIXTURE_OK = [HealthCheck.function_scoped_fixture]
test_streaming_entry_points_take_anything = pytest.mark.timeout(120)(settings(
    max_examples=200, deadline=None, suppress_health_check=_FIXTURE_OK)(given(**STREAMING_ANYTHING)(
        _anything_to_streaming)))
test_streaming_entry_points_long = pytest.mark.slow(pytest.mark.timeout(1800)(settings(
    max_examples=6000, deadline=None, suppress_health_check=_FIXTURE_OK)(given(**STREAMING_ANYTHING)(
        _anything_to_streaming))))
