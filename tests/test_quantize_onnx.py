"""le.quantize on layers loaded from ONNX with ONNX-only options: clip, input_forget, peepholes, every ONNX
activation (per direction), GRU with linear_before_reset 0 and 1. The quantized model keeps every option:
16-bit storage computes what float32 computes on the widened weights, int8 stays within its bound of the
float model, and the options survive le.save/le.load."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import lstm_engine as le

onnx = pytest.importorskip("onnx")
from test_onnx_recurrent import LSTM_ONLY, VARIANTS, build, recurrent_model  # noqa: E402
from test_quantize import TOLERANCE  # noqa: E402

OPTIONS = ("plain", "clip", "activations", "peephole", "input_forget", "everything", "linear_before_reset",
           "linear_before_reset_clip")


def cases():
    for op in ("LSTM", "GRU", "RNN"):
        for name in OPTIONS:
            if (name in LSTM_ONLY and op != "LSTM") or (name.startswith("linear_before_reset") and op != "GRU"):
                continue
            yield pytest.param(op, name, id=f"{op}-{name}")


def onnx_model(op, name, tmp_path):
    arrays, fed, attrs = build(op, "bidirectional", 0, name, np.random.default_rng(7))
    path = tmp_path / "m.onnx"
    onnx.save(recurrent_model(op, arrays, fed, attrs), path)
    return le.load(path), {k: v for k, v in arrays.items() if k in fed}


def widened(q):
    """The float32 engine on the quantized model's weights, widened, with the same options."""
    layers = [type(layer)(**layer.weights(), **layer.config()) for layer in q.layers]
    return le.Model(layers) if q.is_chain else le.Model(dataclasses.replace(q.graph, layers=layers))


def max_error(a, b):
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.mark.parametrize("op,name", list(cases()))
def test_onnx_options_survive_quantization(op, name, tmp_path):
    model, feeds = onnx_model(op, name, tmp_path)
    layer = model.recurrent_layers[0]
    if name == "plain" and op == "GRU":
        assert not layer.reset_after  # ONNX's default linear_before_reset=0: Keras's reset-before GRU
    want = model.run(feeds)
    scale = max(1.0, max(float(np.abs(v).max()) for v in want.values()))  # ONNX activations reach past 1
    for fmt in ("int8", "float16", "bfloat16"):
        q = le.quantize(model, fmt)
        qlayer = q.recurrent_layers[0]
        assert qlayer.quantization.format == fmt
        assert qlayer.config() == layer.config()  # clip, input_forget, activations, reset_after kept
        got = q.run(feeds)
        assert max_error(got, want) <= TOLERANCE[fmt] * scale, fmt
        if fmt != "int8":  # 16-bit: exactly the float32 computation on the stored weights, options and all
            assert max_error(got, widened(q).run(feeds)) <= 2e-5, fmt
        le.save(q, tmp_path / f"{fmt}.safetensors")
        back = le.load(tmp_path / f"{fmt}.safetensors")
        assert back.recurrent_layers[0].config() == layer.config()
        assert max_error(back.run(feeds), got) == 0, fmt


def test_an_option_dropped_would_be_seen():
    """The checks above can fail: the same weights without clip give another answer than with it."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        model, feeds = onnx_model("LSTM", "clip", Path(tmp))
    q = le.quantize(model, "float16")
    layers = [type(layer)(**layer.weights(), **{**layer.config(), "clip": None}) for layer in q.layers]
    unclipped = le.Model(dataclasses.replace(q.graph, layers=layers)) if not q.is_chain else le.Model(layers)
    assert max_error(q.run(feeds), unclipped.run(feeds)) > 1e-2
