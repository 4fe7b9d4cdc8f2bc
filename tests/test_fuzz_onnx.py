"""Fuzzing the ONNX reader through ``le.load``: mutated real ONNX files, byte-level and protobuf-aware.

The harness is the loaders' one (tests/test_fuzz_loaders.py: worker subprocesses, address space capped,
crashes and hangs seen; its make_cases alternates byte mutations with ``proto_mutation`` below): every case
ends in a model that loads and runs, a LoadError naming the file, or — for a graph whose sizes are known only
at run time — a ValueError naming the node when it runs.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")
from onnx import helper, numpy_helper  # noqa: E402

from test_fuzz_loaders import INTERESTING_INTS, check, make_cases, run_cases  # noqa: E402
from test_onnx_torch_export import export  # noqa: E402
from torch_modules import CRNN, FinalHidden  # noqa: E402

SEED = 20261130


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx_fuzz_sources")
    torch.manual_seed(0)
    export(FinalHidden().eval(), [torch.randn(2, 5, 4)], root / "bilstm.onnx")
    export(CRNN().eval(), [torch.randn(2, 5, 6)], root / "crnn.onnx", dynamic=False)
    rng = np.random.default_rng(0)
    H, I = 3, 2
    lstm = helper.make_node("LSTM", ["x", "W", "R", "B", "", "", "", "P"], ["Y", "Y_h"], hidden_size=H, clip=2.0,
                            activations=["HardSigmoid", "Elu", "Tanh"], activation_alpha=[0.3, 0.8],
                            activation_beta=[0.4])
    branch = helper.make_graph([helper.make_node("Relu", ["Y_h"], ["r"])], "then", [],
                               [helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", ["Y_h"], ["n"])], "else", [],
                              [helper.make_tensor_value_info("n", onnx.TensorProto.FLOAT, None)])
    cond = helper.make_node("If", ["flag"], ["out"], then_branch=branch, else_branch=other)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in
             (("W", rng.standard_normal((1, 4 * H, I))), ("R", rng.standard_normal((1, 4 * H, H))),
              ("B", rng.standard_normal((1, 8 * H))), ("P", rng.standard_normal((1, 3 * H))))]
    graph = helper.make_graph([lstm, cond], "g", [
        helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["steps", "batch", I]),
        helper.make_tensor_value_info("flag", onnx.TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None),
         helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), root / "options_if.onnx")
    return {name: str(root / name) for name in sorted(os.listdir(root))}


def _numbers(rng):
    return rng.choice(INTERESTING_INTS + [0, 1, 2, -1])


def proto_mutation(rng, data):
    """Edit one field of the parsed model and serialise it again: the damage reaches the converter."""
    model = onnx.ModelProto()
    model.ParseFromString(data)
    g = model.graph
    choice = rng.randrange(9)
    if choice == 0 and len(g.initializer):
        t = rng.choice(list(g.initializer))
        if len(t.dims):
            t.dims[rng.randrange(len(t.dims))] = _numbers(rng) % (1 << 63)
    elif choice == 1 and len(g.initializer):
        t = rng.choice(list(g.initializer))
        t.raw_data = t.raw_data[:rng.randrange(len(t.raw_data) + 1)]
    elif choice == 2:
        node = rng.choice(list(g.node))
        ints = [a for a in node.attribute if a.type in (2, 7)]
        if ints:
            a = rng.choice(ints)
            if a.type == 2:
                a.i = _numbers(rng) % (1 << 63) - (1 << 62) * rng.randrange(2)
            elif len(a.ints):
                a.ints[rng.randrange(len(a.ints))] = _numbers(rng) % (1 << 62)
    elif choice == 3:
        node = rng.choice(list(g.node))
        node.op_type = rng.choice(["LSTM", "GRU", "RNN", "Reshape", "Slice", "If", "Conv", "Gather", "Loop", ""])
    elif choice == 4:
        node = rng.choice(list(g.node))
        if len(node.input):
            node.input[rng.randrange(len(node.input))] = rng.choice(["", "x", "missing", node.output[0]])
    elif choice == 5:
        model.opset_import[0].version = rng.choice([1, 6, 7, 13, 18, 99, 1 << 40])
    elif choice == 6:
        vi = rng.choice(list(g.input))
        dims = vi.type.tensor_type.shape.dim
        if len(dims):
            dims[rng.randrange(len(dims))].dim_value = _numbers(rng) % (1 << 62)
    elif choice == 7:
        node = rng.choice(list(g.node))
        floats = [a for a in node.attribute if a.type == 1]
        if floats:
            rng.choice(floats).f = rng.choice([0.0, -1.0, float("inf"), float("nan"), 1e30])
    else:
        nodes = list(g.node)
        rng.shuffle(nodes)
        del g.node[:]
        g.node.extend(nodes)
    return model.SerializeToString()


def test_fuzz_onnx(sources, tmp_path):
    cases = make_cases(sources, str(tmp_path), per_source=120, random_files=0, seed=SEED)
    check(run_cases(cases), cases)


@pytest.mark.slow
def test_fuzz_onnx_long(sources, tmp_path):
    cases = make_cases(sources, str(tmp_path), per_source=2000, random_files=0, seed=SEED + 1)
    check(run_cases(cases), cases)
