"""lstm_engine against PyTorch and ONNX Runtime on the issue's workloads, timed interleaved in one run.

    python benches/peers.py [--only NAME ...] [--reps N] [--threads N] [--no-footprint] [--quantized]

Every workload is built in the three systems from the same weights (workloads.py), the outputs are checked
equal (streaming ones over several carried steps), then each system is timed in turn, round after round, so
drift on a shared machine hits them alike. Prints the CPU (model, flags) and the engine's kernel variant, this
machine's NumPy sgemm (2048^3) on the same threads, median microseconds per call, the ratios to the best peer
and the targets, and the fraction of that sgemm each system reaches on the batched workloads. For batch-1
workloads it prints their floor: the time to read, on the same threads, the weights a call reads
(benches/read_floor.c, built with the system's cc) — no engine can step faster, whatever the target says —
and for batched ones the FMA peak (benches/peak_flops.c): no GEMM runs faster, and each "× best peer" target is
set against it. On an AVX-512 CPU the engine
also runs with its AVX2 variant forced, in the same rounds (the column `lstm_engine[avx2]`); that column
sets the engine's AVX2 code against AVX-512 peers. --isa avx2 runs the whole table as on an AVX2-only CPU
where the libraries allow it: the engine (LSTM_ENGINE_KERNELS), PyTorch (ATEN_CPU_CAPABILITY,
ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS) and NumPy's sgemm (OPENBLAS_CORETYPE) are held to AVX2; ONNX
Runtime has no such switch (MLAS picks its kernels from CPUID), so its figures stay AVX-512's.
--quantized adds the engine's int8/float16/bfloat16 models against PyTorch's and ONNX Runtime's
quantize_dynamic on the same weights, timed interleaved with the float32 ones.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads as wl  # noqa: E402

# Issue 12's targets: (peer, ratio) pairs; 'faster' is whichever peer was faster in this run.
TARGETS = {
    "stream-tiny": [("onnxruntime", 0.15)],
    "stream": [("onnxruntime", 0.4)],
    "stream-gru": [("onnxruntime", 0.4)],
    "sequence": [("faster", 0.8)],
    "batch": [("faster", 0.85)],
    "batch-large": [("faster", 0.85)],
    "token-lm": [("torch", 0.15)],
    "pool-step": [],
}
# ... and the fraction of this machine's sgemm (NumPy 2048^3, same threads, same run) the engine must reach.
SGEMM_TARGETS = {"batch": 0.85, "pool-step": 0.6}


def target_peer(peer: str, row: dict) -> str:
    """The system a target names: 'faster' is whichever peer was faster in this row."""
    if peer != "faster":
        return peer
    return "torch" if row["torch"] < row["onnxruntime"] else "onnxruntime"


LABEL = {"torch": "PyTorch", "onnxruntime": "ORT"}
SETTLE_S = 0.2
# What holds each library to AVX2 for --isa avx2; each is read when the library loads, so they are set
# before this script starts again.
AVX2_ONLY = {"LSTM_ENGINE_KERNELS": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2", "OPENBLAS_CORETYPE": "Haswell"}


# -- PyTorch ----------------------------------------------------------------------------------
def torch_runner(w: wl.Workload, weights: dict, quantized: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """quantized: torch.ao.quantization.quantize_dynamic (int8 weights, FBGEMM) on the recurrent layers and head."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            rnn = nn.LSTM if w.cell == "lstm" else nn.GRU
            self.embedding = nn.Embedding(w.vocab, w.input_size) if w.vocab else None
            self.rnn = rnn(w.input_size, w.hidden_size, num_layers=w.num_layers, batch_first=True)
            self.head = nn.Linear(w.hidden_size, w.vocab) if w.vocab else None

        def forward(self, x, state=None):
            if self.embedding is not None:
                x = self.embedding(x)
            y, state = self.rnn(x, state)
            if self.head is not None:
                y = self.head(y)
            return y, state

    net = Net().eval()
    with torch.no_grad():
        for k, (w_ih, w_hh, b_ih, b_hh) in enumerate(weights["layers"]):
            for name, value in (("weight_ih", w_ih), ("weight_hh", w_hh), ("bias_ih", b_ih), ("bias_hh", b_hh)):
                getattr(net.rnn, f"{name}_l{k}").copy_(torch.from_numpy(value))
        if w.vocab:
            net.embedding.weight.copy_(torch.from_numpy(weights["embedding"]))
            net.head.weight.copy_(torch.from_numpy(weights["head"][0]))
            net.head.bias.copy_(torch.from_numpy(weights["head"][1]))
    if quantized:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
            net = torch.ao.quantization.quantize_dynamic(net, {nn.LSTM, nn.GRU, nn.Linear}, dtype=torch.qint8)
    state = None

    def run(x: np.ndarray) -> np.ndarray:
        nonlocal state
        with torch.inference_mode():
            y, new_state = net(torch.from_numpy(x), state)
        if w.stateful:
            state = new_state
            return y[:, 0].numpy()
        return y.numpy()

    return run


# -- ONNX Runtime -----------------------------------------------------------------------------
def onnx_model(w: wl.Workload, weights: dict):
    """A graph of the workload: batch-major in and out like the others, weights in ONNX gate order."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    H = w.hidden_size
    # ONNX orders LSTM gates i, o, f, c and GRU gates z, r, h; PyTorch i, f, g, o and r, z, n.
    order = [0, 3, 1, 2] if w.cell == "lstm" else [1, 0, 2]

    def reorder(a: np.ndarray) -> np.ndarray:
        return np.concatenate([a[g * H:(g + 1) * H] for g in order])

    nodes, inits, inputs, outputs = [], [], [], []
    B = w.batch
    if w.vocab:
        inputs.append(helper.make_tensor_value_info("x", TensorProto.INT64, [B, w.steps]))
        inits.append(numpy_helper.from_array(weights["embedding"], "emb"))
        nodes.append(helper.make_node("Gather", ["emb", "x"], ["xe"]))
        cur = "xe"
    else:
        inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, w.steps, w.input_size]))
        cur = "x"
    # ONNX's recurrent ops are time-major; with one row the two layouts are the same bytes.
    if B == 1:
        inits.append(numpy_helper.from_array(np.array([w.steps, B, -1], np.int64), "tmajor"))
        nodes.append(helper.make_node("Reshape", [cur, "tmajor"], ["x_t"]))
    else:
        nodes.append(helper.make_node("Transpose", [cur], ["x_t"], perm=[1, 0, 2]))
    cur = "x_t"
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "axis1"))
    for k, (w_ih, w_hh, b_ih, b_hh) in enumerate(weights["layers"]):
        inits += [numpy_helper.from_array(reorder(w_ih)[None], f"W{k}"),
                  numpy_helper.from_array(reorder(w_hh)[None], f"R{k}"),
                  numpy_helper.from_array(np.concatenate([reorder(b_ih), reorder(b_hh)])[None], f"B{k}")]
        state_in, state_out = [""], ["", ""]
        if w.stateful:
            names = ["h", "c"] if w.cell == "lstm" else ["h"]
            for n in names:
                inputs.append(helper.make_tensor_value_info(f"{n}{k}", TensorProto.FLOAT, [1, B, H]))
                outputs.append(helper.make_tensor_value_info(f"{n}{k}_out", TensorProto.FLOAT, [1, B, H]))
            state_in = [f"{n}{k}" for n in names]
            state_out = [f"{n}{k}_out" for n in names]
        op, extra = ("LSTM", {}) if w.cell == "lstm" else ("GRU", {"linear_before_reset": 1})
        nodes.append(helper.make_node(op, [cur, f"W{k}", f"R{k}", f"B{k}", ""] + state_in,
                                      [f"Y{k}"] + state_out, hidden_size=H, **extra))
        nodes.append(helper.make_node("Squeeze", [f"Y{k}", "axis1"], [f"Y{k}s"]))
        cur = f"Y{k}s"
    if w.vocab:
        inits += [numpy_helper.from_array(np.ascontiguousarray(weights["head"][0].T), "Wo"),
                  numpy_helper.from_array(weights["head"][1], "bo")]
        nodes += [helper.make_node("MatMul", [cur, "Wo"], ["logits_nb"]),
                  helper.make_node("Add", ["logits_nb", "bo"], ["logits"])]
        cur, width = "logits", w.vocab
    else:
        width = H
    if B == 1:
        inits.append(numpy_helper.from_array(np.array([B, w.steps, width], np.int64), "bmajor"))
        nodes.append(helper.make_node("Reshape", [cur, "bmajor"], ["y"]))
    else:
        nodes.append(helper.make_node("Transpose", [cur], ["y"], perm=[1, 0, 2]))
    outputs.insert(0, helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, w.steps, width]))
    graph = helper.make_graph(nodes, w.name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def ort_runner(w: wl.Workload, weights: dict, threads: int, quantized: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """quantized: onnxruntime.quantization.quantize_dynamic, per-channel int8 (LSTM becomes DynamicQuantizeLSTM)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    graph = onnx_model(w, weights).SerializeToString()
    if quantized:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with tempfile.TemporaryDirectory() as tmp:
            src, dst = os.path.join(tmp, "f.onnx"), os.path.join(tmp, "q.onnx")
            with open(src, "wb") as f:
                f.write(graph)
            import logging

            logging.disable(logging.WARNING)  # its advice to pre-process the graph, printed on every call
            try:
                quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True)
            finally:
                logging.disable(logging.NOTSET)
            with open(dst, "rb") as f:
                graph = f.read()
    sess = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    state_names = [i.name for i in sess.get_inputs()][1:]
    state = {n: np.zeros((1, w.batch, w.hidden_size), np.float32) for n in state_names}

    def run(x: np.ndarray) -> np.ndarray:
        res = sess.run(names, {"x": x, **state})
        if w.stateful:
            state.update(zip(state_names, res[1:]))
            return res[0][:, 0]
        return res[0]

    return run


# -- checking and timing ----------------------------------------------------------------------
def check(w: wl.Workload, runners: dict, inputs: list[np.ndarray]) -> float:
    """Largest difference to PyTorch over consecutive calls (state carried for streaming workloads)."""
    ref = [runners["torch"](x) for x in inputs]
    worst = 0.0
    for name, run in runners.items():
        if name == "torch":
            continue
        for x, r in zip(inputs, ref):
            out = run(x)
            if out.shape != r.shape:
                raise AssertionError(f"{w.name}: {name} gives shape {out.shape}, torch {r.shape}")
            worst = max(worst, float(np.abs(out - r).max()))
    if worst > 1e-4:
        raise AssertionError(f"{w.name}: outputs differ from torch by {worst:.2e}")
    return worst


def calibrate(fn: Callable[[], object], budget: float) -> int:
    """Calls per timed block so that one block takes about `budget` seconds."""
    fn()
    n, elapsed = 1, 0.0
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        elapsed = time.perf_counter() - t0
        if elapsed > budget / 4 or n > 1 << 20:
            return max(1, int(n * budget / max(elapsed, 1e-9)))
        n *= 4


def time_interleaved(calls: dict[str, Callable[[], object]], reps: int, budget: float) -> dict[str, float]:
    """Median microseconds per call of each system, timing them in turn `reps` times."""
    counts = {k: calibrate(f, budget) for k, f in calls.items()}
    samples: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(reps):
        for k, f in calls.items():
            n = counts[k]
            # Untimed quiet first: the previous system's threads (PyTorch's OpenMP, ORT's pool) keep
            # spinning after its calls, and on 2 cores they took the next system's: token-lm measured
            # 4 ms alone and 32 ms right after ORT's block in one run.
            time.sleep(SETTLE_S)
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            samples[k].append((time.perf_counter() - t0) / n * 1e6)
    return {k: statistics.median(v) for k, v in samples.items()}


def machine_sgemm(threads: int, n: int = 2048) -> float:
    """GFLOP/s of NumPy's sgemm n x n x n on `threads` threads (best of 5)."""
    from threadpoolctl import threadpool_limits

    a = np.random.default_rng(0).standard_normal((n, n), np.float32)
    c = np.empty_like(a)
    with threadpool_limits(threads):
        np.matmul(a, a, out=c)
        best = min(_timed(lambda: np.matmul(a, a, out=c)) for _ in range(5))
    return 2 * n**3 / best / 1e9


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# -- footprint --------------------------------------------------------------------------------
def _child(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout


def import_time(reps: int = 7) -> tuple[float, float]:
    """Median seconds of `import lstm_engine` in a fresh interpreter, and of `import numpy, scipy` alone."""
    code = ("import time; t = time.perf_counter(); import {}; print(time.perf_counter() - t)")
    engine = statistics.median(float(_child(code.format("lstm_engine"))) for _ in range(reps))
    base = statistics.median(float(_child(code.format("numpy, scipy"))) for _ in range(reps))
    return engine, base


def resident_memory(w: wl.Workload, weights: dict) -> tuple[float, float]:
    """(MB of resident memory a loaded model adds over a Python with numpy and scipy, MB of its weights)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "w.npz")
        flat = {f"l{k}_{i}": a for k, lw in enumerate(weights["layers"]) for i, a in enumerate(lw)}
        if weights["embedding"] is not None:
            flat["emb"] = weights["embedding"]
            flat["head_w"], flat["head_b"] = weights["head"]
        np.savez(path, **flat)
        size = sum(a.nbytes for a in flat.values()) / 2**20
        code = f"""
import numpy, scipy, sys
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
base = rss()
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
import workloads as wl
f = numpy.load({path!r})
n = {w.num_layers}
weights = {{'layers': [tuple(f[f'l{{k}}_{{i}}'] for i in range(4)) for k in range(n)],
           'embedding': f['emb'] if 'emb' in f else None,
           'head': (f['head_w'], f['head_b']) if 'emb' in f else None}}
model = wl.engine_model(wl.BY_NAME[{w.name!r}], weights)
del weights, f
model.forward(wl.make_inputs(wl.BY_NAME[{w.name!r}])[0])
print(rss() - base)
"""
        return float(_child(code)), size


# -- quantized ----------------------------------------------------------------------------------
QUANT_WORKLOADS = ("stream", "stream-gru", "batch", "token-lm")
# (numerator, denominator, limit) from issue 13; "torch-q"/"ort-q" are the peers' quantize_dynamic models.
QUANT_TARGETS = {
    "token-lm": [("int8", "float32", 0.4), ("int8", "torch-q", 0.3), ("float16", "float32", 0.65),
                 ("bfloat16", "float32", 0.65)],
    "stream": [("int8", "float32", 0.6), ("int8", "ort-q", 0.5)],
    "batch": [("int8", "float32", 0.7)],
    "stream-gru": [],
}


def quantized_rows(args, chosen: list) -> None:
    """The engine's float32, int8, float16, bfloat16 models and the peers' quantize_dynamic ones, interleaved."""
    import lstm_engine as le

    info = le.cpu_info()
    print()
    print(f"quantized: product variant {info['quantized_variant']}, float32 variant {info['variant']}")
    print("| workload | engine f32 µs | int8 | float16 | bfloat16 | torch qd int8 | ORT qd int8 | targets |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for w in chosen:
        if w.name not in QUANT_WORKLOADS:
            continue
        weights = wl.make_weights(w)
        model = wl.engine_model(w, weights)
        runners = {"float32": wl.engine_runner(w, model)}
        for fmt in ("int8", "float16", "bfloat16"):
            runners[fmt] = wl.engine_runner(w, le.quantize(model, fmt))
        runners["torch-q"] = torch_runner(w, weights, quantized=True)
        if w.cell == "lstm" and not w.vocab:  # ORT quantizes LSTM (DynamicQuantizeLSTM), never GRU
            runners["ort-q"] = ort_runner(w, weights, args.threads, quantized=True)
        x = wl.make_inputs(w)[0]
        ref = runners["float32"](x)
        for name, run in runners.items():  # one call each, and a sanity bound on the quantization error
            err = float(np.abs(run(x) - ref).max())
            if err > 0.5:
                raise AssertionError(f"{w.name}: {name} differs from the engine's float32 by {err:.2e}")
        med = time_interleaved({k: (lambda run=run: run(x)) for k, run in runners.items()}, args.reps,
                               0.05 if w.stateful else 0.3)
        verdicts = "; ".join(f"{a}/{b} {med[a] / med[b]:.2f} ≤ {lim} {'met' if med[a] / med[b] <= lim else 'MISSED'}"
                             for a, b, lim in QUANT_TARGETS[w.name] if b in med)
        cell = lambda k: f"{med[k]:,.1f} ({med[k] / med['float32']:.2f}×)" if k in med else "–"  # noqa: E731
        floor = call_floor(w, args.threads, itemsize=1) if w.batch == 1 else None
        if floor:
            verdicts = "; ".join(filter(None, [verdicts, f"int8 floor {floor:,.1f} µs = "
                                                         f"{floor / med['torch-q']:.2f} × torch qd"]))
        print(f"| {w.name} | {med['float32']:,.1f} | {cell('int8')} | {cell('float16')} | {cell('bfloat16')} | "
              f"{cell('torch-q')} | {cell('ort-q')} | {verdicts} |", flush=True)


# -- the floor of memory-bound calls, the ceiling of compute-bound ones ---------------------------
_BUILT: dict = {}


def _c_tool(name: str) -> Path | None:
    """benches/<name>.c compiled with the system's cc for the engine's kernel variant (AVX-512 or AVX2
    loads and FMAs), once per run; None without a compiler."""
    import lstm_engine as le

    if name not in _BUILT:
        exe = Path(tempfile.mkdtemp()) / name
        isa = ["-mavx512f"] if le.cpu_info()["variant"] == "avx512" else ["-mavx2", "-mfma"]
        built = subprocess.run(["cc", "-O2", *isa, "-pthread", str(Path(__file__).parent / f"{name}.c"),
                                "-o", str(exe)], capture_output=True)
        _BUILT[name] = exe if built.returncode == 0 else None
    return _BUILT[name]


def _run_c_tool(name: str, *args: object) -> float | None:
    exe = _c_tool(name)
    if exe is None:
        return None
    out = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True)
    return float(out.stdout) if out.returncode == 0 else None


def read_floor(nbytes: int, threads: int) -> float | None:
    """Best µs to read nbytes once with `threads` threads (benches/read_floor.c), or None without a compiler."""
    return 0.0 if nbytes <= 0 else _run_c_tool("read_floor", nbytes, threads)


def fma_peak(threads: int) -> float | None:
    """The most GFLOP/s of float32 FMAs `threads` threads issue (benches/peak_flops.c): no GEMM beats it."""
    return _run_c_tool("peak_flops", threads)


def call_floor(w: wl.Workload, threads: int, itemsize: int = 4) -> float | None:
    """The floor of one batch-1 call: its steps each read the recurrent weights, and the rest once."""
    every, once = w.weight_bytes(itemsize)
    parts = [read_floor(every, threads), read_floor(once, threads)]
    return None if None in parts else w.steps * parts[0] + parts[1]


# -- main -------------------------------------------------------------------------------------
def machine() -> str:
    fields: dict[str, str] = {}
    try:
        for line in open("/proc/cpuinfo"):
            if not line.strip():
                break  # the first CPU is enough
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        pass
    cpu = f"{fields.get('model name', 'unknown CPU')} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')})"
    flags = set(fields.get("flags", "").split())
    wanted = ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16",
              "avx512_fp16", "amx_tile"]
    have = " ".join(f for f in wanted if f in flags) or "none of " + " ".join(wanted)
    return f"{cpu}, {os.cpu_count()} cores; flags: {have}; Python {platform.python_version()}"


def with_variant(run: Callable[[np.ndarray], np.ndarray], variant: str) -> Callable[[np.ndarray], np.ndarray]:
    """run with the engine's kernels forced to `variant` for the call (the bench is single-threaded)."""
    from lstm_engine import _kernels

    level = _kernels.VARIANTS.index(variant)

    def forced(x: np.ndarray) -> np.ndarray:
        _kernels.set_simd_level(level)
        try:
            return run(x)
        finally:
            _kernels.set_simd_level(-1)

    return forced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="workload names")
    parser.add_argument("--reps", type=int, default=7, help="timed rounds per system")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-footprint", action="store_true", help="skip import time and memory")
    parser.add_argument("--quantized", action="store_true", help="also time int8/float16/bfloat16 models and the "
                        "peers' quantize_dynamic ones")
    parser.add_argument("--isa", choices=["native", "avx2"], default="native",
                        help="avx2: hold the engine, PyTorch and NumPy to AVX2 (ONNX Runtime cannot be)")
    args = parser.parse_args()
    if args.isa == "avx2" and any(os.environ.get(k) != v for k, v in AVX2_ONLY.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ONLY})

    import onnxruntime
    import torch
    from threadpoolctl import threadpool_info

    import lstm_engine as le

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    blas = sorted({f"{i['internal_api']} {i.get('version')} {i.get('architecture')} x{i['num_threads']}"
                   for i in threadpool_info()})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "src", "setup.py"], capture_output=True, text=True,
                           cwd=Path(__file__).parent).stdout.strip()
    print(f"{time.strftime('%Y-%m-%d %H:%M')}  commit {commit}{' (+ uncommitted changes)' if dirty else ''}")
    print(f"{machine()}; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
          f"lstm_engine {le.__version__}; {args.threads} threads; BLAS: {'; '.join(blas)}")
    env = {k: os.environ[k] for k in ("OPENBLAS_L2_SIZE", *AVX2_ONLY) if k in os.environ}
    if env:
        print(f"environment: {env}")
    if args.isa == "avx2":
        print("held to AVX2: lstm_engine, PyTorch, NumPy's sgemm; ONNX Runtime runs its AVX-512 kernels (no switch)")

    info = le.cpu_info()
    print(f"lstm_engine kernels: {info['variant']} ({info['reason']}); default threads {info['threads']} "
          f"({info['threads_reason']}); load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    peak = machine_sgemm(args.threads)
    print(f"this machine's sgemm (NumPy, 2048^3, {args.threads} threads): {peak:.1f} GFLOP/s")
    # On an AVX-512 machine the AVX2 variant runs too, forced, in the same rounds: the figures of
    # an AVX2-only CPU of the same speed.
    engines = ["lstm_engine"] + (["lstm_engine[avx2]"] if info["variant"] == "avx512" else [])

    chosen = [w for w in wl.WORKLOADS if not args.only or w.name in args.only]
    rows = []
    for w in chosen:
        weights = wl.make_weights(w)
        # The engine on the same threads as the peers (its default is every core it may use).
        runners = {"lstm_engine": wl.engine_runner(w, wl.engine_model(w, weights, threads=args.threads))}
        if len(engines) > 1:
            runners["lstm_engine[avx2]"] = with_variant(
                wl.engine_runner(w, wl.engine_model(w, weights, threads=args.threads)), "avx2")
        runners["torch"] = torch_runner(w, weights)
        runners["onnxruntime"] = ort_runner(w, weights, args.threads)
        inputs = wl.make_inputs(w, calls=4 if w.stateful else 1)
        err = check(w, runners, inputs)
        x = inputs[0]
        budget = 0.05 if w.stateful else 0.3
        calls = {k: (lambda run=run: run(x)) for k, run in runners.items()}
        med = time_interleaved(calls, args.reps, budget)
        rows.append({"w": w, "err": err, **med})
        print(f"  {w.name}: " + ", ".join(f"{k} {v:.1f} us" for k, v in med.items()), flush=True)

    print()
    head = " | ".join(f"{e} µs" for e in engines)
    ratios = " | ".join(f"{e} / best peer" for e in engines)
    print(f"| workload | {head} | PyTorch µs | ONNX Runtime µs | {ratios} | target | met ({', '.join(engines)}) |")
    print("| --- " * (5 + 2 * len(engines)) + "|")
    for r in rows:
        w, t, o = r["w"], r["torch"], r["onnxruntime"]
        best = min(t, o)
        targets, met = [], []
        for peer, limit in TARGETS[w.name]:
            name = target_peer(peer, r)
            targets.append(f"≤ {limit} × {LABEL[name]}{' (faster)' if peer == 'faster' else ''}")
            met.append("/".join("met" if r[e] / r[name] <= limit else "MISSED" for e in engines))
        if w.name in SGEMM_TARGETS:
            targets.append(f"≥ {SGEMM_TARGETS[w.name]:.0%} of sgemm")
            met.append("/".join("met" if w.flops() / r[e] / 1e3 >= SGEMM_TARGETS[w.name] * peak else "MISSED"
                                for e in engines))
        times = " | ".join(f"{r[e]:,.1f}" for e in engines)
        rel = " | ".join(f"{r[e] / best:.3f} ({'PyTorch' if t < o else 'ORT'})" for e in engines)
        print(f"| {w.name} | {times} | {t:,.1f} | {o:,.1f} | {rel} | {'; '.join(targets) or '–'} | "
              f"{'; '.join(met) or '–'} |")
    big = [r for r in rows if r["w"].batch > 1]
    if big:
        print()
        fma = fma_peak(args.threads)
        systems = engines + ["torch", "onnxruntime"]
        print("| workload | " + " | ".join(f"{LABEL.get(k, k)} GFLOP/s (of sgemm {peak:.0f})" for k in systems)
              + " |")
        print("| --- " * (1 + len(systems)) + "|")
        for r in big:
            f = r["w"].flops() / 1e3  # per µs -> GFLOP/s
            print(f"| {r['w'].name} | " + " | ".join(f"{f / r[k]:.1f} ({f / r[k] / peak:.0%})" for k in systems) + " |")
        if fma:
            # What a "× best peer" target asks, set against what the cores can issue at all.
            asks = []
            for r in big:
                for peer, limit in TARGETS[r["w"].name]:
                    name = target_peer(peer, r)
                    need = r["w"].flops() / 1e3 / (limit * r[name])
                    asks.append(f"{r['w'].name} ≤ {limit} × {LABEL[name]} asks {need:.0f} GFLOP/s = {need / fma:.0%}")
            print(f"FMA peak (peak_flops.c, {args.threads} threads, {'AVX-512' if info['variant'] == 'avx512' else 'AVX2'}"
                  f" FMAs on registers alone): {fma:.1f} GFLOP/s; NumPy's sgemm reaches {peak / fma:.0%} of it"
                  + (f"; {', '.join(asks)} of it" if asks else ""))
    floors = [(r, call_floor(r["w"], args.threads)) for r in rows if r["w"].batch == 1]
    if floors and floors[0][1] is not None:
        print()
        print(f"floor: reading the weights a call reads once per step, {args.threads} threads (read_floor.c): "
              + ", ".join(f"{r['w'].name} {f:,.1f} µs = {f / min(r['torch'], r['onnxruntime']):.2f} × best peer"
                          for r, f in floors))
    print()
    print("max |output - PyTorch|: " + ", ".join(f"{r['w'].name} {r['err']:.1e}" for r in rows))
    if args.quantized:
        quantized_rows(args, chosen)
    print(f"load average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")

    if not args.no_footprint:
        engine, base = import_time()
        print()
        print(f"import lstm_engine: {engine:.3f} s in a fresh interpreter (import numpy, scipy alone: {base:.3f} s); "
              f"target ≤ 0.3 s: {'met' if engine <= 0.3 else 'MISSED'}")
        w = wl.BY_NAME["token-lm"]
        extra, size = resident_memory(w, wl.make_weights(w))
        print(f"resident memory of a loaded {w.name} model over numpy+scipy: {extra:.1f} MB for {size:.1f} MB of "
              f"weights; target ≤ weights + 20 MB: {'met' if extra <= size + 20 else 'MISSED'}")


if __name__ == "__main__":
    main()
