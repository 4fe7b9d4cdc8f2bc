"""ONNX files run by lstm_engine (le.load + model.run) and by ONNX Runtime, timed interleaved in one run.

    python benches/bench_onnx.py [--reps N] [--threads N] [--silero PATH]

Each model is one ONNX file both systems read: LSTM and GRU nodes with and without the options the engine's
fused loops lack (peepholes, clip, linear_before_reset=0), and silero-vad when its file is given. Outputs are
checked equal first; then the two are timed in turn, round after round, so drift on a shared machine hits
both alike. Prints the median microseconds per call and ONNX Runtime's time over the engine's (> 1: the
engine is faster).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import lstm_engine as le
from lstm_engine import _kernels


def recurrent_file(path: str, op: str, H: int, I: int, rng, **attrs) -> None:
    G = 4 if op == "LSTM" else 3
    names = ["x", "W", "R", "B"] + (["", "", "", "P"] if attrs.pop("peepholes", False) else [])
    shapes = {"W": (1, G * H, I), "R": (1, G * H, H), "B": (1, 2 * G * H), "P": (1, 3 * H)}
    inits = [numpy_helper.from_array((rng.standard_normal(shapes[n]) * 0.1).astype(np.float32), n)
             for n in names[1:] if n]
    node = helper.make_node(op, names, ["Y", "Y_h"], hidden_size=H, **attrs)
    graph = helper.make_graph([node], op, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "B", I])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15, help="timing rounds (default 15)")
    ap.add_argument("--threads", type=int, default=1, help="threads for each system (default 1)")
    ap.add_argument("--silero", metavar="PATH", help="silero_vad.onnx, to time one 512-sample call with its state")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    tmp = tempfile.mkdtemp()
    cases = []
    H, I = 256, 64
    for name, op, attrs in [("LSTM", "LSTM", {}), ("LSTM peepholes", "LSTM", {"peepholes": True}),
                            ("LSTM clip", "LSTM", {"clip": 3.0}), ("GRU lbr=1", "GRU", {"linear_before_reset": 1}),
                            ("GRU lbr=0", "GRU", {})]:
        path = os.path.join(tmp, f"{name}.onnx".replace(" ", "_"))
        recurrent_file(path, op, H, I, rng, **attrs)
        for B, T in ((1, 1), (1, 200), (32, 100)):
            cases.append((f"{name} H={H} B={B} T={T}", path, {"x": rng.standard_normal((T, B, I)).astype(np.float32)}))
    if args.silero:
        feeds = {"input": rng.standard_normal((1, 512)).astype(np.float32) * 0.1,
                 "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, np.int64)}
        cases.append(("silero_vad 512 samples", args.silero, feeds))

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    print(f"{platform.processor() or platform.machine()}, lstm_engine kernels: "
          f"{_kernels.VARIANTS[_kernels.simd_level()]}, onnxruntime {ort.__version__}, "
          f"{args.threads} thread(s) each, {args.reps} rounds")
    print(f"{'model':<34} {'engine us':>10} {'ORT us':>10} {'ORT/engine':>10}")
    for name, path, feeds in cases:
        model = le.load(path)
        model.threads = args.threads
        sess = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        got, want = model.run(feeds), sess.run(None, feeds)
        for o, w in zip(sess.get_outputs(), want):
            np.testing.assert_allclose(got[o.name], w, rtol=1e-3, atol=1e-4, err_msg=f"{name}: {o.name}")
        runs = {"engine": lambda: model.run(feeds), "ort": lambda: sess.run(None, feeds)}
        times: dict[str, list[float]] = {k: [] for k in runs}
        n = max(1, int(0.05 / max(_once(runs["engine"]), 1e-6)))  # calls per round: ~50 ms
        for _ in range(args.reps):
            for k, fn in runs.items():
                t = time.perf_counter()
                for _ in range(n):
                    fn()
                times[k].append((time.perf_counter() - t) / n)
        e, o = statistics.median(times["engine"]), statistics.median(times["ort"])
        print(f"{name:<34} {e * 1e6:>10.1f} {o * 1e6:>10.1f} {o / e:>10.2f}")


def _once(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
