"""Graphs built by hand: validation, the runner (forward and run(feeds)), Recurrent nodes against torch."""
import numpy as np
import pytest
import torch

import lstm_engine as le
from lstm_engine.graph import Graph, Node, ValueInfo

torch.manual_seed(0)
RNG = np.random.default_rng(3)


def layer_from(module, k=0):
    """The engine layer for layer k of a torch nn.LSTM/GRU/RNN (batch_first or not)."""
    sd = {name[: -len(f"_l{k}")] if name.endswith(f"_l{k}") else name.replace(f"_l{k}_reverse", "_reverse"): p
          for name, p in module.state_dict().items() if f"_l{k}" in name}
    dirs = [""] + (["_reverse"] if module.bidirectional else [])
    args = {n: np.stack([sd[n + d].numpy() for d in dirs]) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
            if n in sd}
    if "weight_hr" in sd:
        args["weight_hr"] = np.stack([sd["weight_hr" + d].numpy() for d in dirs])
    cls = {torch.nn.LSTM: le.LSTM, torch.nn.GRU: le.GRU, torch.nn.RNN: le.RNN}[type(module)]
    if cls is le.RNN:
        args["nonlinearity"] = module.nonlinearity
    return cls(**args)


def lstm_head_graph(lstm, linear):
    """out, _ = lstm(x); return relu(linear(out[:, -1]))"""
    layer = layer_from(lstm)
    nodes = [
        Node("Recurrent", ["x", "", "", ""], ["out", "h_n", "c_n"], {"layer": 0}, "lstm", "model.lstm (m.py:3)"),
        Node("Gather", ["out", "last"], ["last_out"], {"axis": 1}, "getitem"),
        Node("Gemm", ["last_out", "fc.weight", "fc.bias"], ["fc"], {"transB": 1}, "fc"),
        Node("Relu", ["fc"], ["y"], {}, "relu"),
    ]
    consts = {"last": np.array(-1, np.int64), "fc.weight": linear.weight.detach().numpy(),
              "fc.bias": linear.bias.detach().numpy()}
    return Graph([ValueInfo("x", "float", ["batch", "steps", lstm.input_size])], ["y"], nodes, consts, [layer])


def test_classifier_on_the_last_step_matches_torch():
    lstm, linear = torch.nn.LSTM(5, 8, batch_first=True), torch.nn.Linear(8, 3)
    model = le.Model(lstm_head_graph(lstm, linear))
    x = RNG.standard_normal((4, 7, 5)).astype(np.float32)
    y, state = model.forward(x)
    with torch.no_grad():
        out, (h, c) = lstm(torch.from_numpy(x))
        want = torch.relu(linear(out[:, -1])).numpy()
    np.testing.assert_allclose(y, want, atol=1e-5)
    np.testing.assert_allclose(state[0][0], h.numpy(), atol=1e-5)
    np.testing.assert_allclose(state[0][1], c.numpy(), atol=1e-5)
    assert model.run({"x": x})["y"].shape == (4, 3)
    np.testing.assert_allclose(model.run({"x": x})["y"], want, atol=1e-5)


def test_bidirectional_gru_final_states_concatenated_time_major():
    """x (T, B, I) time-major; h = cat(h_n[0], h_n[1]); y = (out, h) as a tuple."""
    gru = torch.nn.GRU(4, 6, bidirectional=True)
    nodes = [
        Node("Transpose", ["x"], ["xb"], {"perm": [1, 0, 2]}, "to_batch_major"),
        Node("Recurrent", ["xb"], ["outb", "h_n"], {"layer": 0}, "gru"),
        Node("Transpose", ["outb"], ["out"], {"perm": [1, 0, 2]}, "to_time_major"),
        Node("Split", ["h_n"], ["h0", "h1"], {"axis": 0}, "split"),
        Node("Concat", ["h0", "h1"], ["hcat3"], {"axis": 2}, "cat"),
        Node("Squeeze", ["hcat3"], ["hcat"], {"axes": [0]}, "squeeze"),
    ]
    g = Graph([ValueInfo("x", "float", ["steps", "batch", 4])], ["out", "hcat"], nodes, {}, [layer_from(gru)])
    model = le.Model(g)
    x = RNG.standard_normal((6, 3, 4)).astype(np.float32)
    (out, hcat), state = model.forward(x)
    with torch.no_grad():
        t_out, t_h = gru(torch.from_numpy(x))
    np.testing.assert_allclose(out, t_out.numpy(), atol=1e-5)
    np.testing.assert_allclose(hcat, torch.cat([t_h[0], t_h[1]], -1).numpy(), atol=1e-5)
    assert len(state) == 1 and state[0][0].shape == (2, 3, 6)


def test_lengths_input_and_initial_state_inputs():
    """A graph input feeds the packed lengths and the initial state (ONNX sequence_lens / initial_h)."""
    lstm = torch.nn.LSTM(3, 5, batch_first=True)
    g = Graph([ValueInfo("x", "float", ["batch", "steps", 3]), ValueInfo("lens", "int64", ["batch"]),
               ValueInfo("h0", "float", [1, "batch", 5]), ValueInfo("c0", "float", [1, "batch", 5])],
              ["y", "h"], [Node("Recurrent", ["x", "lens", "h0", "c0"], ["y", "h", "c"], {"layer": 0}, "lstm")],
              {}, [layer_from(lstm)])
    model = le.Model(g)
    x = RNG.standard_normal((3, 6, 3)).astype(np.float32)
    lens = np.array([6, 2, 4])
    h0, c0 = (RNG.standard_normal((1, 3, 5)).astype(np.float32) for _ in range(2))
    got = model.run({"x": x, "lens": lens, "h0": h0, "c0": c0})
    with torch.no_grad():
        packed = torch.nn.utils.rnn.pack_padded_sequence(torch.from_numpy(x), torch.from_numpy(lens),
                                                         batch_first=True, enforce_sorted=False)
        out, (h, _) = lstm(packed, (torch.from_numpy(h0), torch.from_numpy(c0)))
        out = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=6)[0]
    np.testing.assert_allclose(got["y"], out.numpy(), atol=1e-5)
    np.testing.assert_allclose(got["h"], h.numpy(), atol=1e-5)
    # The inputs given in order as a tuple are the same run.
    (y, h_out), _ = model.forward((x, lens, h0, c0))
    np.testing.assert_array_equal(y, got["y"])


def test_zero_length_rows_give_zero_outputs_and_states():
    rnn = le.RNN(RNG.standard_normal((4, 2)), RNG.standard_normal((4, 4)))
    g = Graph([ValueInfo("x", "float", ["batch", "steps", 2]), ValueInfo("lens", "int64", ["batch"]),
               ValueInfo("h0", "float", [1, "batch", 4])],
              ["y", "h"], [Node("Recurrent", ["x", "lens", "h0"], ["y", "h"], {"layer": 0}, "rnn")], {}, [rnn])
    x = np.ones((2, 3, 2), np.float32)
    got = le.Model(g).run({"x": x, "lens": np.array([3, 0]), "h0": np.ones((1, 2, 4), np.float32)})
    assert np.all(got["y"][1] == 0) and np.all(got["h"][:, 1] == 0)
    assert np.all(got["h"][:, 0] != 0)


def test_if_runs_the_branch_its_condition_picks():
    then_g = Graph([], ["a"], [Node("Mul", ["x", "two"], ["a"], {}, "double")], {"two": np.array(2.0, np.float32)})
    else_g = Graph([], ["b"], [Node("Neg", ["x"], ["b"], {}, "negate")])
    g = Graph([ValueInfo("x", "float", ["batch", 3]), ValueInfo("flag", "bool", [])], ["y"],
              [Node("If", ["flag"], ["y"], {"then_branch": then_g, "else_branch": else_g}, "if")])
    model = le.Model(g)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(model.run({"x": x, "flag": np.array(True)})["y"], 2 * x)
    np.testing.assert_array_equal(model.run({"x": x, "flag": np.array(False)})["y"], -x)


def test_recurrent_nodes_inside_if_branches_have_their_own_state():
    rng = np.random.default_rng(8)
    outer = le.GRU(rng.standard_normal((6, 2)), rng.standard_normal((6, 2)))
    inner = le.RNN(rng.standard_normal((3, 2)), rng.standard_normal((3, 3)))
    then_g = Graph([], ["z"], [Node("Recurrent", ["y"], ["z", "hz"], {"layer": 0}, "inner")], layers=[inner])
    else_g = Graph([], ["z"], [Node("Identity", ["y"], ["z"], {}, "same")])
    g = Graph([ValueInfo("x", "float", ["batch", "steps", 2]), ValueInfo("flag", "bool", [])], ["z"],
              [Node("Recurrent", ["x"], ["y", "hy"], {"layer": 0}, "outer"),
               Node("If", ["flag"], ["z"], {"then_branch": then_g, "else_branch": else_g}, "if")], layers=[outer])
    model = le.Model(g)
    assert model.recurrent_layers == [outer, inner]
    x = rng.standard_normal((2, 4, 2)).astype(np.float32)
    z, state = model.forward((x, np.array(True)))
    want, _ = le.Model([outer, inner]).forward(x)
    np.testing.assert_allclose(z, want, atol=1e-6)
    assert state[0][0].shape == (1, 2, 2) and state[1][0].shape == (1, 2, 3)
    z, state = model.forward((x, np.array(False)))
    assert state[1] is None  # the branch with the inner layer did not run


def test_constant_subgraphs_are_folded_once():
    g = Graph([ValueInfo("x", "float", ["batch", 4])], ["y"], [
        Node("Concat", ["wa", "wb"], ["w"], {"axis": 0}, "assemble"),
        Node("Transpose", ["w"], ["wt"], {"perm": [1, 0]}, "t"),
        Node("MatMul", ["x", "wt"], ["y"], {}, "mm"),
    ], {"wa": np.eye(2, 4, dtype=np.float32), "wb": np.eye(2, 4, k=2, dtype=np.float32)})
    model = le.Model(g)
    assert len(model.plan(model.dtype).steps) == 1
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(model.forward(x)[0], x)
    y64 = model.forward(x.astype(np.float64))[0]
    assert y64.dtype == np.float64


def test_output_structure_nests():
    g = Graph([ValueInfo("x", "float", ["batch", 2])], ["a", "b", "c"], [
        Node("Relu", ["x"], ["a"], {}, "r"), Node("Neg", ["x"], ["b"], {}, "n"), Node("Abs", ["x"], ["c"], {}, "abs")],
        output_structure=[0, (1, 2)])
    y, state = le.Model(g).forward(np.ones((1, 2), np.float32))
    assert isinstance(y, list) and isinstance(y[1], tuple) and state == []


def test_chain_models_are_graphs():
    lstm = le.LSTM(RNG.standard_normal((8, 3)), RNG.standard_normal((8, 2)))
    dense = le.Dense(RNG.standard_normal((4, 2)), activation="softmax")
    model = le.Model([lstm, dense])
    assert [n.op for n in model.graph.nodes] == ["Recurrent", "Layer"]
    x = RNG.standard_normal((2, 5, 3)).astype(np.float32)
    assert set(model.run({"x": x})) == {"layers.1"}
    np.testing.assert_array_equal(model.run({"x": x, "lengths": np.array([5, 2])})["layers.1"],
                                  model.forward(x, np.array([5, 2]))[0])


# -- validation --------------------------------------------------------------------------------------

def _graph(nodes, inputs=None, outputs=("y",), consts=None, layers=None):
    return Graph(inputs or [ValueInfo("x", "float", ["batch", 3])], list(outputs), nodes, consts or {}, layers or [])


@pytest.mark.parametrize("graph, message", [
    (_graph([Node("Relu", ["z"], ["y"], {}, "r")]), "reads 'z', which no input"),
    (_graph([Node("Relu", ["y"], ["y"], {}, "r")]), "reads 'y'"),
    (_graph([Node("Relu", ["x"], ["y"], {}, "r"), Node("Neg", ["x"], ["y"], {}, "n")]), "defined twice"),
    (_graph([Node("Relu", ["x"], ["a"], {}, "r"), Node("Neg", ["x"], ["y"], {}, "r")]), "unique name"),
    (_graph([Node("Softmax", ["x"], ["y"], {"axis": 1.5}, "s")]), "attribute 'axis': expected an int"),
    (_graph([Node("Transpose", ["x"], ["y"], {"perm": [0, 1], "x": 1}, "t")]), "'x' is not one Transpose takes"),
    (_graph([Node("Add", ["x"], ["y"], {}, "a")]), "takes 2 inputs"),
    (_graph([Node("Gemm", ["x", ""], ["y"], {}, "g")]), "input 1 is required"),
    (_graph([Node("Relu", ["x"], ["a"], {}, "r")]), "output 'y' is not defined"),
    (_graph([Node("Relu", ["x"], ["y"], {}, "r")], outputs=()), "no outputs"),
    (_graph([Node("Recurrent", ["x"], ["y", "h"], {"layer": 0}, "rec")]), "not an index"),
    (_graph([Node("Relu", ["x"], ["y"], {}, "r")], consts={"c": [1, 2]}), "numeric NumPy array"),
    (_graph([Node("Relu", ["x"], ["y"], {}, "r")], inputs=[ValueInfo("x", "float16", [2])]), "dtype 'float16'"),
    (_graph([Node("If", ["x"], ["y"], {"then_branch": 1, "else_branch": 2}, "if")]), "each a Graph"),
])
def test_validation_names_the_fault(graph, message):
    with pytest.raises(le.LoadError, match=message):
        le.Model(graph)


def test_recurrent_node_arity_is_checked():
    gru = le.GRU(np.ones((6, 3)), np.ones((6, 2)))
    g = _graph([Node("Recurrent", ["x"], ["y", "h", "c"], {"layer": 0}, "rec")], layers=[gru])
    with pytest.raises(le.LoadError, match=r"outputs \[y, h_n\]"):
        le.Model(g)


def test_unknown_op_is_refused_by_name_and_source():
    g = _graph([Node("NonMaxSuppression", ["x"], ["y"], {}, "nms", "ONNX node 'nms_3' (NonMaxSuppression)")])
    with pytest.raises(le.UnsupportedOpError) as info:
        le.Model(g)
    err = info.value
    assert err.op == "NonMaxSuppression" and err.source == "ONNX node 'nms_3' (NonMaxSuppression)"
    assert "MatMul" in err.supported and "Recurrent" in err.supported
    assert "ONNX node 'nms_3'" in str(err) and "supported ops:" in str(err)
    assert isinstance(err, le.LoadError)


def test_inputs_are_checked():
    model = le.Model(_graph([Node("Relu", ["x"], ["y"], {}, "r")]))
    with pytest.raises(ValueError, match=r"x: expected shape \('batch', 3\)"):
        model.forward(np.ones((2, 4), np.float32))
    with pytest.raises(TypeError, match="x: dtype int64"):
        model.forward(np.ones((2, 3), np.int64))
    with pytest.raises(ValueError, match="'z' is not an input"):
        model.run({"x": np.ones((2, 3), np.float32), "z": 1})
    with pytest.raises(ValueError, match="input 'x' is required"):
        model.run({})
    with pytest.raises(ValueError, match="without a lengths input"):
        model.forward(np.ones((2, 3), np.float32), lengths=[1, 1])


def test_initial_state_and_threads_on_a_graph():
    lstm = torch.nn.LSTM(3, 4, batch_first=True)
    g = Graph([ValueInfo("x", "float", ["batch", "steps", 3])], ["y"],
              [Node("Recurrent", ["x"], ["y", "h", "c"], {"layer": 0}, "lstm")], {}, [layer_from(lstm)])
    model = le.Model(g, threads=1)
    assert model.threads == 1 and model.recurrent_layers[0]._kernels[np.dtype(np.float32)].threads == 1
    x = RNG.standard_normal((2, 5, 3)).astype(np.float32)
    h0, c0 = (RNG.standard_normal((1, 2, 4)).astype(np.float32) for _ in range(2))
    y, state = model.forward(x, initial_state=[(h0, c0)])
    with torch.no_grad():
        want, (h, c) = lstm(torch.from_numpy(x), (torch.from_numpy(h0), torch.from_numpy(c0)))
    np.testing.assert_allclose(y, want.numpy(), atol=1e-5)
    np.testing.assert_allclose(state[0][1], c.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match=r"initial_state\[0\] h: expected shape \(1, 'batch', 4\)"):
        model.forward(x, initial_state=[(h0[:, :, :3], c0)])
    # A session continues from a state set on it, as forward does from initial_state.
    s = model.session(2)
    s.state = [(h0, c0)]
    np.testing.assert_allclose(s.feed(x), y, atol=1e-5)
