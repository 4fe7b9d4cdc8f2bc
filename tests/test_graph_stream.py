"""Graph models in sessions and the pool: step-by-step equals forward, or a ValueError naming the op."""
import numpy as np
import pytest

import lstm_engine as le
from lstm_engine.graph import Graph, Node, ValueInfo

RNG = np.random.default_rng(11)
F32 = dict(rtol=1e-5, atol=1e-5)


def w(*shape):
    return RNG.uniform(-0.5, 0.5, shape).astype(np.float32)


def lstm(i, h, **kw):
    return le.LSTM(w(4 * h, i), w(4 * h, h), w(4 * h), w(4 * h), **kw)


def residual_graph():
    """y = LayerNorm(lstm2(lstm1(x)) + lstm1(x)) @ W + b, then softmax; returns (y, h_n of lstm2)."""
    nodes = [
        Node("Recurrent", ["x"], ["a", "ha", "ca"], {"layer": 0}, "lstm1"),
        Node("Recurrent", ["a"], ["b", "hb", "cb"], {"layer": 1}, "lstm2"),
        Node("Add", ["a", "b"], ["s"], {}, "residual"),
        Node("LayerNormalization", ["s", "ln.w", "ln.b"], ["n"], {"axis": -1}, "norm"),
        Node("MatMul", ["n", "fc.w"], ["m"], {}, "fc"),
        Node("Add", ["m", "fc.b"], ["logits"], {}, "fc_bias"),
        Node("Softmax", ["logits"], ["y"], {"axis": -1}, "softmax"),
    ]
    consts = {"ln.w": w(6), "ln.b": w(6), "fc.w": w(6, 3), "fc.b": w(3)}
    return Graph([ValueInfo("x", "float", ["batch", "steps", 4])], ["y", "hb"], nodes, consts,
                 [lstm(4, 6), lstm(6, 6)], output_structure=(0, 1))


def time_major_graph():
    """x (T, B, I) -> transpose -> GRU -> transpose back -> tanh; a time-major ONNX-style graph."""
    gru = le.GRU(w(15, 3), w(15, 5), w(15), w(15))
    nodes = [Node("Transpose", ["x"], ["xb"], {"perm": [1, 0, 2]}, "t1"),
             Node("Recurrent", ["xb"], ["yb", "h"], {"layer": 0}, "gru"),
             Node("Transpose", ["yb"], ["yt"], {"perm": [1, 0, 2]}, "t2"),
             Node("Unsqueeze", ["yt"], ["y4"], {"axes": [1]}, "dir_axis"),
             Node("Tanh", ["y4"], ["y"], {}, "tanh")]
    return Graph([ValueInfo("x", "float", ["steps", "batch", 3])], ["y"], nodes, {}, [gru])


def embedding_graph():
    """Token ids -> Gather from a table -> RNN -> Gemm-like head on every step."""
    rnn = le.RNN(w(7, 4), w(7, 7), w(7), w(7))
    nodes = [Node("Gather", ["table", "ids"], ["e"], {"axis": 0}, "embed"),
             Node("Recurrent", ["e"], ["h_all", "h"], {"layer": 0}, "rnn"),
             Node("Einsum", ["h_all", "head"], ["y"], {"equation": "bth,vh->btv"}, "head")]
    return Graph([ValueInfo("ids", "int64", ["batch", "steps"])], ["y"], nodes,
                 {"table": w(10, 4), "head": w(10, 7)}, [rnn])


@pytest.mark.parametrize("make", [residual_graph, time_major_graph, embedding_graph])
def test_step_and_feed_equal_forward(make):
    model = le.Model(make())
    info = model.graph.inputs[0]
    B, T = 2, 9
    shape = [B if d == "batch" else T if d == "steps" else d for d in info.shape]
    x = RNG.integers(0, 10, shape) if info.dtype == "int64" else RNG.standard_normal(shape).astype(np.float32)
    want, state = model.forward(x)
    axis = info.time_axis

    def along(v, t0, t1):
        return np.take(v, np.arange(t0, t1), axis=axis)

    s = model.session(B)
    steps = [s.step(np.take(x, t, axis=axis)) for t in range(T)]
    first = want[0] if isinstance(want, tuple) else want
    got = np.stack([st[0] if isinstance(st, tuple) else st for st in steps], axis=axis if axis == 1 else 0)
    np.testing.assert_allclose(got, first, **F32)
    s2 = model.session(B)
    chunks = [s2.feed(along(x, a, b)) for a, b in ((0, 4), (4, 5), (5, 9))]
    firsts = [c[0] if isinstance(c, tuple) else c for c in chunks]
    np.testing.assert_allclose(np.concatenate(firsts, axis=axis), first, **F32)
    if isinstance(want, tuple):  # the final state output is the one after the last chunk
        np.testing.assert_allclose(chunks[-1][1], want[1], **F32)
        np.testing.assert_allclose(steps[-1][1], want[1], **F32)
    for a, b in zip(s.state, state):
        for u, v in zip(a, b):
            np.testing.assert_allclose(u, v, **F32)


def _refused(nodes, consts=None, layers=None, inputs=None):
    g = Graph(inputs or [ValueInfo("x", "float", ["batch", "steps", 4])], [nodes[-1].outputs[0]], nodes,
              consts or {}, layers or [lstm(4, 6)])
    return le.Model(g)


REC = Node("Recurrent", ["x"], ["out", "h", "c"], {"layer": 0}, "lstm")


@pytest.mark.parametrize("nodes, consts, message", [
    ([REC, Node("Gather", ["out", "last"], ["y"], {"axis": 1}, "last_step")], {"last": np.array(-1)},
     "'last_step' \\(Gather\\).* indexes along the time axis"),
    ([REC, Node("ReduceMean", ["out"], ["y"], {"axes": [1], "keepdims": 0}, "pool")], {},
     "'pool' \\(ReduceMean\\).*pooling over time"),
    ([REC, Node("Softmax", ["out"], ["y"], {"axis": 1}, "attn")], {}, "along the time axis"),
    ([REC, Node("Slice", ["out"], ["y"], {"starts": [1], "ends": [9], "axes": [1]}, "sl")], {}, "slices the time"),
    ([REC, Node("Shape", ["out"], ["y"], {}, "size")], {}, "reads the number of steps"),
    ([REC, Node("Squeeze", ["h"], ["h2"], {"axes": [0]}, "sq"), Node("Unsqueeze", ["h2"], ["h3"], {"axes": [1]}, "u"),
      Node("Add", ["out", "h3"], ["y"], {}, "mix")], {}, "'mix' \\(Add\\).* combines a final state"),
    ([REC, Node("Transpose", ["out"], ["o2"], {"perm": [0, 2, 1]}, "t"),
      Node("Conv", ["o2", "k"], ["y"], {}, "conv")], {"k": np.ones((2, 6, 3), np.float32)}, "convolves along"),
    ([REC, Node("MatMul", ["out", "outT"], ["y"], {}, "mm")], {}, "reads 'outT'"),
])
def test_non_causal_ops_are_refused_by_name(nodes, consts, message):
    try:
        model = _refused(nodes, consts)
    except le.LoadError as exc:  # the last case is not even a valid graph
        assert "reads 'outT'" in str(exc)
        return
    with pytest.raises(ValueError, match=message):
        model.session()
    with pytest.raises(ValueError, match="model.pool\\(\\)"):
        model.pool()
    model.forward(RNG.standard_normal((2, 5, 4)).astype(np.float32))  # forward runs it all the same


def test_attention_over_time_is_refused():
    nodes = [REC, Node("Transpose", ["out"], ["outT"], {"perm": [0, 2, 1]}, "t"),
             Node("MatMul", ["out", "outT"], ["y"], {}, "scores")]
    with pytest.raises(ValueError, match="'scores' \\(MatMul\\).* multiplies along the time axis"):
        _refused(nodes).session()


def test_bidirectional_and_initial_state_are_refused():
    bi = le.LSTM(w(2, 24, 4), w(2, 24, 6))
    with pytest.raises(ValueError, match="is bidirectional"):
        _refused([REC], layers=[bi]).session()
    g = Graph([ValueInfo("x", "float", ["batch", "steps", 4]), ValueInfo("h0", "float", [1, "batch", 6])], ["y"],
              [Node("Recurrent", ["x", "", "h0"], ["y", "h", "c"], {"layer": 0}, "lstm")], {}, [lstm(4, 6)])
    with pytest.raises(ValueError, match="starts from a given initial state"):
        le.Model(g).session()


def test_a_zero_initial_state_built_in_the_graph_streams():
    """h0 = zeros expanded to the batch (what `torch.zeros(1, x.size(0), H)` in a forward becomes)."""
    nodes = [Node("Shape", ["x"], ["xs"], {"start": 0, "end": 1}, "batch_size"),
             Node("Expand", ["zero"], ["h0"], {"shape": [1, 2, 6]}, "zeros"),
             Node("Recurrent", ["x", "", "h0", "h0"], ["y", "h", "c"], {"layer": 0}, "lstm")]
    g = Graph([ValueInfo("x", "float", ["batch", "steps", 4])], ["y"], nodes,
              {"zero": np.zeros((1, 1, 1), np.float32)}, [lstm(4, 6)])
    model = le.Model(g)
    x = RNG.standard_normal((2, 5, 4)).astype(np.float32)
    s = model.session(2)
    np.testing.assert_allclose(np.stack([s.step(x[:, t]) for t in range(5)], 1), model.forward(x)[0], **F32)
    g.constants["zero"] = np.ones((1, 1, 1), np.float32)
    with pytest.raises(ValueError, match="starts from a given initial state"):
        le.Model(g).session(2)


def test_the_time_axis_of_an_unnamed_input_is_proved_from_the_graph():
    """An ONNX file names its dims itself ("seq", "N"): the axis that reaches the recurrent layer's steps is time."""
    g = time_major_graph()
    g.inputs[0] = ValueInfo("x", "float", ["seq", "N", 3])
    model = le.Model(g)
    x = RNG.standard_normal((6, 2, 3)).astype(np.float32)
    s = model.session(2)
    got = np.stack([s.step(x[t]) for t in range(6)])
    np.testing.assert_allclose(got, model.forward(x)[0], **F32)
    bi = le.LSTM(w(2, 24, 4), w(2, 24, 6))
    g = Graph([ValueInfo("x", "float", ["N", "seq", 4])], ["out"], [REC], {}, [bi])
    with pytest.raises(ValueError, match="is bidirectional"):
        le.Model(g).session()


def test_input_without_a_time_axis_is_refused():
    g = Graph([ValueInfo("x", "float", ["batch", 4])], ["y"], [Node("Relu", ["x"], ["y"], {}, "r")])
    with pytest.raises(ValueError, match="no axis named 'steps'"):
        le.Model(g).session()


def test_graph_session_checks_its_inputs():
    s = le.Model(residual_graph()).session(2)
    with pytest.raises(ValueError, match=r"x: expected shape \(2, 4\)"):
        s.step(np.ones((3, 4), np.float32))
    with pytest.raises(TypeError, match="float64"):
        s.step(np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"x: expected shape \(2, 4\), got \(2, 2, 4\)"):
        s.step((np.ones((2, 4), np.float32), np.ones((2, 4), np.float32)))
    with pytest.raises(ValueError, match="several outputs"):
        s.step(np.ones((2, 4), np.float32), out=np.empty((2, 3), np.float32))


def test_graph_pool_steps_equal_forward():
    model = le.Model(embedding_graph())
    ids = RNG.integers(0, 10, (3, 6))
    want = model.forward(ids)[0]
    with model.pool(4) as pool:
        streams = [pool.open() for _ in range(3)]
        got = np.stack([np.stack([st.step(int(ids[b, t])) for t in range(6)]) for b, st in enumerate(streams)])
        with pytest.raises(ValueError, match="out of range"):
            streams[0].step(10)
    np.testing.assert_allclose(got, want, **F32)


def test_graph_save_state_is_tied_to_the_graph():
    a = le.Model(residual_graph())
    s = a.session(1)
    s.step(np.ones((1, 4), np.float32))
    blob = s.save_state()
    again = a.session(1)
    again.load_state(blob)
    np.testing.assert_array_equal(again.state[1][0], s.state[1][0])
    # Same layers, another graph around them: the state is refused.
    g = residual_graph()
    g.layers = a.graph.layers
    g.nodes[2] = Node("Sub", ["a", "b"], ["s"], {}, "residual")
    with pytest.raises(ValueError, match="different model"):
        le.Model(g).session(1).load_state(blob)
    # Same graph, other constants.
    g2 = residual_graph()
    g2.layers, g2.nodes = a.graph.layers, a.graph.nodes
    with pytest.raises(ValueError, match="different weights"):
        le.Model(g2).session(1).load_state(blob)
