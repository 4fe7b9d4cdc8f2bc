"""The ONNX reader around the recurrent operators: If, folding, refusals, and hostile files."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import lstm_engine as le  # noqa: E402

RNG = np.random.default_rng(11)


def save(tmp_path, nodes, inputs, outputs, inits=(), opset=17, name="m.onnx"):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    path = tmp_path / name
    onnx.save(model, path)
    return path


def tensor(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def init(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def lstm_branch(prefix, H=4, I=3):
    """A graph (no inputs) running an LSTM over the outer value 'x' (T, B, I) and giving its Y_h."""
    W = init(f"{prefix}W", RNG.standard_normal((1, 4 * H, I)).astype(np.float32))
    R = init(f"{prefix}R", RNG.standard_normal((1, 4 * H, H)).astype(np.float32))
    node = helper.make_node("LSTM", ["x", f"{prefix}W", f"{prefix}R"], ["", f"{prefix}h"], hidden_size=H)
    return helper.make_graph([node], f"{prefix}branch", [], [tensor(f"{prefix}h", None)], [W, R])


def check_against_onnxruntime(path, feeds, **load):
    got = le.load(path, **load).run(feeds)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for o, want in zip(sess.get_outputs(), sess.run(None, feeds)):
        np.testing.assert_allclose(got[o.name], want, rtol=1e-5, atol=1e-6, err_msg=o.name)
    return got


# -- If ---------------------------------------------------------------------------------------------

def test_if_on_an_input_runs_the_branch_it_picks(tmp_path):
    """silero-vad's shape: the sample rate picks one of two LSTM models at run time."""
    node = helper.make_node("If", ["is_16k"], ["h"], then_branch=lstm_branch("a"), else_branch=lstm_branch("b"))
    path = save(tmp_path, [node], [tensor("x", [5, 2, 3]), tensor("is_16k", [], TensorProto.BOOL)],
                [tensor("h", None)])
    x = RNG.standard_normal((5, 2, 3)).astype(np.float32)
    a = check_against_onnxruntime(path, {"x": x, "is_16k": np.array(True)})["h"]
    b = check_against_onnxruntime(path, {"x": x, "is_16k": np.array(False)})["h"]
    assert not np.allclose(a, b)
    model = le.load(path)
    assert [n.op for n in model.graph.nodes] == ["If"]


def test_if_on_a_constant_is_folded_at_load(tmp_path):
    cond = helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", TensorProto.BOOL, [], [False]))
    node = helper.make_node("If", ["c"], ["h"], then_branch=lstm_branch("a"), else_branch=lstm_branch("b"))
    path = save(tmp_path, [cond, node], [tensor("x", [5, 2, 3])], [tensor("h", None)])
    check_against_onnxruntime(path, {"x": RNG.standard_normal((5, 2, 3)).astype(np.float32)})
    model = le.load(path)
    assert "If" not in [n.op for n in model.graph.nodes]
    assert len(model.graph.layers) == 1  # only the branch taken was read


def test_if_on_a_size_known_at_load_is_folded(tmp_path):
    """Exporters test sizes (h.size(0) == 2); a size fixed by the input's declared shape folds."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["t"], axis=0),
             helper.make_node("Equal", ["t", "five"], ["c"]),
             helper.make_node("If", ["c"], ["h"], then_branch=lstm_branch("a"), else_branch=lstm_branch("b"))]
    path = save(tmp_path, nodes, [tensor("x", [5, "batch", 3])], [tensor("h", None)],
                [init("zero", np.array(0, np.int64)), init("five", np.array(5, np.int64))])
    check_against_onnxruntime(path, {"x": RNG.standard_normal((5, 2, 3)).astype(np.float32)})
    assert "If" not in [n.op for n in le.load(path).graph.nodes]


def test_if_on_a_size_known_at_run_time(tmp_path):
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["t"], axis=0),
             helper.make_node("Equal", ["t", "five"], ["c"]),
             helper.make_node("If", ["c"], ["h"], then_branch=lstm_branch("a"), else_branch=lstm_branch("b"))]
    path = save(tmp_path, nodes, [tensor("x", ["steps", "batch", 3])], [tensor("h", None)],
                [init("zero", np.array(0, np.int64)), init("five", np.array(5, np.int64))])
    for T in (5, 4):
        check_against_onnxruntime(path, {"x": RNG.standard_normal((T, 2, 3)).astype(np.float32)})


# -- folding ----------------------------------------------------------------------------------------

def test_weights_assembled_from_initializers_fold_once(tmp_path):
    """Converters build W from Slice/Concat/Transpose of initializers: nothing of it is left to run."""
    H, I = 4, 3
    full = RNG.standard_normal((8 * H, I)).astype(np.float32)
    nodes = [helper.make_node("Slice", ["full", "s0", "s1"], ["half"]),
             helper.make_node("Unsqueeze", ["half", "ax0"], ["W"]),
             helper.make_node("Concat", ["half", "half"], ["twice"], axis=1),
             helper.make_node("Slice", ["twice", "r0", "r1", "ax1"], ["r"]),
             helper.make_node("Unsqueeze", ["r", "ax0"], ["R"]),
             helper.make_node("Cast", ["x"], ["x64"], to=TensorProto.DOUBLE),
             helper.make_node("Cast", ["x64"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("LSTM", ["xf", "W", "R"], ["Y"], hidden_size=H)]
    inits = [init("full", full), init("s0", np.array([0], np.int64)), init("s1", np.array([4 * H], np.int64)),
             init("ax0", np.array([0], np.int64)), init("ax1", np.array([1], np.int64)),
             init("r0", np.array([1], np.int64)), init("r1", np.array([1 + H], np.int64))]
    path = save(tmp_path, nodes, [tensor("x", [6, 2, I])], [tensor("Y", None)], inits)
    check_against_onnxruntime(path, {"x": RNG.standard_normal((6, 2, I)).astype(np.float32)})
    ops = [n.op for n in le.load(path).graph.nodes]
    assert "Slice" not in ops and "Concat" not in ops and "Unsqueeze" not in ops


def test_bidirectional_activations_must_be_given_for_both_directions(tmp_path):
    """The spec asks for n activations per direction; onnxruntime refuses n for two directions, and so do we."""
    H, I = 4, 3
    inits = [init("W", RNG.standard_normal((2, 3 * H, I)).astype(np.float32)),
             init("R", RNG.standard_normal((2, 3 * H, H)).astype(np.float32))]
    for names, ok in ((["HardSigmoid", "Softsign"], False), (["HardSigmoid", "Softsign", "Sigmoid", "Relu"], True)):
        node = helper.make_node("GRU", ["x", "W", "R"], ["Y", "Y_h"], hidden_size=H, direction="bidirectional",
                                activations=names, activation_alpha=[0.3], activation_beta=[0.4])
        path = save(tmp_path, [node], [tensor("x", [5, 2, I])], [tensor("Y", None), tensor("Y_h", None)], inits)
        if ok:
            check_against_onnxruntime(path, {"x": RNG.standard_normal((5, 2, I)).astype(np.float32)})
        else:
            with pytest.raises(le.LoadError, match="2 per direction, 4 in all"):
                le.load(path)


def test_load_picks_onnx_by_content(tmp_path):
    node = helper.make_node("Relu", ["x"], ["y"])
    path = save(tmp_path, [node], [tensor("x", [2])], [tensor("y", None)], name="model.bin")
    assert le.load(path).run({"x": np.array([-1.0, 2.0], np.float32)})["y"].tolist() == [0.0, 2.0]


# -- refusals ---------------------------------------------------------------------------------------

def test_unknown_op_names_node_op_and_what_is_supported(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="first"),
             helper.make_node("Hardmax", ["a"], ["y"], name="picker")]
    path = save(tmp_path, nodes, [tensor("x", [2, 3])], [tensor("y", None)])
    with pytest.raises(le.UnsupportedOpError) as err:
        le.load(path)
    assert err.value.op == "Hardmax"
    assert "'picker'" in err.value.source and str(path) in err.value.source
    assert "LSTM" in err.value.supported and "Gemm" in err.value.supported
    assert isinstance(err.value, le.LoadError)


def test_other_domains_are_refused(tmp_path):
    node = helper.make_node("FusedMatMul", ["x", "x"], ["y"], domain="com.microsoft", name="fused")
    graph = helper.make_graph([node], "g", [tensor("x", [2, 2])], [tensor("y", None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    with pytest.raises(le.UnsupportedOpError, match="com.microsoft::FusedMatMul"):
        le.load(path)


@pytest.mark.parametrize("make, match", [
    (lambda: ([helper.make_node("Dropout", ["x", "r", "t"], ["y"])], [init("r", np.array(0.5, np.float32)),
                                                                        init("t", np.array(True))]),
     "training mode"),
    (lambda: ([helper.make_node("Reshape", ["x", "x"], ["y"])], []), "computed when the model runs"),
    (lambda: ([helper.make_node("LSTM", ["x", "x", "x"], ["y"], hidden_size=2)], []),
     "input 'W' is computed when the model runs"),
    (lambda: ([helper.make_node("Relu", ["nowhere"], ["y"])], []), "no input, initializer or earlier node"),
    (lambda: ([helper.make_node("Pad", ["x", "p"], ["y"], mode="wrap")], [init("p", np.zeros(4, np.int64))]),
     "Pad mode 'wrap'"),
])
def test_what_is_not_run_is_refused_by_node(tmp_path, make, match):
    nodes, inits = make()
    path = save(tmp_path, nodes, [tensor("x", [2, 3])], [tensor("y", None)], inits)
    with pytest.raises(le.LoadError, match=match):
        le.load(path)


def test_recurrent_attributes_are_checked(tmp_path):
    H, I = 4, 3
    W = init("W", np.zeros((1, 4 * H, I), np.float32))
    R = init("R", np.zeros((1, 4 * H, H), np.float32))
    cases = [({"hidden_size": 5}, "hidden_size=5"), ({"direction": "sideways"}, "direction 'sideways'"),
             ({"activations": ["Sigmoid", "Tanh", "Swish"]}, "activation 'Swish'"),
             ({"activations": ["Sigmoid", "ScaledTanh", "Tanh"]}, "without activation_alpha"),
             ({"clip": -1.0}, "clip=-1.0"), ({"layout": 2}, "layout 2")]
    for attrs, match in cases:
        node = helper.make_node("LSTM", ["x", "W", "R"], ["Y"], **attrs)
        path = save(tmp_path, [node], [tensor("x", [5, 2, I])], [tensor("Y", None)], [W, R])
        with pytest.raises(le.LoadError, match=match):
            le.load(path)


# -- hostile files ----------------------------------------------------------------------------------

def test_malformed_bytes_are_a_load_error(tmp_path):
    good = save(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], [tensor("x", [2])], [tensor("y", None)])
    data = good.read_bytes()
    for i, bad in enumerate([data[: len(data) // 2], data[:7] + b"\xff" * 40, b"\x08\x07\x12" + bytes(range(256)),
                             b"\x08\x07\x3a\xff\xff\xff\xff\x0f"]):
        path = tmp_path / f"bad{i}.onnx"
        path.write_bytes(bad)
        with pytest.raises(le.LoadError):
            le.load(path)


def test_external_data_is_refused_and_never_read(tmp_path):
    t = onnx.TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[2])
    t.data_location = TensorProto.EXTERNAL
    entry = t.external_data.add()
    entry.key, entry.value = "location", "/etc/passwd"
    path = save(tmp_path, [helper.make_node("Add", ["x", "W"], ["y"])], [tensor("x", [2])], [tensor("y", None)], [t])
    with pytest.raises(le.LoadError, match="external file"):
        le.load(path)


def test_sizes_are_checked_before_anything_is_allocated(tmp_path):
    huge = onnx.TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[1 << 20, 1 << 20])
    path = save(tmp_path, [helper.make_node("Add", ["x", "W"], ["y"])], [tensor("x", [2])], [tensor("y", None)],
                [huge], name="a.onnx")
    with pytest.raises(le.LoadError, match="elements"):
        le.load(path)
    short = onnx.TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[1000], raw_data=b"\0" * 8)
    path = save(tmp_path, [helper.make_node("Add", ["x", "W"], ["y"])], [tensor("x", [2])], [tensor("y", None)],
                [short], name="b.onnx")
    with pytest.raises(le.LoadError, match="bytes"):
        le.load(path)
    fill = helper.make_node("ConstantOfShape", ["shape"], ["big"])
    path = save(tmp_path, [fill, helper.make_node("Add", ["x", "big"], ["y"])], [tensor("x", [2])],
                [tensor("y", None)], [init("shape", np.array([1 << 30, 1 << 30], np.int64))], name="c.onnx")
    with pytest.raises(le.LoadError):
        le.load(path)


def test_old_opsets_are_refused(tmp_path):
    path = save(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], [tensor("x", [2])], [tensor("y", None)], opset=6)
    with pytest.raises(le.LoadError, match="opset 6"):
        le.load(path)


# -- operators written with others --------------------------------------------------------------------

@pytest.mark.parametrize("op, attrs, n_in, opset", [
    ("Sum", {}, 3, 17), ("Sum", {}, 1, 17), ("Mean", {}, 2, 17), ("PRelu", {}, 2, 17),
    ("Selu", {}, 1, 17), ("Selu", {"alpha": 1.5, "gamma": 0.5}, 1, 17), ("HardSwish", {}, 1, 17),
    ("GlobalAveragePool", {}, 1, 17), ("GlobalMaxPool", {}, 1, 17),
])
def test_operators_made_of_others(tmp_path, op, attrs, n_in, opset):
    shape = [2, 3, 5]
    names = [f"x{k}" for k in range(n_in)]
    inputs = [tensor(names[0], shape)]
    inits = []
    if op == "PRelu":
        inits.append(init(names[1], RNG.standard_normal((3, 1)).astype(np.float32)))  # a slope per channel
    else:
        inputs += [tensor(n, shape) for n in names[1:]]
    path = save(tmp_path, [helper.make_node(op, names, ["y"], **attrs)], inputs, [tensor("y", None)], inits, opset)
    feeds = {i.name: RNG.standard_normal(shape).astype(np.float32) * 3 for i in inputs}
    check_against_onnxruntime(path, feeds)


# -- an ONNX model as an engine model: saved, and streamed ---------------------------------------------

def test_saved_as_an_engine_file_it_runs_without_onnx(tmp_path):
    """Peepholes, clip, parameterised activations and an If with an LSTM in each branch survive le.save."""
    H, I = 4, 3
    node = helper.make_node("LSTM", ["x", "W", "R", "B", "", "", "", "P"], ["Y", "Y_h"], hidden_size=H, clip=1.5,
                            direction="bidirectional", input_forget=1,
                            activations=["HardSigmoid", "Elu", "Softsign", "Sigmoid", "Tanh", "LeakyRelu"],
                            activation_alpha=[0.3, 0.7, 0.05], activation_beta=[0.4])
    branch = helper.make_node("If", ["flag"], ["h"], then_branch=lstm_branch("a"), else_branch=lstm_branch("b"))
    inits = [init(n, RNG.standard_normal(s).astype(np.float32)) for n, s in
             (("W", (2, 4 * H, I)), ("R", (2, 4 * H, H)), ("B", (2, 8 * H)), ("P", (2, 3 * H)))]
    path = save(tmp_path, [node, branch], [tensor("x", [5, 2, I]), tensor("flag", [], TensorProto.BOOL)],
                [tensor("Y", None), tensor("Y_h", None), tensor("h", None)], inits)
    model = le.load(path)
    le.save(model, tmp_path / "m.safetensors")
    again = le.load(tmp_path / "m.safetensors")
    x = RNG.standard_normal((5, 2, I)).astype(np.float32)
    for flag in (True, False):
        feeds = {"x": x, "flag": np.array(flag)}
        want = check_against_onnxruntime(path, feeds)
        got = again.run(feeds)
        for name in ("Y", "Y_h", "h"):
            np.testing.assert_array_equal(got[name], want[name])


def test_a_causal_model_streams_step_by_step(tmp_path):
    torch = pytest.importorskip("torch")
    from test_onnx_torch_export import export
    from torch_modules import HeadFirst

    torch.manual_seed(0)
    module = HeadFirst().eval()  # LSTM then Linear on every step
    names, outputs = export(module, [torch.randn(2, 5, 4)], tmp_path / "m.onnx")
    model = le.load(tmp_path / "m.onnx")
    x = RNG.standard_normal((3, 7, 4)).astype(np.float32)
    want = model.run({names[0]: x})[outputs[0]]
    session = model.session(batch_size=3)
    got = np.stack([session.step(x[:, t]) for t in range(7)], axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_an_operator_newer_than_the_models_opset_is_invalid(tmp_path):
    node = helper.make_node("LayerNormalization", ["x", "s"], ["y"])
    path = save(tmp_path, [node], [tensor("x", [2, 3])], [tensor("y", None)], [init("s", np.ones(3, np.float32))],
                opset=16)
    with pytest.raises(le.LoadError, match="not an operator of opset 16") as err:
        le.load(path)
    assert not isinstance(err.value, le.UnsupportedOpError)


def test_an_exported_model_streams_whatever_the_exporter_called_its_time_axis(tmp_path):
    torch = pytest.importorskip("torch")
    from torch_modules import HeadFirst

    torch.manual_seed(0)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(HeadFirst().eval(), (torch.randn(2, 5, 4),), str(path), input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "n", 1: "seq"}}, dynamo=False)
    model = le.load(path)
    assert model.graph.inputs[0].shape == ["n", "seq", 4]  # the file's own names are kept
    x = RNG.standard_normal((2, 6, 4)).astype(np.float32)
    session = model.session(batch_size=2)
    got = np.stack([session.step(x[:, t]) for t in range(6)], axis=1)
    np.testing.assert_allclose(got, model.run({"x": x})["y"], rtol=1e-6, atol=1e-6)
