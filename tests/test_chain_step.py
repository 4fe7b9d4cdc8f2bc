"""The chain specialisations of a plan: an Embedding folded into the next recurrent layer's input
product (a token table), a session's step as one compiled call (plan.chain_step), and packed lengths
that run only the rows still going (sorted longest first). Each against PyTorch and against the
general path it replaces."""
import numpy as np
import pytest
import torch

import lstm_engine as le
from lstm_engine import plan as plan_mod

F32 = dict(atol=2e-6, rtol=0)
V, E = 23, 7


def torch_chain(kind, layers=1, hidden=12, proj=0, head_act=None, two_heads=False, bidirectional=False, seed=0):
    """Embedding -> recurrent -> Linear (-> ReLU [-> Linear]) in torch, and the same as an engine Model."""
    torch.manual_seed(seed)
    emb = torch.nn.Embedding(V, E)
    kw = dict(num_layers=layers, batch_first=True, bidirectional=bidirectional)
    if kind == "lstm":
        rnn = torch.nn.LSTM(E, hidden, proj_size=proj, **kw)
    elif kind == "gru":
        rnn = torch.nn.GRU(E, hidden, **kw)
    else:
        rnn = torch.nn.RNN(E, hidden, nonlinearity="tanh", **kw)
    width = (proj or hidden) * (2 if bidirectional else 1)
    heads = [torch.nn.Linear(width, 9)] + ([torch.nn.Linear(9, 5)] if two_heads else [])

    def run(ids, lengths=None):
        with torch.no_grad():
            x = emb(torch.from_numpy(np.asarray(ids)))
            if lengths is None:
                y, state = rnn(x)
            else:
                packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.as_tensor(lengths), batch_first=True,
                                                                 enforce_sorted=False)
                y, state = rnn(packed)
                y = torch.nn.utils.rnn.pad_packed_sequence(y, batch_first=True, total_length=x.shape[1])[0]
            for k, head in enumerate(heads):
                y = head(y)
                if head_act == "relu" and k == 0:
                    y = torch.relu(y)
            return y.numpy(), state

    engine = [le.Embedding(emb.weight.detach().numpy())] + list(le.from_torch(rnn).layers)
    engine.append(le.Dense(heads[0].weight.detach().numpy(), heads[0].bias.detach().numpy(),
                           activation=head_act or "linear"))
    if two_heads:
        engine.append(le.Dense(heads[1].weight.detach().numpy(), heads[1].bias.detach().numpy()))
    return le.Model(engine), run


CONFIGS = {
    "lstm": dict(kind="lstm"),
    "gru": dict(kind="gru"),
    "lstm-x2-wide": dict(kind="lstm", layers=2, hidden=40),
    "gru-x2-relu-two-heads": dict(kind="gru", layers=2, hidden=20, head_act="relu", two_heads=True),
    "lstm-proj": dict(kind="lstm", proj=5),  # no C kernel: no table; the chain step looks the rows up
    "rnn": dict(kind="rnn"),  # the same
}
FUSED = {"lstm", "gru", "lstm-x2-wide", "gru-x2-relu-two-heads"}  # on the C kernels: a token table


def unfused(monkeypatch, build):
    """The same model built with no token tables: the general path for forward (see general_session)."""
    monkeypatch.setattr(plan_mod, "MAX_TABLE_BYTES", 0)
    model = build()
    monkeypatch.undo()
    return model


def general_session(model, B):
    """A session of model that steps through the plan, with no compiled chain step."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr("lstm_engine.session.chain_step", lambda *a: None)
        s = model.session(B)
    assert s._chain_step is None
    return s


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("B", [1, 3])
def test_session_steps_equal_torch_and_the_general_path(name, B, monkeypatch):
    model, run = torch_chain(**CONFIGS[name])
    plain = unfused(monkeypatch, lambda: torch_chain(**CONFIGS[name])[0])
    rng = np.random.default_rng(1)
    T = 9
    ids = rng.integers(0, V, (B, T))
    want = run(ids)[0]
    s, g = model.session(B), general_session(plain, B)
    assert s._chain_step is not None
    assert not plain.plan(np.dtype(np.float32)).tables
    assert bool(model.plan(np.dtype(np.float32)).tables) == (name in FUSED)
    got = np.stack([s.step(ids[:, t]) for t in range(T)], 1)
    general = np.stack([g.step(ids[:, t]) for t in range(T)], 1)
    np.testing.assert_allclose(got, want, **F32)
    np.testing.assert_allclose(got, general, **F32)
    # feed and forward run the plan with the folded table: the same numbers.
    s.reset()
    np.testing.assert_allclose(s.feed(ids), want, **F32)
    np.testing.assert_allclose(model.forward(ids)[0], want, **F32)
    for a, b in zip(s.state, g.state):
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, **F32)


def test_chain_step_of_floats_and_ids_of_other_dtypes():
    """Float input (no Embedding) and ids as int32 lists or scalars: what the compiled step does not take as
    it is goes through the checks and conversions and gives the same numbers."""
    model, run = torch_chain("lstm")
    ids = np.random.default_rng(2).integers(0, V, 6)
    want = run(ids[None])[0][0]
    for convert in (lambda i: np.array([i]), lambda i: np.array([i], np.int32), lambda i: [int(i)], int):
        s = model.session(1)
        np.testing.assert_allclose(np.concatenate([s.step(convert(i)) for i in ids]), want, **F32)
    floats = le.Model(list(model.layers[1:]))
    x = np.random.default_rng(3).standard_normal((2, 5, E)).astype(np.float32)
    s = floats.session(2)
    assert s._chain_step is not None
    out = np.empty((2, 9), np.float32)
    steps = [s.step(x[:, t], out=out).copy() for t in range(5)]
    np.testing.assert_allclose(np.stack(steps, 1), floats.forward(x)[0], **F32)


@pytest.mark.parametrize("bad, err, match", [
    (np.array([V]), ValueError, "token id"),
    (np.array([-1]), ValueError, "token id"),
    (np.array([1.0]), TypeError, "integers"),
    (np.array([1, 2]), ValueError, "shape"),
])
def test_bad_ids_refused_and_state_untouched(bad, err, match):
    model, _ = torch_chain("gru")
    s = model.session(1)
    s.step(np.array([3]))
    before = s.state
    with pytest.raises(err, match=match):
        s.step(bad)
    for a, b in zip(before, s.state):
        np.testing.assert_array_equal(a[0], b[0])


def test_pool_with_a_folded_embedding_equals_sessions():
    model, run = torch_chain("gru", layers=2, hidden=20)
    rng = np.random.default_rng(4)
    xs = rng.integers(0, V, (5, 8))
    want = run(xs)[0]
    with model.pool(max_batch=4) as pool:
        streams = [pool.open() for _ in range(5)]
        got = np.stack([np.stack([streams[i].step(xs[i, t]) for t in range(8)]) for i in range(5)])
    np.testing.assert_allclose(got, want, **F32)


def test_mask_zero_embedding_folds_with_its_mask(monkeypatch):
    """Keras mask_zero: the Embedding's mask still reaches the layer when its lookup is folded."""
    rng = np.random.default_rng(5)
    H = 8

    def build():
        r = np.random.default_rng(6)
        w = lambda *s: r.uniform(-0.5, 0.5, s).astype(np.float32)
        return le.Model([le.Embedding(w(V, E), mask_zero=True), le.LSTM(w(4 * H, E), w(4 * H, H), w(4 * H), w(4 * H)),
                         le.Dense(w(3, H), w(3))])

    model, plain = build(), unfused(monkeypatch, build)
    assert model.plan(np.dtype(np.float32)).tables
    ids = rng.integers(0, V, (3, 10))
    ids[0, 4:7] = 0
    ids[2, :3] = 0
    np.testing.assert_allclose(model.forward(ids)[0], plain.forward(ids)[0], **F32)
    s, g = model.session(3), general_session(plain, 3)
    for t in range(10):
        np.testing.assert_allclose(s.step(ids[:, t]), g.step(ids[:, t]), **F32)


def test_large_vocabularies_are_not_folded(monkeypatch):
    monkeypatch.setattr(plan_mod, "MAX_TABLE_BYTES", 1000)
    model, run = torch_chain("lstm")
    assert not model.plan(np.dtype(np.float32)).tables
    s = model.session(1)
    assert s._chain_step is not None  # which looks the Embedding's rows up
    ids = np.arange(6)[None] % V
    np.testing.assert_allclose(model.forward(ids)[0], run(ids)[0], **F32)
    np.testing.assert_allclose(np.stack([s.step(ids[:, t]) for t in range(6)], 1), run(ids)[0], **F32)


# -- packed lengths ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("lengths", [[4, 9, 1, 9, 6, 2], [9, 7, 7, 3, 1, 1], [1, 1, 1, 1, 1, 1]])
def test_lengths_equal_torch_packed_and_per_row_runs(kind, bidirectional, lengths):
    model, run = torch_chain(kind, layers=2, hidden=20, bidirectional=bidirectional)
    recurrent = le.Model(list(model.layers[:-1]))  # up to the recurrent layers: their final states come out
    rng = np.random.default_rng(7)
    lengths = np.array(lengths)
    ids = rng.integers(0, V, (len(lengths), 9))
    y, states = recurrent.forward(ids, lengths=lengths)
    want_y, want_state = run(ids, lengths)
    np.testing.assert_allclose(model.forward(ids, lengths=lengths)[0], want_y, **F32)
    h = want_state[0] if kind == "lstm" else want_state
    D = 2 if bidirectional else 1
    np.testing.assert_allclose(states[-1][0], h.numpy()[-D:], **F32)
    if kind == "lstm":
        np.testing.assert_allclose(states[-1][1], want_state[1].numpy()[-D:], **F32)
    for b, n in enumerate(lengths):
        alone, alone_states = recurrent.forward(ids[b:b + 1, :n])
        np.testing.assert_allclose(y[b, :n], alone[0], **F32)
        assert not y[b, n:].any()
        for got, exp in zip(states, alone_states):
            for a, e in zip(got, exp):
                np.testing.assert_allclose(a[:, b], e[:, 0], **F32)


def test_lengths_with_floats_initial_state_and_zero_length():
    """Float input (the projection skips padded steps), a given initial state sorted with the rows, and a
    row of length 0 (ONNX: zero states), against the masked general path row by row."""
    torch.manual_seed(8)
    rnn = torch.nn.LSTM(6, 24, batch_first=True)
    layer = le.from_torch(rnn).layers[0]
    kernel = layer._kernels[np.dtype(np.float32)]
    rng = np.random.default_rng(9)
    B, T = 5, 7
    x = rng.standard_normal((B, T, 6)).astype(np.float32)
    lengths = np.array([3, 7, 0, 5, 7], np.int32)
    h0 = rng.standard_normal((1, B, 24)).astype(np.float32)
    c0 = rng.standard_normal((1, B, 24)).astype(np.float32)
    order = np.argsort(-lengths, kind="stable").astype(np.int32)
    y = np.full((B, T, 24), np.nan, np.float32)
    h, c = h0[:, order].copy(), c0[:, order].copy()
    work = np.empty(kernel.work_size(B, T), np.float32)
    kernel.run(np.ascontiguousarray(x[order]), y, h, c, None, work, True, lengths=lengths[order], y_rows=order)
    mask = (np.arange(T) < lengths[:, None]).astype(np.uint8)
    y2 = np.empty_like(y)
    h2, c2 = h0.copy(), c0.copy()
    kernel.run(x, y2, h2, c2, mask, np.empty(kernel.work_size(B, T), np.float32), True)
    np.testing.assert_allclose(y, y2, **F32)
    np.testing.assert_allclose(h[:, np.argsort(order)], h2, **F32)
    np.testing.assert_allclose(c[:, np.argsort(order)], c2, **F32)
    with torch.no_grad():
        for b in np.flatnonzero(lengths):
            ty, (th, tc) = rnn(torch.from_numpy(x[b:b + 1, :lengths[b]]),
                               (torch.from_numpy(h0[:, b:b + 1]), torch.from_numpy(c0[:, b:b + 1])))
            np.testing.assert_allclose(y2[b, :lengths[b]], ty[0].numpy(), **F32)
            np.testing.assert_allclose(h2[:, b], th[:, 0].numpy(), **F32)


def test_kernel_refuses_bad_lengths_and_tables():
    torch.manual_seed(10)
    kernel = le.from_torch(torch.nn.GRU(4, 16, batch_first=True)).layers[0]._kernels[np.dtype(np.float32)]
    x = np.zeros((2, 3, 4), np.float32)
    y = np.empty((2, 3, 16), np.float32)
    h = np.zeros((1, 2, 16), np.float32)
    work = np.empty(kernel.work_size(2, 3), np.float32)
    for lengths in ([1, 3], [4, 1], [-1, 0]):  # not longest first, past the steps, negative
        with pytest.raises(ValueError, match="lengths"):
            kernel.run(x, y, h, h, None, work, True, lengths=np.array(lengths, np.int32))
    with pytest.raises(ValueError, match="lengths"):
        kernel.run(x, y, h, h, None, work, True, lengths=np.array([3, 1]))  # int64
    table = kernel.input_table(np.zeros((5, 4), np.float32))
    with pytest.raises(ValueError, match="token id 5"):
        kernel.run(np.array([[0, 1, 5], [0, 0, 0]]), y, h, h, None, work, True, table=table)
    with pytest.raises(ValueError, match="table"):
        kernel.run(np.zeros((2, 3), np.intp), y, h, h, None, work, True, table=table[:, :2, :8].copy())


def test_record_runs_the_embedding_it_folded(monkeypatch):
    """forward(record=True) runs the layers in NumPy: a folded Embedding is looked up there as before."""
    model, run = torch_chain("gru")
    plain = unfused(monkeypatch, lambda: torch_chain("gru")[0])
    ids = np.random.default_rng(11).integers(0, V, (2, 6))
    y, state, gates = model.forward(ids, record=True)
    y2, state2, gates2 = plain.forward(ids, record=True)
    np.testing.assert_allclose(y, run(ids)[0], atol=1e-5)
    np.testing.assert_allclose(y, y2, **F32)
    for a, b in zip(gates, gates2):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], **F32)


@pytest.mark.parametrize("variant", ["gru-reset-before", "float64", "softmax-head"])
def test_what_is_not_fused_takes_the_general_path(variant):
    """GRU with reset before (Keras reset_after=False) and float64 have no table; the first steps in one
    call all the same (its run(), the Embedding's rows looked up), float64 heads and heads other than
    linear/relu are not specialised: those sessions step through the plan. Each equals forward."""
    r = np.random.default_rng(12)
    w = lambda *s: r.uniform(-0.5, 0.5, s)
    H = 10
    dtype = np.float64 if variant == "float64" else np.float32
    rnn = le.GRU(w(3 * H, E), w(3 * H, H), w(3 * H), w(3 * H), reset_after=variant != "gru-reset-before", dtype=dtype)
    model = le.Model([le.Embedding(w(V, E), dtype=dtype), rnn,
                      le.Dense(w(4, H), w(4), activation="softmax" if variant == "softmax-head" else "linear",
                               dtype=dtype)])
    s = model.session(2)
    assert (s._chain_step is not None) == (variant == "gru-reset-before")
    assert bool(model.plan(np.dtype(dtype)).tables) == (variant == "softmax-head")
    ids = r.integers(0, V, (2, 7))
    got = np.stack([s.step(ids[:, t]) for t in range(7)], 1)
    np.testing.assert_allclose(got, model.forward(ids)[0], atol=1e-10 if variant == "float64" else 2e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stacks_mixing_c_kernels_and_others_step_in_one_call(dtype):
    """LSTM with proj_size (its run()), then a GRU (C kernels in float32), then an RNN: one chain step."""
    torch.manual_seed(13)
    nets = [torch.nn.LSTM(5, 12, proj_size=6, batch_first=True), torch.nn.GRU(6, 16, batch_first=True),
            torch.nn.RNN(16, 8, batch_first=True)]
    model = le.Model([layer for net in nets for layer in le.from_torch(net, dtype=dtype).layers])
    x = np.random.default_rng(14).standard_normal((2, 6, 5)).astype(dtype)
    with torch.no_grad():
        want = torch.from_numpy(x.astype(np.float32))
        for net in nets:
            want = net(want)[0]
    s = model.session(2, dtype=dtype)
    assert s._chain_step is not None
    got = np.stack([s.step(x[:, t]) for t in range(6)], 1)
    np.testing.assert_allclose(got, want.numpy(), atol=2e-6)
    np.testing.assert_allclose(got, model.forward(x)[0], atol=1e-10 if dtype == np.float64 else 2e-6)


@pytest.mark.parametrize("B", [1, 3])
def test_layers_of_a_step_in_one_job_whatever_their_threads(B, kernel_variant):
    """A session step runs the C-kernel layers that follow each other as one pool job (le_run_chain_f32),
    each layer on its own threads (one below parallel_min_bytes) with a wait between layers inside the
    job; an RNN between them splits the chain. The same bits on 1 and 2 threads whatever each layer gets,
    and PyTorch's results."""
    from lstm_engine import _kernels

    torch.manual_seed(21)
    emb = torch.nn.Embedding(V, E)
    nets = [torch.nn.LSTM(E, 40, num_layers=2, batch_first=True), torch.nn.RNN(40, 24, batch_first=True),
            torch.nn.GRU(24, 72, batch_first=True), torch.nn.LSTM(72, 20, batch_first=True)]
    head = torch.nn.Linear(20, 9)
    layers = [le.Embedding(emb.weight.detach().numpy())]
    layers += [layer for net in nets for layer in le.from_torch(net).layers]
    layers.append(le.Dense(head.weight.detach().numpy(), head.bias.detach().numpy()))
    model = le.Model(layers)
    ids = np.random.default_rng(22).integers(0, V, (B, 7))
    with torch.no_grad():
        want = emb(torch.from_numpy(ids))
        for net in nets:
            want = net(want)[0]
        want = head(want).numpy()
    runs = []
    # 0: every layer split; 30000 bytes: only the GRU (3 * 72 * 72 * 4 * B bytes a step) and, at B 3, the
    # LSTM 40s (4 * 40 * 40 * 4 * B) split; then chains of layers on different threads.
    for min_bytes in (0, 30000):
        saved = _kernels.set_parallel_min_bytes(min_bytes)
        try:
            for threads in (1, 2, 1, 2):
                model.threads = threads
                s = model.session(B)
                assert s._chain_step is not None
                # Contiguous ids: what the compiled step takes as they are (a column of ids is not).
                runs.append(np.stack([s.step(np.ascontiguousarray(ids[:, t])) for t in range(ids.shape[1])], 1))
        finally:
            _kernels.set_parallel_min_bytes(saved)
    for got in runs[1:]:
        np.testing.assert_array_equal(got, runs[0])
    np.testing.assert_allclose(runs[0], want, **F32)


@pytest.mark.parametrize("fmt", ["int8", "float16", "bfloat16"])
@pytest.mark.parametrize("keep", [(), ("Embedding",), ("Dense",)])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("B", [1, 3])
def test_quantized_chains_step_in_one_call(fmt, keep, kind, B, kernel_variant):
    """A quantized token LM (its Embedding's rows widened in the step, its layers' run(), its head one packed
    product) steps in one call: the same bits as the plan's steps (a float head's rows: the engine's GEMV
    against the plan's BLAS at B > 1, as for float models), and forward's numbers."""
    model = torch_chain(kind, layers=2, hidden=20, head_act="relu", two_heads=True)[0]
    q = le.quantize(model, fmt, keep_float=keep)
    ids = np.random.default_rng(23).integers(0, V, (B, 8))
    s, g = q.session(B), general_session(q, B)
    assert s._chain_step is not None
    got = np.stack([s.step(np.ascontiguousarray(ids[:, t])) for t in range(8)], 1)
    general = np.stack([g.step(ids[:, t]) for t in range(8)], 1)
    if "Dense" in keep and B > 1:
        np.testing.assert_allclose(got, general, **F32)
    else:
        np.testing.assert_array_equal(got, general)
    np.testing.assert_allclose(got, q.forward(ids)[0], atol=1e-5)
    if fmt == "int8" and "Dense" not in keep:
        # Exact integer sums whatever the rows of a product: a step's input and recurrent products as one
        # job (le_qgemm_pair) give the bits of forward's input product over every step and its recurrent ones.
        np.testing.assert_array_equal(got, q.forward(ids)[0])
    for a, b in zip(s.state, g.state):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
