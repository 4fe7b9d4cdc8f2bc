"""Plans specialised per input signature (lstm_engine.specialise): the same results as the general plan, bit for bit,
and a new program whenever anything a program assumed (a shape, a dtype, a keyed value) changes."""
import numpy as np
import pytest

import lstm_engine as le
from lstm_engine import specialise
from lstm_engine.graph import Graph, Node, ValueInfo
from lstm_engine.plan import Call, Plan

RNG = np.random.default_rng(11)


def general(model: le.Model) -> Plan:
    """The model's graph compiled without specialisation: what every specialised run must equal."""
    return Plan(model.graph, model.dtype, specialise=False)


def run_both(model: le.Model, feeds: dict, states: int = 0) -> tuple[list, list]:
    """The outputs of model.run(feeds) (specialised once the signature repeats) and of the general plan."""
    inputs = [feeds.get(v.name) for v in model.graph.inputs]
    want = general(model).run(inputs, Call([None] * states))
    got = model.run(feeds)
    return [got[name] for name in model.graph.outputs], want


def programs(model: le.Model) -> int:
    return len(model.plan(model.dtype).specialiser.compiled)


def squeeze_if_one_graph() -> Graph:
    """torch.onnx's ``x.squeeze(-1)``: Shape -> Gather -> Equal -> If, a shape-dependent branch; then a
    Conv + Relu encoder, a magnitude and a mean, as silero-vad has them."""
    squeeze = Graph([], ["s"], [Node("Squeeze", ["h"], ["s"], {"axes": [-1]}, "squeeze")])
    keep = Graph([], ["k"], [Node("Identity", ["h"], ["k"], {}, "keep")])
    nodes = [
        Node("Pad", ["x"], ["xp"], {"pads": [0, 2, 0, 2], "mode": "reflect"}, "pad"),
        Node("Unsqueeze", ["xp"], ["x3"], {"axes": [1]}, "unsqueeze"),
        Node("Conv", ["x3", "w_stft"], ["spec"], {"strides": [4]}, "stft"),
        Node("Slice", ["spec"], ["re"], {"starts": [0], "ends": [3], "axes": [1]}, "re"),
        Node("Slice", ["spec"], ["im"], {"starts": [3], "ends": [9223372036854775807], "axes": [1]}, "im"),
        Node("Pow", ["re", "two"], ["re2"], {}, "re2"),
        Node("Pow", ["im", "two"], ["im2"], {}, "im2"),
        Node("Add", ["re2", "im2"], ["mag2"], {}, "add"),
        Node("Sqrt", ["mag2"], ["mag"], {}, "sqrt"),
        Node("Conv", ["mag", "w1", "b1"], ["c1"], {"pads": [1, 1]}, "conv1"),
        Node("Relu", ["c1"], ["r1"], {}, "relu1"),
        Node("Conv", ["r1", "w2", "b2"], ["h"], {"pads": [1, 1], "strides": [2]}, "conv2"),
        Node("Shape", ["h"], ["shape"], {}, "shape"),
        Node("Gather", ["shape", "minus_one"], ["last"], {"axis": 0}, "last"),
        Node("Equal", ["last", "one"], ["is_one"], {}, "is_one"),
        Node("If", ["is_one"], ["hs"], {"then_branch": squeeze, "else_branch": keep}, "if"),
        Node("ReduceMean", ["hs"], ["y"], {"axes": [-1], "keepdims": 0}, "mean"),
    ]
    consts = {"w_stft": RNG.standard_normal((6, 1, 4)).astype(np.float32), "two": np.array(2.0, np.float32),
              "w1": RNG.standard_normal((5, 3, 3)).astype(np.float32), "b1": RNG.standard_normal(5).astype(np.float32),
              "w2": RNG.standard_normal((4, 5, 3)).astype(np.float32), "b2": RNG.standard_normal(4).astype(np.float32),
              "minus_one": np.array(-1, np.int64), "one": np.array(1, np.int64)}
    return Graph([ValueInfo("x", "float", [None, None])], ["y", "c1"], nodes, consts)


def test_shape_dependent_if_and_conv_chain_equal_the_general_plan_bit_for_bit():
    model = le.Model(squeeze_if_one_graph())
    # Lengths whose last conv gives 1 step (the squeeze branch) and more (the identity branch), alternated so that
    # each signature is compiled and then met again after another one ran.
    for n in [4, 4, 4, 12, 12, 4, 12, 4, 30, 30, 30]:
        x = RNG.standard_normal((2, n)).astype(np.float32)
        got, want = run_both(model, {"x": x})
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype
            np.testing.assert_array_equal(g, w)
    assert programs(model) == 3
    y = model.run({"x": np.ones((2, 4), np.float32)})["y"]
    assert y.shape == (2,)  # (2, 4, 1) squeezed, then the mean over the 4 channels
    assert model.run({"x": np.ones((2, 12), np.float32)})["y"].shape == (2, 4)


def test_conv_output_read_twice_is_not_overwritten_by_its_relu():
    """c1 is both a graph output and the Relu's input: the Relu may not run in place on it."""
    model = le.Model(squeeze_if_one_graph())
    x = RNG.standard_normal((1, 12)).astype(np.float32)
    for _ in range(3):
        out = model.run({"x": x})
    assert (out["c1"] < 0).any()
    np.testing.assert_array_equal(out["c1"], general(model).run([x], Call([]))[1])


def test_an_if_on_a_small_integer_input_is_keyed_on_its_value():
    """As silero-vad's sample rate: an If on sr == 16000; sr changes between calls and back."""
    then_g = Graph([], ["a"], [Node("Mul", ["x", "two"], ["a"], {}, "double")], {"two": np.array(2.0, np.float32)})
    else_g = Graph([], ["b"], [Node("Neg", ["x"], ["b"], {}, "negate")])
    g = Graph([ValueInfo("x", "float", ["batch", 3]), ValueInfo("sr", "int64", [])], ["y"], [
        Node("Equal", ["sr", "rate"], ["is_16k"], {}, "equal"),
        Node("If", ["is_16k"], ["y"], {"then_branch": then_g, "else_branch": else_g}, "if"),
    ], {"rate": np.array(16000, np.int64)})
    model = le.Model(g)
    assert model.plan(model.dtype).specialiser.keyed == [1]
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    for rate in [16000, 16000, 16000, 8000, 8000, 8000, 16000, 8000, 16000]:
        y = model.run({"x": x, "sr": np.array(rate)})["y"]
        np.testing.assert_array_equal(y, 2 * x if rate == 16000 else -x)
    assert programs(model) == 2


def test_an_if_on_data_stays_an_if():
    """A condition computed from float data is not part of any signature: the If runs at every call."""
    then_g = Graph([], ["a"], [Node("Mul", ["x", "two"], ["a"], {}, "double")], {"two": np.array(2.0, np.float32)})
    else_g = Graph([], ["b"], [Node("Neg", ["xi"], ["b"], {}, "negate")])
    g = Graph([ValueInfo("x", "float", [1])], ["y"], [
        Node("Identity", ["x"], ["xi"], {}, "renamed"),  # renamed away outside, read by name inside the branch
        Node("Greater", ["x", "zero"], ["positive"], {}, "greater"),
        Node("If", ["positive"], ["y"], {"then_branch": then_g, "else_branch": else_g}, "if"),
    ], {"zero": np.array(0.0, np.float32)})
    model = le.Model(g)
    assert model.plan(model.dtype).specialiser.keyed == []
    for v in [1.0, 1.0, -3.0, 2.0, -1.0, -1.0]:
        np.testing.assert_array_equal(model.run({"x": np.array([v], np.float32)})["y"], [2 * v if v > 0 else -v])
    assert programs(model) == 1


def test_errors_that_depend_on_values_are_still_raised_by_the_program():
    g = Graph([ValueInfo("x", "float", [None, 3]), ValueInfo("i", "int64", [None])], ["y"], [
        Node("Gather", ["x", "i"], ["y"], {"axis": 1}, "pick"),
    ])
    model = le.Model(g)
    x = np.ones((2, 3), np.float32)
    for _ in range(3):
        model.run({"x": x, "i": np.array([0, 2])})
    with pytest.raises(ValueError, match=r"node 'pick' \(Gather\).*index 3 is out of range"):
        model.run({"x": x, "i": np.array([0, 3])})
    np.testing.assert_array_equal(model.run({"x": x, "i": np.array([1, 1])})["y"], np.ones((2, 2)))


def test_folded_outputs_are_the_callers_own():
    g = Graph([ValueInfo("x", "float", [None, None])], ["s"], [Node("Shape", ["x"], ["s"], {}, "shape")])
    model = le.Model(g)
    x = np.ones((2, 5), np.float32)
    for _ in range(3):
        s = model.run({"x": x})["s"]
        np.testing.assert_array_equal(s, [2, 5])
        s[0] = 99
    assert programs(model) == 1


def test_a_new_dtype_is_a_new_signature():
    g = Graph([ValueInfo("x", "float", [None]), ValueInfo("k", "int64", [None])], ["y"], [
        Node("Cast", ["k"], ["kf"], {"to": "float"}, "cast"),
        Node("Add", ["x", "kf"], ["y"], {}, "add"),
    ])
    model = le.Model(g)
    x = np.arange(3, dtype=np.float32)
    for k in [np.arange(3), np.arange(3), np.arange(3, dtype=np.int32), np.arange(3, dtype=np.int32)]:
        y = model.run({"x": x, "k": k})["y"]
        assert y.dtype == np.float32
        np.testing.assert_array_equal(y, 2 * x)
    assert programs(model) == 2


def test_sessions_and_recording_run_the_specialised_program():
    """A graph with a Recurrent node among shape ops: streamed step by step, forward with record=True."""
    lstm = le.LSTM(RNG.standard_normal((16, 3)), RNG.standard_normal((16, 4)), RNG.standard_normal(16),
                   RNG.standard_normal(16))
    g = Graph([ValueInfo("x", "float", ["batch", "steps", 3])], ["y"], [
        Node("Unsqueeze", ["x"], ["x4"], {"axes": [1]}, "unsqueeze"),
        Node("Squeeze", ["x4"], ["x3"], {"axes": [1]}, "squeeze"),
        Node("Recurrent", ["x3", "", "", ""], ["h", "hn", "cn"], {"layer": 0}, "lstm"),
        Node("Relu", ["h"], ["r"], {}, "relu"),
        Node("Identity", ["r"], ["y"], {}, "out"),
    ], {}, [lstm])
    model = le.Model(g)
    x = RNG.standard_normal((2, 6, 3)).astype(np.float32)
    want, _ = le.Model([lstm]).forward(x)
    want = np.maximum(want, 0)
    session = model.session(2)
    steps = [session.step(x[:, t]) for t in range(6)]
    np.testing.assert_allclose(np.stack(steps, axis=1), want, atol=1e-6)
    for _ in range(3):
        y, _ = model.forward(x)
        np.testing.assert_allclose(y, want, atol=1e-6)
    y, _, gates = model.forward(x, record=True)
    np.testing.assert_allclose(y, want, atol=1e-5)
    assert gates[0]["h"].shape == (1, 2, 6, 4)
    assert programs(model) >= 2


def test_chains_have_no_specialiser():
    model = le.Model([le.GRU(RNG.standard_normal((6, 2)), RNG.standard_normal((6, 2)))])
    assert model.plan(model.dtype).specialiser is None


def test_signatures_beyond_the_cache_start_over(monkeypatch):
    monkeypatch.setattr(specialise, "MAX_COMPILED", 2)
    g = Graph([ValueInfo("x", "float", [None])], ["y"], [Node("Relu", ["x"], ["y"], {}, "relu")])
    model = le.Model(g)
    for n in [1, 1, 2, 2, 3, 3, 1, 1]:
        x = np.linspace(-1, 1, n, dtype=np.float32)
        np.testing.assert_array_equal(model.run({"x": x})["y"], np.maximum(x, 0))
    assert programs(model) <= 2


def test_feeds_are_still_checked_after_a_signature_passed():
    model = le.Model(squeeze_if_one_graph())
    x = np.ones((1, 12), np.float32)
    for _ in range(3):
        model.run({"x": x})
    with pytest.raises(TypeError, match="x: dtype float16"):
        model.run({"x": x.astype(np.float16)})
    with pytest.raises(ValueError, match=r"x: expected shape \('\?', '\?'\), got \(1, 1, 12\)"):
        model.run({"x": x[None]})
    for _ in range(2):  # converted to float32, so checked in full each time
        y = model.run({"x": x.astype(np.float16)}, cast=True)["y"]
        np.testing.assert_array_equal(y, model.run({"x": x})["y"])


def test_a_feed_signature_that_passed_is_not_checked_again(monkeypatch):
    model = le.Model(squeeze_if_one_graph())
    x = np.ones((1, 12), np.float32)
    model.run({"x": x})
    checks = []
    full = model._check_feeds_once
    monkeypatch.setattr(model, "_check_feeds_once", lambda *a: checks.append(1) or full(*a))
    model.run({"x": x})
    model.run({"x": x.copy()})
    assert checks == []
    model.run({"x": x[:, ::2]})  # not C-contiguous: checked (and made contiguous) every time
    model.run({"x": x}, cast=True)  # another key
    assert checks == [1, 1]


def test_sigmoid_step_equals_the_op():
    dtype = np.float32
    g = Graph([ValueInfo("x", "float", [None])], ["y"], [Node("Sigmoid", ["x"], ["y"], {}, "sigmoid")])
    model = le.Model(g)
    x = np.array([-100.0, -3.5, 0.0, 0.25, 7.0, 100.0], dtype)
    for _ in range(3):
        got, want = run_both(model, {"x": x})
        assert got[0].dtype == dtype
        np.testing.assert_array_equal(got[0], want[0])
    assert programs(model) == 1


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin"])
def test_reductions_over_axes_of_one_element(op):
    g = Graph([ValueInfo("x", "float", [None, None, None])], ["y"], [
        Node(op, ["x"], ["y"], {"axes": [1, -1], "keepdims": 0}, "reduce")])
    model = le.Model(g)
    for shape in [(2, 1, 1), (2, 1, 1), (2, 1, 1), (2, 3, 1), (2, 3, 1), (2, 3, 1)]:
        x = RNG.standard_normal(shape).astype(np.float32)
        got, want = run_both(model, {"x": x})
        assert got[0].shape == want[0].shape == (2,)
        np.testing.assert_array_equal(got[0], want[0])


def test_conv_relu_fused_by_the_kernel_equals_the_two_nodes():
    g = Graph([ValueInfo("x", "float", [None, 3, None])], ["y"], [
        Node("Conv", ["x", "w", "b"], ["c"], {"pads": [1, 1]}, "conv"),
        Node("Relu", ["c"], ["y"], {}, "relu"),
    ], {"w": RNG.standard_normal((70, 3, 3)).astype(np.float32), "b": RNG.standard_normal(70).astype(np.float32)})
    model = le.Model(g)
    for n in [5, 5, 5, 9]:
        x = RNG.standard_normal((2, 3, n)).astype(np.float32)
        got, want = run_both(model, {"x": x})
        np.testing.assert_array_equal(got[0], want[0])
        assert (got[0] == 0).any() and (got[0] > 0).any()
    steps = list(model.plan(model.dtype).specialiser.compiled.values())[0].steps
    assert len(steps) == 1  # Conv and Relu as one kernel call


def step_names(model: le.Model) -> list[str]:
    """What each step of the model's (only) specialised program was made by."""
    steps = list(model.plan(model.dtype).specialiser.compiled.values())[0].steps
    return [s.__qualname__.split(".")[0] for s in steps]


def test_a_reflect_pad_only_a_conv_reads_is_folded_into_its_gather():
    """silero-vad's STFT input: Pad (reflect, last axis) -> Unsqueeze -> Conv runs as one kernel call, equal bit
    for bit to the general plan's padded copy; a Pad that something else reads too stays a step."""
    model = le.Model(squeeze_if_one_graph())
    for _ in range(3):
        x = RNG.standard_normal((2, 12)).astype(np.float32)
        got, want = run_both(model, {"x": x})
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
    names = step_names(model)
    assert "_Pad" not in names and names[0] == "_Conv"
    # The magnitude of the STFT's halves (Pow, Pow, Add, Sqrt and the halves' views) is one step too.
    assert names[1] == "_Magnitude" and "_pow_step" not in names

    g = squeeze_if_one_graph()
    g.outputs.append("xp")
    g.output_structure = (0, 1, 2)
    model = le.Model(g)
    for _ in range(3):
        x = RNG.standard_normal((2, 12)).astype(np.float32)
        got, want = run_both(model, {"x": x})
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
    assert step_names(model)[0] == "_Pad"


def silero_like_lstm_graph() -> tuple[Graph, le.LSTM]:
    """An ONNX LSTM as silero-vad has it: x made by views of a Conv output, h0 and c0 the halves of one
    ``state`` input (2, B, H), the new state their concatenation."""
    H = 5
    lstm = le.LSTM(RNG.standard_normal((4 * H, 3)), RNG.standard_normal((4 * H, H)), RNG.standard_normal(4 * H),
                   RNG.standard_normal(4 * H))
    g = Graph([ValueInfo("x", "float", [None, 3, 1]), ValueInfo("state", "float", [2, None, H])], ["y", "stateN"], [
        Node("Squeeze", ["x"], ["x2"], {"axes": [2]}, "squeeze"),
        Node("Unsqueeze", ["x2"], ["x3"], {"axes": [1]}, "unsqueeze"),
        Node("Gather", ["state", "zero"], ["h0g"], {"axis": 0}, "h0"),
        Node("Gather", ["state", "one"], ["c0g"], {"axis": 0}, "c0"),
        Node("Unsqueeze", ["h0g"], ["h0"], {"axes": [0]}, "h0u"),
        Node("Unsqueeze", ["c0g"], ["c0"], {"axes": [0]}, "c0u"),
        Node("Recurrent", ["x3", "", "h0", "c0"], ["h", "hn", "cn"], {"layer": 0}, "lstm"),
        Node("Concat", ["hn", "cn"], ["stateN"], {"axis": 0}, "state_out"),
        Node("Relu", ["h"], ["y"], {}, "relu"),
    ], {"zero": np.array(0, np.int64), "one": np.array(1, np.int64)}, [lstm])
    return g, lstm


def test_recurrent_step_applies_the_views_of_its_inputs_and_carries_the_state():
    """The recurrent node's x, h0 and c0 views run inside its step (no steps of their own); streamed chunk by
    chunk with the state carried, every output equals the general plan's bit for bit, and the caller's state
    array is never written."""
    g, lstm = silero_like_lstm_graph()
    model = le.Model(g)
    state = np.zeros((2, 2, 5), np.float32)
    for t in range(6):
        x = RNG.standard_normal((2, 3, 1)).astype(np.float32)
        given = state.copy()
        got, want = run_both(model, {"x": x, "state": state}, states=1)
        for a, b in zip(got, want):
            assert a.shape == b.shape
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(state, given)
        state = got[1]
    names = step_names(model)
    assert names.count("_View") == 0 and "_Recurrent" in names
    # The same program from a recording forward and from a frame-keeping caller: the general step, given the views.
    x = RNG.standard_normal((2, 3, 1)).astype(np.float32)
    y, _, gates = model.forward((x, state), record=True)
    np.testing.assert_allclose(y[0], model.run({"x": x, "state": state})["y"], atol=1e-6)
    assert gates[0]["h"].shape == (1, 2, 1, 5)


def test_magnitude_kernel_equals_numpys_four_calls_bit_for_bit():
    """_kernels.magnitude against np.sqrt(np.power(a, 2) + np.power(b, 2)), what the general plan computes:
    ordinary, tiny (subnormal squares), huge (overflow to inf), zero, negative, NaN and inf values."""
    from lstm_engine import _kernels

    rng = np.random.default_rng(5)
    scale = rng.choice(np.array([1e-30, 1e-20, 1e-3, 1.0, 1e3, 1e19, 1e30], np.float32), (2, 4000))
    a, b = (rng.standard_normal((2, 4000)).astype(np.float32) * scale).reshape(2, 2, 2, 1000)
    a[0, 0, :6] = [0.0, -0.0, np.nan, np.inf, -np.inf, 3.0]
    b[0, 0, :6] = [0.0, 2.0, 1.0, 1.0, np.nan, -4.0]
    two = np.array(2.0, np.float32)
    with np.errstate(all="ignore"):
        want = np.sqrt(np.add(np.power(a, two), np.power(b, two)))
    got = _kernels.magnitude(a, b)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))
    for n in range(1, 9):  # the kernel's scalar tail after its 4-wide loop
        head = _kernels.magnitude(a[0, 0, :n], b[0, 0, :n])
        np.testing.assert_array_equal(head.view(np.int32), want[0, 0, :n].view(np.int32))
    with pytest.raises(ValueError, match="one shape"):
        _kernels.magnitude(a, b[:, :, :10])
