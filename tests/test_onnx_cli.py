"""lstm-engine verify on ONNX models: checked against onnxruntime, or plainly not checked."""
from __future__ import annotations

import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from test_cli import cli, run_main  # noqa: E402


def gru_model(path, seed):
    rng = np.random.default_rng(seed)
    H, I = 5, 3
    node = helper.make_node("GRU", ["x", "W", "R", "B"], ["Y", "Y_h"], hidden_size=H, linear_before_reset=1)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("W", (1, 3 * H, I)), ("R", (1, 3 * H, H)), ("B", (1, 6 * H)))]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["steps", "batch", I])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_verify_an_onnx_model_against_onnxruntime(tmp_path):
    proc = cli("verify", gru_model(tmp_path / "gru.onnx", 0), "--atol", "1e-5")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "onnxruntime" in proc.stdout and "Y_h" in proc.stdout and "ok: every error" in proc.stdout


def test_verify_finds_a_different_model(tmp_path, capsys):
    proc = run_main(capsys, "verify", gru_model(tmp_path / "a.onnx", 0), "--source", gru_model(tmp_path / "b.onnx", 1))
    assert proc.returncode == 1
    assert "FAILED" in proc.stdout


def test_verify_without_onnxruntime_says_it_did_not_check(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    proc = run_main(capsys, "verify", gru_model(tmp_path / "gru.onnx", 0))
    assert proc.returncode == 2
    assert "NOT CHECKED" in proc.stdout and "ok" not in proc.stdout
