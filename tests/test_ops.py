"""Every glue op of lstm_engine.ops against onnxruntime running the same single-node ONNX model.

Where ONNX takes a parameter as a constant input (Reshape's shape, Slice's starts...), the engine takes
it as an attribute: the case gives both forms. A NumPy expectation covers what onnxruntime refuses.
"""
import numpy as np
import pytest

from lstm_engine import ops
from lstm_engine.graph import Graph, Node, ValueInfo
from lstm_engine.plan import Call, Plan

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

RNG = np.random.default_rng(7)
F = np.float32


def f(*shape, positive=False):
    a = RNG.standard_normal(shape).astype(F)
    return np.abs(a) + 0.1 if positive else a


def i64(*values):
    return np.array(values, np.int64)


_ONNX_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE,
               np.dtype(np.int64): TensorProto.INT64, np.dtype(np.int32): TensorProto.INT32,
               np.dtype(np.bool_): TensorProto.BOOL}


def onnxruntime_run(op, inputs, attrs, consts=(), n_out=1, opset=17):
    """Run one ONNX node: inputs are fed, consts (name index -> array, or None to omit) are initializers."""
    names, graph_inputs, feeds = [], [], {}
    for k, x in enumerate(inputs):
        names.append(f"in{k}")
        graph_inputs.append(helper.make_tensor_value_info(f"in{k}", _ONNX_TYPES[x.dtype], list(x.shape)))
        feeds[f"in{k}"] = x
    inits = []
    for k, c in enumerate(consts):
        if c is None:
            names.append("")
            continue
        names.append(f"c{k}")
        inits.append(numpy_helper.from_array(np.asarray(c), f"c{k}"))
    outs = [f"out{k}" for k in range(n_out)]
    node = helper.make_node(op, names, outs, **attrs)
    graph = helper.make_graph([node], "g", graph_inputs,
                              [onnx.ValueInfoProto(name=o) for o in outs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def engine_run(op, inputs, attrs, n_out=1, dtype=np.float32):
    """The same op as a one-node engine graph, through the plan runner (no constant folding: inputs are fed)."""
    infos = [ValueInfo(f"in{k}", {"f": "float", "i": "int64", "b": "bool"}[x.dtype.kind]
                       if x.dtype != np.int32 else "int32", list(x.shape)) for k, x in enumerate(inputs)]
    node = Node(op, [v.name for v in infos], [f"out{k}" for k in range(n_out)], attrs, "n0")
    g = Graph(infos, node.outputs, [node])
    g.validate()
    return Plan(g, np.dtype(dtype)).run(list(inputs), Call([]))


# (op, engine attrs, inputs, onnx attrs, onnx constant inputs, outputs, opset)
CASES = [
    ("Add", {}, [f(2, 3, 4), f(4)], {}, [], 1, 17),
    ("Sub", {}, [f(2, 3, 4), f(3, 1)], {}, [], 1, 17),
    ("Mul", {}, [f(2, 3), f(2, 3)], {}, [], 1, 17),
    ("Div", {}, [f(2, 3), f(3, positive=True)], {}, [], 1, 17),
    ("Div", {}, [i64(7, -7, 7, -7), i64(2, 2, -2, -2)], {}, [], 1, 17),
    ("Pow", {}, [f(2, 3, positive=True), f(3)], {}, [], 1, 17),
    ("Pow", {}, [f(2, 3), np.array(2.0, F)], {}, [], 1, 17),
    ("Sqrt", {}, [f(3, 4, positive=True)], {}, [], 1, 17),
    ("Neg", {}, [f(3, 4)], {}, [], 1, 17),
    ("Abs", {}, [f(3, 4)], {}, [], 1, 17),
    ("Exp", {}, [f(3, 4)], {}, [], 1, 17),
    ("Log", {}, [f(3, 4, positive=True)], {}, [], 1, 17),
    ("Reciprocal", {}, [f(3, 4, positive=True)], {}, [], 1, 17),
    ("Erf", {}, [f(3, 4)], {}, [], 1, 17),
    ("Max", {}, [f(2, 3), f(3), f(2, 1)], {}, [], 1, 17),
    ("Min", {}, [f(2, 3), f(3)], {}, [], 1, 17),
    ("Where", {}, [f(2, 3) > 0, f(2, 3), f(3)], {}, [], 1, 17),
    ("Equal", {}, [i64(1, 2, 3), i64(1, 0, 3)], {}, [], 1, 17),
    ("Less", {}, [f(2, 3), f(3)], {}, [], 1, 17),
    ("Greater", {}, [f(2, 3), f(3)], {}, [], 1, 17),
    ("Not", {}, [f(2, 3) > 0], {}, [], 1, 17),
    ("And", {}, [f(2, 3) > 0, f(3) > 0], {}, [], 1, 17),
    ("Clip", {"min": -0.5, "max": 0.7}, [f(3, 4)], {}, [np.array(-0.5, F), np.array(0.7, F)], 1, 17),
    ("Clip", {"max": 0.2}, [f(3, 4)], {}, [None, np.array(0.2, F)], 1, 17),
    ("Relu", {}, [f(3, 4)], {}, [], 1, 17),
    ("Tanh", {}, [f(3, 4)], {}, [], 1, 17),
    ("Sigmoid", {}, [f(3, 4) * 10], {}, [], 1, 17),
    ("Gelu", {}, [f(3, 4)], {}, [], 1, 20),
    ("Gelu", {"approximate": "tanh"}, [f(3, 4)], {"approximate": "tanh"}, [], 1, 20),
    ("Elu", {"alpha": 0.7}, [f(3, 4)], {"alpha": 0.7}, [], 1, 17),
    ("LeakyRelu", {"alpha": 0.2}, [f(3, 4)], {"alpha": 0.2}, [], 1, 17),
    ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}, [f(3, 4) * 3], {"alpha": 0.3, "beta": 0.4}, [], 1, 17),
    ("Softplus", {}, [f(3, 4) * 5], {}, [], 1, 17),
    ("Softsign", {}, [f(3, 4)], {}, [], 1, 17),
    ("Softmax", {"axis": 1}, [f(2, 3, 4)], {"axis": 1}, [], 1, 17),
    ("Softmax", {}, [f(2, 3, 4)], {}, [], 1, 17),
    ("LogSoftmax", {"axis": -1}, [f(2, 3, 4)], {"axis": -1}, [], 1, 17),
    ("MatMul", {}, [f(2, 3, 4), f(4, 5)], {}, [], 1, 17),
    ("MatMul", {}, [f(2, 1, 3, 4), f(5, 4, 2)], {}, [], 1, 17),
    ("MatMul", {}, [f(4), f(2, 4, 3)], {}, [], 1, 17),
    ("Gemm", {"alpha": 0.5, "beta": 2.0, "transB": 1}, [f(3, 4), f(5, 4), f(5)],
     {"alpha": 0.5, "beta": 2.0, "transB": 1}, [], 1, 17),
    ("Gemm", {"transA": 1}, [f(4, 3), f(4, 5)], {"transA": 1}, [], 1, 17),
    ("Einsum", {"equation": "bth,bh->bt"}, [f(2, 5, 3), f(2, 3)], {"equation": "bth,bh->bt"}, [], 1, 17),
    ("Einsum", {"equation": "bij, bjk -> bik"}, [f(2, 3, 4), f(2, 4, 5)], {"equation": "bij,bjk->bik"}, [], 1, 17),
    ("LayerNormalization", {"axis": -1, "epsilon": 1e-3}, [f(2, 3, 4), f(4), f(4)],
     {"axis": -1, "epsilon": 1e-3}, [], 1, 17),
    ("LayerNormalization", {"axis": 1}, [f(2, 3, 4), f(3, 4)], {"axis": 1}, [], 3, 17),
    ("BatchNormalization", {"epsilon": 1e-3}, [f(2, 3, 5), f(3), f(3), f(3), f(3, positive=True)],
     {"epsilon": 1e-3}, [], 1, 17),
    ("Transpose", {"perm": [1, 0, 2]}, [f(2, 3, 4)], {"perm": [1, 0, 2]}, [], 1, 17),
    ("Transpose", {}, [f(2, 3, 4)], {}, [], 1, 17),
    ("Reshape", {"shape": [0, -1]}, [f(2, 3, 4)], {}, [i64(0, -1)], 1, 17),
    ("Reshape", {"shape": [4, 0, 2], "allowzero": 0}, [f(2, 3, 4)], {}, [i64(4, 0, 2)], 1, 17),
    ("Flatten", {"axis": 2}, [f(2, 3, 4, 5)], {"axis": 2}, [], 1, 17),
    ("Flatten", {"axis": 0}, [f(2, 3)], {"axis": 0}, [], 1, 17),
    ("Squeeze", {"axes": [1]}, [f(2, 1, 4)], {}, [i64(1)], 1, 17),
    ("Squeeze", {}, [f(1, 3, 1)], {}, [], 1, 17),
    ("Unsqueeze", {"axes": [0, -1]}, [f(2, 3)], {}, [i64(0, -1)], 1, 17),
    ("Concat", {"axis": 1}, [f(2, 3), f(2, 4)], {"axis": 1}, [], 1, 17),
    ("Concat", {"axis": -3}, [f(1, 2, 3), f(2, 2, 3)], {"axis": -3}, [], 1, 17),
    ("Split", {"axis": 1, "split": [1, 3]}, [f(2, 4)], {"axis": 1}, [i64(1, 3)], 2, 17),
    ("Split", {"axis": 0}, [f(6, 2)], {"axis": 0}, [], 3, 17),
    ("Slice", {"starts": [-1], "ends": [2 ** 63 - 1], "axes": [1]}, [f(2, 5, 3)], {},
     [i64(-1), i64(2 ** 63 - 1), i64(1)], 1, 17),
    ("Slice", {"starts": [4, 0], "ends": [-10, 3], "axes": [1, 2], "steps": [-2, 2]}, [f(2, 5, 3)], {},
     [i64(4, 0), i64(-10, 3), i64(1, 2), i64(-2, 2)], 1, 17),
    ("Slice", {"starts": [1], "ends": [-1]}, [f(5, 3)], {}, [i64(1), i64(-1)], 1, 17),
    ("Gather", {"axis": 0}, [f(5, 3), i64(4, 0, -1, 2).reshape(2, 2)], {"axis": 0}, [], 1, 17),
    ("Gather", {"axis": 1}, [f(2, 5, 3), np.array(-1, np.int64)], {"axis": 1}, [], 1, 17),
    ("Expand", {"shape": [2, 1, 4]}, [f(3, 1)], {}, [i64(2, 1, 4)], 1, 17),
    ("Tile", {"repeats": [2, 1, 3]}, [f(2, 3, 1)], {}, [i64(2, 1, 3)], 1, 17),
    ("Identity", {}, [f(2, 3)], {}, [], 1, 17),
    ("Cast", {"to": "int64"}, [f(2, 3) * 5], {"to": TensorProto.INT64}, [], 1, 17),
    ("Cast", {"to": "float"}, [i64(1, -2, 3)], {"to": TensorProto.FLOAT}, [], 1, 17),
    ("Cast", {"to": "bool"}, [f(2, 3)], {"to": TensorProto.BOOL}, [], 1, 17),
    ("Shape", {}, [f(2, 3, 4)], {}, [], 1, 17),
    ("Shape", {"start": 1, "end": -1}, [f(2, 3, 4, 5)], {"start": 1, "end": -1}, [], 1, 17),
    ("ReduceMean", {"axes": [1]}, [f(2, 3, 4)], {"axes": [1]}, [], 1, 17),
    ("ReduceMean", {"keepdims": 0}, [f(2, 3, 4)], {"keepdims": 0}, [], 1, 17),
    ("ReduceSum", {"axes": [-1], "keepdims": 0}, [f(2, 3, 4)], {"keepdims": 0}, [i64(-1)], 1, 17),
    ("ReduceMax", {"axes": [0, 2]}, [f(2, 3, 4)], {"axes": [0, 2]}, [], 1, 17),
    ("ReduceMin", {"axes": [1], "keepdims": 0}, [f(2, 3, 4)], {"axes": [1], "keepdims": 0}, [], 1, 17),
    ("ReduceL2", {"axes": [-1]}, [f(2, 3, 4)], {"axes": [-1]}, [], 1, 17),
    ("ArgMax", {"axis": 1}, [f(2, 3, 4)], {"axis": 1}, [], 1, 17),
    ("ArgMax", {"axis": -1, "keepdims": 0}, [f(2, 3, 4)], {"axis": -1, "keepdims": 0}, [], 1, 17),
    ("Conv", {"kernel_shape": [3], "pads": [1, 1]}, [f(2, 4, 9), f(5, 4, 3), f(5)],
     {"kernel_shape": [3], "pads": [1, 1]}, [], 1, 17),
    ("Conv", {"strides": [2], "dilations": [2], "pads": [2, 0]}, [f(2, 4, 11), f(6, 4, 3)],
     {"strides": [2], "dilations": [2], "pads": [2, 0]}, [], 1, 17),
    ("Conv", {"group": 2}, [f(1, 4, 7), f(6, 2, 2), f(6)], {"group": 2}, [], 1, 17),
    ("Pad", {"pads": [0, 1, 0, 2]}, [f(2, 3)], {}, [i64(0, 1, 0, 2)], 1, 17),
    ("Pad", {"pads": [0, 0, 2, 0, 0, 1], "mode": "reflect"}, [f(2, 3, 4)], {"mode": "reflect"},
     [i64(0, 0, 2, 0, 0, 1)], 1, 17),
    ("Pad", {"pads": [1, 2, 0, 1], "mode": "edge"}, [f(2, 3)], {"mode": "edge"}, [i64(1, 2, 0, 1)], 1, 17),
    ("Pad", {"pads": [1, 1], "value": 1.5, "axes": [1]}, [f(2, 3)], {}, [i64(1, 1), np.array(1.5, F), i64(1)], 1, 18),
    ("ConstantOfShape", {"value": 1.5}, [i64(2, 3)],
     {"value": helper.make_tensor("v", TensorProto.FLOAT, [1], [1.5])}, [], 1, 17),
    ("ConstantOfShape", {"dtype": "int64"}, [i64(4)],
     {"value": helper.make_tensor("v", TensorProto.INT64, [1], [0])}, [], 1, 17),
]


def test_every_op_has_a_case():
    assert {c[0] for c in CASES} == set(ops.OPS)


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_op_matches_onnxruntime(case):
    op, attrs, inputs, onnx_attrs, consts, n_out, opset = case
    want = onnxruntime_run(op, inputs, onnx_attrs, consts, n_out, opset)
    got = engine_run(op, inputs, attrs, n_out)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert g.dtype == w.dtype
        if g.dtype.kind == "f":
            np.testing.assert_allclose(g, w, rtol=2e-6, atol=2e-6)
        else:
            np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("op, attrs, inputs", [
    ("Sigmoid", {}, [np.linspace(-30, 30, 13)]),
    ("Softmax", {"axis": 0}, [np.arange(6.0).reshape(3, 2)]),
    ("LayerNormalization", {}, [np.arange(6.0).reshape(2, 3), np.ones(3)]),
    ("Conv", {"pads": [0, 1]}, [np.arange(10.0).reshape(1, 2, 5), np.ones((3, 2, 2))]),
])
def test_float64_keeps_its_dtype(op, attrs, inputs):
    got = engine_run(op, inputs, attrs, dtype=np.float64)[0]
    want = engine_run(op, [x.astype(F) for x in inputs], attrs)[0]
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_conv_against_a_direct_sum():
    x, w, b = f(2, 3, 10), f(4, 3, 3), f(4)
    got = ops.conv(x, w, b, None, [2], [1, 2], [2], 1)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 2)))
    L = (xp.shape[2] - 5) // 2 + 1
    want = np.zeros((2, 4, L), F)
    for t in range(L):
        for j in range(3):
            want[:, :, t] += np.einsum("nc,mc->nm", xp[:, :, 2 * t + 2 * j], w[:, :, j])
    np.testing.assert_allclose(got, want + b[:, None], rtol=1e-5, atol=1e-5)


def direct_conv(x, w, b, stride, dilation, pads, group):
    """Conv as its definition's sum, in float64."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    xp = np.pad(x, ((0, 0), (0, 0), tuple(pads)))
    M, Cg, k = w.shape
    L = (xp.shape[2] - dilation * (k - 1) - 1) // stride + 1
    want = np.zeros((x.shape[0], M, L))
    Mg = M // group
    for m in range(M):
        g = m // Mg
        for t in range(L):
            for j in range(k):
                want[:, m, t] += xp[:, g * Cg:(g + 1) * Cg, stride * t + dilation * j] @ w[m, :, j]
    return want if b is None else want + b[:, None]


@pytest.mark.parametrize("seed", range(6))
def test_conv_kernel_every_variant_against_the_definition(seed, kernel_variant):
    """The float32 Conv runs the engine's kernel (cpu_conv.c): sizes across its register tiles' edges and the
    SIMD widths' tails, strides, dilations, pads, groups, bias or none, inputs that are strided views."""
    rng = np.random.default_rng(seed)
    for _ in range(25):
        group = int(rng.choice([1, 1, 2, 3]))
        # Channels past the kernel's register tiles (4 rows) with tails, columns past its 2 (AVX2) / 4 (AVX-512).
        Cg, Mg, k = rng.integers(1, 21), rng.integers(1, 11) if rng.random() < 0.6 else rng.integers(60, 140), \
            rng.integers(1, 6)
        stride, dilation = rng.integers(1, 4), rng.integers(1, 3)
        pads = [int(rng.integers(0, 4)), int(rng.integers(0, 4))]
        span = dilation * (k - 1) + 1
        L = int(rng.integers(max(1, span - sum(pads)), 40))
        N = int(rng.integers(1, 3))
        x = rng.standard_normal((N, group * Cg, 2 * L)).astype(F)[:, :, ::2]  # not contiguous along L
        w = rng.standard_normal((group * Mg, Cg, k)).astype(F)
        b = rng.standard_normal(group * Mg).astype(F) if rng.random() < 0.5 else None
        got = ops.conv(x, w, b, None, [int(stride)], pads, [int(dilation)], group)
        want = direct_conv(x, w, b, stride, dilation, pads, group)
        assert got.dtype == F and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(want).max()))


def test_conv_kernel_relu_epilogue_and_bad_arguments():
    from lstm_engine import _kernels

    x, w, b = f(2, 3, 9), f(4, 3, 2), f(4)
    out = np.empty((2, 4, 8), F)
    assert _kernels.Conv1d(w.reshape(4, 6), b, 2, relu=True)(x, out) is out
    np.testing.assert_allclose(out, np.maximum(direct_conv(x, w, b, 1, 1, [0, 0], 1), 0), rtol=1e-5, atol=1e-5)
    assert (out == 0).any() and (out > 0).any()
    conv = _kernels.Conv1d(w.reshape(4, 6), b, 2)
    with pytest.raises(ValueError, match="does not fit"):
        _kernels.Conv1d(w.reshape(4, 6), b, 4)
    with pytest.raises(ValueError, match=r"out must be float32 \(2, 4, 8\)"):
        conv(x, np.empty((2, 4, 7), F))
    with pytest.raises(ValueError, match="float32"):
        conv(x.astype(np.float64))
    with pytest.raises(ValueError, match=r"\(N, 3, L\)"):
        conv(f(2, 4, 9))
    with pytest.raises(ValueError, match="unit stride"):
        conv(f(2, 3, 18)[:, :, ::2])
    with pytest.raises(ValueError, match="shorter than the kernel"):
        conv(f(2, 3, 1))
    with pytest.raises(ValueError, match="bias"):
        _kernels.Conv1d(w.reshape(4, 6), f(5), 2)
    with pytest.raises(ValueError, match="reflect pad of \\(3, 1\\)"):
        _kernels.Conv1d(w.reshape(4, 6), b, 2, pad0=3, pad1=1, reflect=True)(f(2, 3, 3))


def test_conv_kernel_relu_keeps_nan_as_numpy_maximum(kernel_variant):
    """The Relu the kernel applies as it stores (every variant, 16-channel panels with a tail of 4): NaN stays NaN
    as np.maximum keeps it, negatives become 0, positives stay."""
    from lstm_engine import _kernels

    x, w, b = f(1, 2, 12), f(36, 2, 3), f(36)
    x[0, 1, 5] = np.nan
    got = _kernels.Conv1d(w.reshape(36, 6), b, 3, relu=True)(x)
    want = np.maximum(direct_conv(x, w, b, 1, 1, [0, 0], 1), 0)
    assert np.array_equal(np.isnan(got), np.isnan(want)) and np.isnan(got).any()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert (got == 0).any() and (got > 0).any()


@pytest.mark.parametrize("seed", range(4))
def test_conv_kernel_reflect_pad_folded_equals_pad_then_conv(seed, kernel_variant):
    """Conv1d(reflect=True) mirrors the input's ends in its window gather: the same windows, hence the same sums
    bit for bit, as an ONNX reflect Pad (np.pad's reflect) followed by the unpadded Conv, in every variant."""
    from lstm_engine import _kernels

    rng = np.random.default_rng(seed)
    for _ in range(20):
        C, M, k = rng.integers(1, 6), rng.integers(1, 40), rng.integers(1, 9)
        stride, dilation = int(rng.integers(1, 5)), int(rng.integers(1, 3))
        L = int(rng.integers(2, 30))
        lo, hi = int(rng.integers(0, L)), int(rng.integers(0, L))
        if L + lo + hi < dilation * (k - 1) + 1:
            continue
        x = rng.standard_normal((int(rng.integers(1, 3)), C, L)).astype(F)
        w = rng.standard_normal((M, C * k)).astype(F)
        b = rng.standard_normal(M).astype(F)
        got = _kernels.Conv1d(w, b, int(k), stride, dilation, lo, hi, reflect=True)(x)
        want = _kernels.Conv1d(w, b, int(k), stride, dilation)(np.pad(x, ((0, 0), (0, 0), (lo, hi)), mode="reflect"))
        np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(got, direct_conv(np.pad(x, ((0, 0), (0, 0), (lo, hi)), mode="reflect"),
                                                    w.reshape(M, C, k), b, stride, dilation, [0, 0], 1),
                                   rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("op, attrs, inputs, message", [
    ("Gather", {"axis": 0}, [np.zeros((3, 2), F), i64(3)], "index 3 is out of range"),
    ("Reshape", {"shape": [5, -1]}, [np.zeros((2, 3), F)], "cannot reshape"),
    ("Concat", {"axis": 1}, [np.zeros((2, 3), F), np.zeros((3, 3), F)], "do not fit"),
    ("Squeeze", {"axes": [0]}, [np.zeros((2, 3), F)], "is not 1"),
    ("Softmax", {"axis": 3}, [np.zeros((2, 3), F)], "out of range"),
    ("Div", {}, [i64(1), i64(0)], "division by zero"),
    ("Split", {"axis": 0, "split": [1, 1]}, [np.zeros((3,), F)], "does not cut"),
    ("Conv", {}, [np.zeros((1, 2, 2), F), np.zeros((1, 2, 3), F)], "shorter than the kernel"),
    ("Transpose", {"perm": [0, 0]}, [np.zeros((2, 3), F)], "not a permutation"),
])
def test_bad_values_raise_naming_the_node(op, attrs, inputs, message):
    with pytest.raises(ValueError, match=message) as info:
        engine_run(op, inputs, attrs, 2 if op == "Split" else 1)
    assert "node 'n0'" in str(info.value)


def test_attrs_are_checked():
    with pytest.raises(ValueError, match="attribute 'axis': expected an int"):
        ops.check_attrs("Softmax", {"axis": "1"})
    with pytest.raises(ValueError, match="attribute 'perms' is not one Transpose takes"):
        ops.check_attrs("Transpose", {"perms": [0]})
    with pytest.raises(ValueError, match="'shape' is required"):
        ops.check_attrs("Reshape", {})
    with pytest.raises(ValueError, match="einsum equation"):
        ops.check_attrs("Einsum", {"equation": "ab;import os"})
    assert ops.check_attrs("Gemm", {}) == {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0}
