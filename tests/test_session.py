"""Sessions: streaming in steps and chunks equals one forward pass; state reset, access, save/load; threads."""
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lstm_engine as le
from lstm_engine import stream as stream_mod

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.timeout(120)

F32 = dict(atol=1e-6, rtol=0)
F64 = dict(atol=1e-10, rtol=0)


def torch_model(kind, dtype=np.float32, seed=0):
    """A small real PyTorch network of the given kind, as an engine Model (and the torch modules)."""
    torch.manual_seed(seed)
    I, H, V = 5, 12, 11
    head = None
    emb = None
    if kind == "lstm":
        rnn = torch.nn.LSTM(I, H, batch_first=True)
    elif kind == "lstm_proj":
        rnn = torch.nn.LSTM(I, H, proj_size=7, batch_first=True)
    elif kind == "gru":
        rnn = torch.nn.GRU(I, H, batch_first=True)
    elif kind == "rnn_relu":
        rnn = torch.nn.RNN(I, H, nonlinearity="relu", batch_first=True)
    elif kind == "stack":
        rnn = torch.nn.LSTM(I, H, num_layers=3, batch_first=True)
    elif kind == "lm":
        emb = torch.nn.Embedding(V, I)
        rnn = torch.nn.LSTM(I, H, num_layers=2, proj_size=6, batch_first=True)
        head = torch.nn.Linear(6, V)
    else:
        raise AssertionError(kind)
    layers = list(le.from_torch(rnn, dtype=dtype).layers)
    if emb is not None:
        layers.insert(0, le.Embedding(emb.weight, dtype=dtype))
    if head is not None:
        layers.append(le.Dense(head.weight, head.bias, dtype=dtype))
    return le.Model(layers)


def mixed_model(dtype=np.float32, seed=1):
    """Dense -> GRU (Keras reset-before) -> RNN -> Dense(softmax): layers built from raw weights."""
    rng = np.random.default_rng(seed)
    I, H = 4, 9
    w = lambda *s: rng.uniform(-0.5, 0.5, s)
    return le.Model([
        le.Dense(w(6, I), w(6), activation="tanh", dtype=dtype),
        le.GRU(w(3 * H, 6), w(3 * H, H), w(3 * H), w(3 * H), reset_after=False, dtype=dtype),
        le.RNN(w(H, H), w(H, H), w(H), w(H), dtype=dtype),
        le.Dense(w(5, H), w(5), activation="softmax", dtype=dtype),
    ])


KINDS = ["lstm", "lstm_proj", "gru", "rnn_relu", "stack", "lm"]


def make(kind, dtype=np.float32):
    return mixed_model(dtype) if kind == "mixed" else torch_model(kind, dtype)


def inputs(model, B, T, rng, dtype=np.float32):
    if model.takes_ids:
        return rng.integers(0, model.layers[0].num_embeddings, (B, T))
    return rng.standard_normal((B, T, model.input_size)).astype(dtype)


def chunks(T, rng):
    cuts = sorted(set(rng.integers(1, T, rng.integers(1, 6)).tolist()))
    return list(zip([0] + cuts, cuts + [T]))


# -- equivalence ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS + ["mixed"])
@pytest.mark.parametrize("B", [1, 3])
def test_steps_and_chunks_equal_forward(kind, B):
    model = make(kind)
    rng = np.random.default_rng(7)
    T = 23
    x = inputs(model, B, T, rng)
    want, want_state = model.forward(x)

    s = model.session(B)
    got = np.stack([s.step(x[:, t]) for t in range(T)], axis=1)
    np.testing.assert_allclose(got, want, **F32)
    for (h, *c), (wh, *wc) in zip(s.state, want_state):
        np.testing.assert_allclose(h, wh, **F32)

    for trial in range(3):
        s.reset()
        parts = [s.feed(x[:, a:b]) for a, b in chunks(T, rng)]
        np.testing.assert_allclose(np.concatenate(parts, axis=1), want, **F32)


@pytest.mark.parametrize("kind", ["lstm_proj", "gru", "lm", "mixed"])
def test_float64_sessions(kind):
    model = make(kind, np.float64)
    rng = np.random.default_rng(3)
    x = inputs(model, 2, 17, rng, np.float64)
    want, _ = model.forward(x)
    s = model.session(2)
    assert s.dtype == np.float64
    got = np.concatenate([s.feed(x[:, :5]), s.step(x[:, 5])[:, None], s.feed(x[:, 6:])], axis=1)
    np.testing.assert_allclose(got, want, **F64)


def test_matches_torch_streaming_with_state_carried():
    """The session against PyTorch itself, carrying (h, c) between chunks in torch too."""
    torch.manual_seed(5)
    emb, rnn, head = torch.nn.Embedding(13, 6), torch.nn.LSTM(6, 10, 2, batch_first=True), torch.nn.Linear(10, 13)
    model = le.Model([le.Embedding(emb.weight), *le.from_torch(rnn).layers, le.Dense(head.weight, head.bias)])
    ids = torch.randint(0, 13, (2, 30))
    s = model.session(2)
    state = None
    for a, b in [(0, 1), (1, 9), (9, 10), (10, 30)]:
        with torch.no_grad():
            y, state = rnn(emb(ids[:, a:b]), state)
            want = head(y).numpy()
        np.testing.assert_allclose(s.feed(ids[:, a:b].numpy()), want, atol=1e-5)
    for k, (h, c) in enumerate(s.state):
        np.testing.assert_allclose(h[0], state[0][k].numpy(), atol=1e-5)
        np.testing.assert_allclose(c[0], state[1][k].numpy(), atol=1e-5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), B=st.integers(1, 4), T=st.integers(1, 40))
def test_random_chunkings(seed, B, T):
    model = _HYP_MODEL
    rng = np.random.default_rng(seed)
    x = inputs(model, B, T, rng)
    want, _ = model.forward(x)
    s = model.session(B)
    got = []
    t = 0
    while t < T:
        n = int(rng.integers(0, 6))
        if n == 0:
            got.append(s.step(x[:, t])[:, None])
            t += 1
        else:
            got.append(s.feed(x[:, t:t + n]))
            t += n
    np.testing.assert_allclose(np.concatenate(got, axis=1), want, **F32)


_HYP_MODEL = torch_model("stack")


def test_long_feed_runs_in_slices(monkeypatch):
    monkeypatch.setattr(stream_mod, "MAX_CHUNK_ELEMENTS", 200)
    model = make("lm")
    x = inputs(model, 2, 57, np.random.default_rng(0))
    s = model.session(2)
    assert s._max_steps < 57
    np.testing.assert_allclose(s.feed(x), model.forward(x)[0], **F32)


def test_empty_chunk_changes_nothing():
    model = make("gru")
    s = model.session(2)
    x = inputs(model, 2, 4, np.random.default_rng(0))
    s.feed(x)
    before = s.state
    y = s.feed(x[:, :0])
    assert y.shape == (2, 0, model.output_size)
    np.testing.assert_array_equal(s.state[0][0], before[0][0])


# -- masks across calls -----------------------------------------------------------------------------

def masked_models():
    rng = np.random.default_rng(2)
    w = lambda *s: rng.uniform(-0.6, 0.6, s)
    H = 6
    lstm = lambda i, **kw: le.LSTM(w(4 * H, i), w(4 * H, H), w(4 * H), w(4 * H), **kw)
    return {
        "embedding_mask_zero": le.Model([le.Embedding(w(9, 4), mask_zero=True), lstm(4), lstm(H),
                                         le.Dense(w(3, H), w(3))]),
        "masking": le.Model([le.Masking(0.0), lstm(4), le.Dense(w(3, H), w(3))]),
        "zero_output_for_mask": le.Model([le.Embedding(w(9, 4), mask_zero=True),
                                          lstm(4, zero_output_for_mask=True)]),
    }


@pytest.mark.parametrize("name", ["embedding_mask_zero", "masking", "zero_output_for_mask"])
def test_masked_steps_across_chunk_boundaries(name):
    """A masked step repeats the previous output (Keras) even when it falls at the start of a chunk."""
    model = masked_models()[name]
    rng = np.random.default_rng(4)
    B, T = 3, 20
    if model.takes_ids:
        x = rng.integers(1, 9, (B, T))
        x[0, :4] = 0  # masked before the first valid step: outputs 0
        x[1, 5:12] = 0  # a masked run across chunk boundaries
        x[2, 9:] = 0
    else:
        x = rng.standard_normal((B, T, 4)).astype(np.float32)
        x[0, :4] = 0
        x[1, 5:12] = 0
        x[2, 9:] = 0
    want, _ = model.forward(x)
    for cuts in ([(t, t + 1) for t in range(T)], [(0, 6), (6, 7), (7, 10), (10, 20)], [(0, 20)]):
        s = model.session(B)
        got = np.concatenate([s.feed(x[:, a:b]) for a, b in cuts], axis=1)
        np.testing.assert_allclose(got, want, **F32)


def test_masked_state_round_trips_through_save_state():
    model = masked_models()["embedding_mask_zero"]
    x = np.array([[3, 4, 0, 0, 5, 0, 2]])
    want, _ = model.forward(x)
    s = model.session(1)
    s.feed(x[:, :3])
    blob = s.save_state()
    s.reset()
    s.feed(x[:, :2])
    s.load_state(blob)
    np.testing.assert_allclose(s.feed(x[:, 3:]), want[:, 3:], **F32)


# -- inputs, outputs and their checks ----------------------------------------------------------------

def test_step_accepts_ids_as_scalars_and_lists():
    model = make("lm")
    s1, s2 = model.session(1), model.session(1)
    a = s1.step(np.array([4]))
    b = s2.step(4)
    np.testing.assert_array_equal(a, b)
    model2 = make("lstm")
    s = model2.session(2)
    y = s.step([[0.1] * 5, [0.2] * 5])
    assert y.shape == (2, model2.output_size) and y.dtype == np.float32


def test_out_buffers_are_used():
    model = make("stack")
    x = inputs(model, 2, 6, np.random.default_rng(0))
    s = model.session(2)
    out = np.empty((2, model.output_size), np.float32)
    assert s.step(x[:, 0], out=out) is out
    chunk_out = np.empty((2, 5, model.output_size), np.float32)
    assert s.feed(x[:, 1:], out=chunk_out) is chunk_out
    np.testing.assert_allclose(np.concatenate([out[:, None], chunk_out], 1), model.forward(x)[0], **F32)


def test_fast_path_takes_byteswapped_and_strided_inputs():
    model = make("lstm")
    x = inputs(model, 2, 3, np.random.default_rng(0))
    want = model.forward(x)[0][:, 0]
    s = model.session(2)
    np.testing.assert_allclose(s.step(x[:, 0].astype(">f4")), want, **F32)
    s.reset()
    wide = np.zeros((2, 10), np.float32)
    wide[:, ::2] = x[:, 0]
    np.testing.assert_allclose(s.step(wide[:, ::2]), want, **F32)


@pytest.mark.parametrize("bad, err, match", [
    (np.zeros((2, 5), np.float64), TypeError, "float64.*float32"),
    (np.zeros((2, 4), np.float32), ValueError, r"expected shape \(2, 5\)"),
    (np.zeros((3, 5), np.float32), ValueError, r"expected shape \(2, 5\)"),
    (np.zeros((2, 1, 5), np.float32), ValueError, "expected shape"),
    ("text", TypeError, "floats"),
])
def test_step_rejects_bad_floats(bad, err, match):
    s = make("lstm").session(2)
    with pytest.raises(err, match=match):
        s.step(bad)


@pytest.mark.parametrize("bad, err, match", [
    (np.array([1.0]), TypeError, "integers"),
    (np.array([11]), ValueError, "out of range"),
    (np.array([-1]), ValueError, "out of range"),
    (np.array([1, 2]), ValueError, r"shape \(batch,\)"),
])
def test_step_rejects_bad_ids(bad, err, match):
    s = make("lm").session(1)
    with pytest.raises(err, match=match):
        s.step(bad)
    np.testing.assert_array_equal(s.state[0][0], 0)  # nothing ran


def test_feed_and_out_checks():
    s = make("lstm").session(2)
    with pytest.raises(ValueError, match=r"\(2, 'steps', 5\)"):
        s.feed(np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="out: expected shape"):
        s.step(np.zeros((2, 5), np.float32), out=np.empty((2, 3), np.float32))
    with pytest.raises(TypeError, match="out: dtype"):
        s.step(np.zeros((2, 5), np.float32), out=np.empty((2, 12), np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        s.step(np.zeros((2, 5), np.float32), out=np.empty((12, 2), np.float32).T)
    # The compiled step takes out only as it is; the same number of floats in another shape is refused too.
    for shape in [(24,), (4, 6), (1, 2, 12)]:
        with pytest.raises(ValueError, match="out: expected shape"):
            s.step(np.zeros((2, 5), np.float32), out=np.empty(shape, np.float32))
    frozen = np.empty((2, 12), np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        s.step(np.zeros((2, 5), np.float32), out=frozen)
    with pytest.raises(TypeError, match="out: expected a NumPy array"):
        s.step(np.zeros((2, 5), np.float32), out=[[0.0] * 12] * 2)
    np.testing.assert_array_equal(s.state[0][0], 0)  # nothing ran


def test_session_arguments():
    model = make("lstm")
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="batch_size"):
            model.session(bad)
    with pytest.raises(TypeError, match="keeps weights in float32"):
        model.session(1, dtype=np.float64)


@pytest.mark.parametrize("layer_kw, match", [
    ({"bidirectional": True}, "bidirectional"),
    ({"go_backwards": True}, "go_backwards"),
    ({"return_sequences": False}, "return_sequences=False"),
])
def test_models_that_cannot_stream_are_refused(layer_kw, match):
    rng = np.random.default_rng(0)
    H = 4
    D = 2 if layer_kw.get("bidirectional") else 1
    shape = lambda *s: rng.standard_normal((D, *s) if D == 2 else s)
    first = le.LSTM(shape(4 * H, 3), shape(4 * H, H), **layer_kw)
    second = le.GRU(rng.standard_normal((3 * H, first.output_size)), rng.standard_normal((3 * H, H)))
    model = le.Model([first, second])
    with pytest.raises(ValueError, match=match):
        model.session()
    with pytest.raises(ValueError, match=match):
        model.pool()


def test_return_sequences_false_on_the_last_layer_streams():
    rng = np.random.default_rng(0)
    layer = le.LSTM(rng.standard_normal((16, 3)), rng.standard_normal((16, 4)), return_sequences=False)
    model = le.Model([layer, le.Dense(rng.standard_normal((2, 4)))])
    x = rng.standard_normal((2, 9, 3)).astype(np.float32)
    s = model.session(2)
    ys = s.feed(x)
    # Each step's output is what forward returns for the sequence up to that step.
    for t in (0, 4, 8):
        np.testing.assert_allclose(ys[:, t], model.forward(x[:, :t + 1])[0], **F32)


# -- state -------------------------------------------------------------------------------------------

def test_reset_rows_restarts_only_those_rows():
    model = make("lstm_proj")
    rng = np.random.default_rng(1)
    x = inputs(model, 3, 12, rng)
    s = model.session(3)
    s.feed(x[:, :6])
    s.reset(rows=[1])
    y = s.feed(x[:, 6:])
    full = model.forward(x)[0]
    fresh = model.forward(x[1:2, 6:])[0]
    np.testing.assert_allclose(y[[0, 2]], full[[0, 2], 6:], **F32)
    np.testing.assert_allclose(y[1], fresh[0], **F32)
    s.reset(np.array([True, False, False]))
    assert np.all(s.state[0][0][:, 0] == 0) and np.any(s.state[0][0][:, 2] != 0)
    s.reset(2)
    with pytest.raises(ValueError, match="out of range"):
        s.reset(3)
    with pytest.raises(ValueError, match="boolean mask"):
        s.reset(np.array([True, False]))
    with pytest.raises(TypeError, match="row index"):
        s.reset(1.5)


def test_state_reads_copies_and_writes_forward_layout():
    model = make("stack")
    rng = np.random.default_rng(2)
    x = inputs(model, 2, 10, rng)
    _, state4 = model.forward(x[:, :4])
    s = model.session(2)
    s.state = state4
    np.testing.assert_allclose(s.feed(x[:, 4:]), model.forward(x)[0][:, 4:], **F32)
    st_copy = s.state
    st_copy[0][0][...] = 123
    assert not np.any(s.state[0][0] == 123)
    with pytest.raises(ValueError, match=r"expected shape \(1, 2, 12\)"):
        s.state = [(np.zeros((1, 3, 12)), np.zeros((1, 3, 12)))] * 3
    with pytest.raises(ValueError, match="3 entries"):
        s.state = [state4[0]]
    s.state = None
    assert all(np.all(a == 0) for entry in s.state for a in entry)


def test_save_and_load_state_round_trip():
    model = make("lm")
    x = inputs(model, 2, 12, np.random.default_rng(3))
    want = model.forward(x)[0]
    s = model.session(2)
    s.feed(x[:, :5])
    blob = s.save_state()
    assert isinstance(blob, bytes)
    other = model.session(2)
    other.load_state(blob)
    np.testing.assert_allclose(other.feed(x[:, 5:]), want[:, 5:], **F32)
    # A reloaded copy of the same model accepts it too.
    twin = le.Model(model.layers)
    twin.session(2).load_state(blob)


def test_load_state_refuses_what_does_not_fit():
    model = make("lm")
    s = model.session(2)
    s.feed(inputs(model, 2, 3, np.random.default_rng(0)))
    blob = s.save_state()
    cases = {
        "different model": (make("lstm").session(2), "different model"),
        "other weights": (torch_model("lm", seed=9).session(2), "different weights"),
        "batch": (model.session(3), "batch size 2"),
    }
    for name, (target, match) in cases.items():
        with pytest.raises(ValueError, match=match):
            target.load_state(blob)
    both = make("lm", (np.float32, np.float64))
    s32 = both.session(2)
    with pytest.raises(ValueError, match="float32 but this session runs float64"):
        both.session(2, dtype=np.float64).load_state(s32.save_state())
    with pytest.raises(ValueError, match="not a saved session state"):
        s.load_state(b"hello world, this is not a state")
    with pytest.raises(ValueError, match="truncated or corrupted"):
        s.load_state(blob[:-9])
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x10
    with pytest.raises(ValueError, match="corrupted"):
        s.load_state(bytes(flipped))
    with pytest.raises(TypeError, match="bytes"):
        s.load_state("text")
    newer = bytearray(blob)
    newer[8] = 99
    with pytest.raises(ValueError, match="version 99"):
        s.load_state(bytes(newer))


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_load_state_never_crashes_on_mutations(data):
    s = _FUZZ_SESSION
    blob = _FUZZ_BLOB
    mutated = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(0, len(mutated) - 1)))
        if op == "flip" and mutated:
            mutated[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del mutated[pos:pos + data.draw(st.integers(1, 40))]
        else:
            mutated[pos:pos] = data.draw(st.binary(min_size=1, max_size=20))
    before = s.state
    try:
        s.load_state(bytes(mutated))
    except ValueError:
        for (a, *_), (b, *_) in zip(before, s.state):
            np.testing.assert_array_equal(a, b)  # a refused state leaves the session as it was


_FUZZ_SESSION = make("lstm").session(1)
_FUZZ_SESSION.feed(np.ones((1, 3, 5), np.float32))
_FUZZ_BLOB = _FUZZ_SESSION.save_state()


# -- threads -------------------------------------------------------------------------------------------

def test_one_session_used_from_two_threads_raises():
    s = make("lstm").session(1)
    x = np.ones((1, 5), np.float32)
    blob = s.save_state()
    s._take_token()  # as if another thread were inside a call
    try:
        for call in (lambda: s.step(x), lambda: s.feed(x[:, None]), s.reset, lambda: s.state,
                     s.save_state, lambda: s.load_state(blob)):
            with pytest.raises(RuntimeError, match="another thread"):
                call()
    finally:
        s._give_token(True)
    s.step(x)


def test_concurrent_misuse_never_corrupts_the_state():
    """Two threads hammer one session: each call runs whole or raises; the state counts exactly the runs."""
    model = make("gru")
    s = model.session(1)
    x = np.full((1, 5), 0.3, np.float32)
    done = [0, 0]
    refused = [0, 0]

    def worker(k):
        for _ in range(300):
            try:
                s.step(x)
                done[k] += 1
            except RuntimeError:
                refused[k] += 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    n = sum(done)
    assert n + sum(refused) == 600
    ref = model.session(1)
    for _ in range(n):
        ref.step(x)
    np.testing.assert_array_equal(s.state[0][0], ref.state[0][0])


def test_sessions_in_parallel_threads_equal_serial_runs():
    model = make("lm")
    rng = np.random.default_rng(5)
    xs = [inputs(model, 2, 40, rng) for _ in range(4)]
    serial = []
    for x in xs:
        s = model.session(2)
        serial.append(np.stack([s.step(x[:, t]) for t in range(40)], 1))
    results = [None] * 4

    def run(k):
        s = model.session(2)
        results[k] = np.stack([s.step(xs[k][:, t]) for t in range(40)], 1)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(results, serial):
        np.testing.assert_array_equal(a, b)


def test_sessions_share_the_weights():
    model = make("stack")
    a, b = model.session(1), model.session(1)
    assert a._streamer.kernels[0] is b._streamer.kernels[0]
