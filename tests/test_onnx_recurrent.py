"""ONNX's LSTM, GRU and RNN operators: ONNX's own test cases, and every attribute against onnxruntime and a
float64 reference written from the spec (tests/onnx_reference.py)."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import lstm_engine as le  # noqa: E402

import onnx_reference  # noqa: E402

OPSET = 22


def _node_cases():
    """ONNX's own LSTM/GRU/RNN cases: importing a case module runs its exports, which record the cases."""
    import importlib

    import onnx.backend.test.case.node as cases

    for op in ("lstm", "gru", "rnn"):
        importlib.import_module(f"onnx.backend.test.case.node.{op}")
    prefixes = ("test_lstm_", "test_gru_", "test_rnn_", "test_simple_rnn_")
    return sorted({c.name: c for c in cases._NodeTestCases if c.name.startswith(prefixes)}.values(),
                  key=lambda c: c.name)


NODE_CASES = _node_cases()
WEIGHTS = ("W", "R", "B", "P")


def test_onnx_ships_every_recurrent_case():
    names = {c.name for c in NODE_CASES}
    assert {"test_lstm_with_peepholes", "test_gru_seq_length", "test_simple_rnn_bidirectional",
            "test_lstm_batchwise", "test_gru_reverse", "test_rnn_seq_length"} <= names
    assert len(names) >= 18


@pytest.mark.parametrize("case", NODE_CASES, ids=lambda c: c.name)
def test_onnx_node_case(case, tmp_path):
    """Each of ONNX's own cases, its weights made initializers, within ONNX's backend tolerance."""
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    inputs, outputs = case.data_sets[0]
    graph = model.graph
    feeds = {}
    kept = []
    for vi, value in zip(list(graph.input), inputs):
        if vi.name in WEIGHTS:
            graph.initializer.append(numpy_helper.from_array(np.asarray(value), vi.name))
        else:
            feeds[vi.name] = np.asarray(value)
            kept.append(vi)
    del graph.input[:]
    graph.input.extend(kept)
    path = tmp_path / f"{case.name}.onnx"
    onnx.save(model, path)
    got = le.load(path).run(feeds)
    for vi, want in zip(graph.output, outputs):
        np.testing.assert_allclose(got[vi.name], want, rtol=case.rtol or 1e-3, atol=case.atol or 1e-7)


# -- every attribute, on generated models -------------------------------------------------------------

def recurrent_model(op: str, arrays: dict, fed: tuple, attrs: dict, outputs=("Y", "Y_h", "Y_c")):
    """A one-node model: arrays named as the op's inputs; those in ``fed`` are graph inputs, the rest initializers."""
    order = ["X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P"]
    names = [n if n in arrays else "" for n in order]
    while names and not names[-1]:
        names.pop()
    outs = list(outputs[: 3 if op == "LSTM" else 2])
    node = helper.make_node(op, names, outs, **attrs)
    inputs, inits = [], []
    for name, value in arrays.items():
        if name in fed:
            elem = TensorProto.INT32 if value.dtype == np.int32 else helper.np_dtype_to_tensor_dtype(value.dtype)
            inputs.append(helper.make_tensor_value_info(name, elem, list(value.shape)))
        else:
            inits.append(numpy_helper.from_array(value, name))
    out_info = [helper.make_tensor_value_info(o, helper.np_dtype_to_tensor_dtype(arrays["X"].dtype), None)
                for o in outs if o]
    graph = helper.make_graph([node], "g", inputs, out_info, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def random_arrays(op: str, rng, D: int, T=5, B=3, I=4, H=6, dtype=np.float32, layout=0, bias=True,
                  peephole=False, lengths=None, states=False):
    G = onnx_reference.GATES[op]
    a = {"X": rng.standard_normal((B, T, I) if layout else (T, B, I)).astype(dtype),
         "W": (rng.standard_normal((D, G * H, I)) * 0.5).astype(dtype),
         "R": (rng.standard_normal((D, G * H, H)) * 0.5).astype(dtype)}
    if bias:
        a["B"] = (rng.standard_normal((D, 2 * G * H)) * 0.3).astype(dtype)
    if lengths is not None:
        a["sequence_lens"] = np.asarray(lengths, np.int32)
    if states:
        shape = (B, D, H) if layout else (D, B, H)
        a["initial_h"] = (rng.standard_normal(shape) * 0.5).astype(dtype)
        if op == "LSTM":
            a["initial_c"] = (rng.standard_normal(shape) * 0.5).astype(dtype)
    if peephole:
        a["P"] = (rng.standard_normal((D, 3 * H)) * 0.5).astype(dtype)
    return a


VARIANTS = {
    "plain": {},
    "no_bias": {"bias": False},
    "clip": {"attrs": {"clip": 0.7}},
    "lengths": {"lengths": [5, 2, 4]},
    "length_zero": {"lengths": [3, 0, 5], "states": True},
    "states": {"states": True},
    "activations": {},
    "peephole": {"peephole": True},
    "input_forget": {"attrs": {"input_forget": 1}},
    "everything": {"peephole": True, "states": True, "lengths": [4, 5, 1], "attrs": {"clip": 1.5}},
    "linear_before_reset": {"attrs": {"linear_before_reset": 1}},
    "linear_before_reset_clip": {"attrs": {"linear_before_reset": 1, "clip": 0.8}, "lengths": [5, 0, 3],
                                 "states": True},
}
LSTM_ONLY = {"peephole", "input_forget", "everything"}
ACTIVATION_SETS = {
    # Per direction (forward, reverse): every ONNX activation appears somewhere, g != h for LSTM.
    "LSTM": (["HardSigmoid", "Elu", "Softsign", "LeakyRelu", "ScaledTanh", "Affine"],
             [0.25, 0.9, 0.05, 0.6, 0.4], [0.45, 1.3, 0.1]),
    "GRU": (["Sigmoid", "ThresholdedRelu", "HardSigmoid", "Softplus"], [0.2, 0.3], [0.4]),
    "RNN": (["Relu", "ScaledTanh"], [1.2], [0.7]),
}


def variant_cases():
    for op in ("LSTM", "GRU", "RNN"):
        for direction in ("forward", "reverse", "bidirectional"):
            for layout in (0, 1):
                for name in VARIANTS:
                    if name in LSTM_ONLY and op != "LSTM":
                        continue
                    if name.startswith("linear_before_reset") and op != "GRU":
                        continue
                    yield pytest.param(op, direction, layout, name, id=f"{op}-{direction}-layout{layout}-{name}")


def build(op, direction, layout, name, rng, dtype=np.float32):
    D = 2 if direction == "bidirectional" else 1
    v = dict(VARIANTS[name])
    attrs = {"hidden_size": 6, "direction": direction, **v.pop("attrs", {})}
    if layout:
        attrs["layout"] = 1
    if name == "activations":
        names, alphas, betas = ACTIVATION_SETS[op]
        n = len(onnx_reference.DEFAULT_ACTIVATIONS[op])
        attrs.update(activations=names[: n * D], activation_alpha=alphas, activation_beta=betas)
    arrays = random_arrays(op, rng, D, dtype=dtype, layout=layout, **v)
    fed = ("X", "sequence_lens", "initial_h", "initial_c")
    return arrays, fed, attrs


@pytest.mark.parametrize("op,direction,layout,name", list(variant_cases()))
def test_attributes_against_onnxruntime_and_reference(op, direction, layout, name, tmp_path):
    rng = np.random.default_rng(7)
    arrays, fed, attrs = build(op, direction, layout, name, rng)
    model = recurrent_model(op, arrays, fed, attrs)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    feeds = {k: v for k, v in arrays.items() if k in fed}
    got = le.load(path).run(feeds)
    # The file holds float attributes as float32: so does the reference.
    as_stored = {k: (float(np.float32(v)) if k == "clip" else [float(np.float32(x)) for x in v]
                     if k.startswith("activation_") else v) for k, v in attrs.items() if k != "hidden_size"}
    ref = onnx_reference.run(op, **arrays, **as_stored)
    for out, want in zip(("Y", "Y_h", "Y_c"), ref):
        np.testing.assert_allclose(got[out], want, rtol=1e-5, atol=2e-6, err_msg=out)
    # float64 all the way: the reference within float64 rounding.
    got64 = le.load(path, dtype=np.float64).run(feeds, cast=True)
    for out, want in zip(("Y", "Y_h", "Y_c"), ref):
        np.testing.assert_allclose(got64[out], want, rtol=1e-10, atol=1e-12, err_msg=out)
    if layout == 1:
        return  # onnxruntime has no CPU kernel for layout=1; the reference above is the check
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for o, want in zip(sess.get_outputs(), sess.run(None, feeds)):
        np.testing.assert_allclose(got[o.name], want, rtol=1e-4, atol=2e-5, err_msg=o.name)
