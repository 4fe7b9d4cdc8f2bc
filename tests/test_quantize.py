"""le.quantize: int8 / float16 / bfloat16 weights. Every product variant against the portable one and a
NumPy statement of the scheme; quantized models against their float source (tolerances per dtype) and
against the float engine on the same widened weights; sessions; the file round trip and hostile files."""
from __future__ import annotations

import json

import numpy as np
import pytest

import lstm_engine as le
from lstm_engine import _kernels
from lstm_engine.formats._safetensors import read_safetensors, write_safetensors

FORMATS = ("int8", "float16", "bfloat16")
# Max abs error of a layer's outputs (in [-1, 1]) against the float32 model, per stored dtype.
TOLERANCE = {"int8": 3e-2, "float16": 2e-3, "bfloat16": 2e-2}


def _int8(w, rng=None):
    scale = (np.abs(w).max(1) / 127).astype(np.float32)
    return np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8), scale


def _reference_int8(x, q, scale, bias):
    """The scheme in NumPy: x rows to symmetric int8 at max|row| / 127 (in float32, as the kernels round),
    exact integer products, dequantized."""
    amax = np.abs(x).max(1)
    xq = np.clip(np.rint(x * (np.float32(127) / amax)[:, None]), -127, 127)
    return (xq @ q.T.astype(np.float64)) * (amax.astype(np.float64) / 127)[:, None] * scale[None, :] + bias


SHAPES = [(1, 37, 19), (1, 1024, 256), (5, 64, 256), (70, 100, 513), (3, 16, 3)]


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_int8_products_match_portable_bit_for_bit_and_the_scheme(quant_variant, M, N, K):
    rng = np.random.default_rng(M * 1000 + N + K)
    w = rng.standard_normal((N, K)).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    q, s = _int8(w)
    pw = _kernels.PackedWeight("int8", q, s)
    got = _kernels.dense_packed(pw, x, b, np.empty((M, N), np.float32), 2)
    _kernels.set_quant_variant("portable")
    want = _kernels.dense_packed(pw, x, b, np.empty((M, N), np.float32), 1)
    assert np.array_equal(got, want)  # integer sums are exact: the same bits in every variant
    ref = _reference_int8(x, q, s, b)
    assert np.abs(got - ref).max() <= 2e-6 * max(1, np.abs(ref).max())


@pytest.mark.parametrize("fmt", ["float16", "bfloat16"])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_half_products_match_portable_and_float64(quant_variant, fmt, M, N, K):
    rng = np.random.default_rng(M + N * 7 + K)
    w = rng.standard_normal((N, K)).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float32)
    if fmt == "float16":
        bits = w.astype(np.float16).view(np.uint16)
        wide = w.astype(np.float16).astype(np.float64)
    else:
        u = w.view(np.uint32).astype(np.uint64)
        bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        wide = (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    pw = _kernels.PackedWeight(fmt, bits)
    got = _kernels.dense_packed(pw, x, None, np.empty((M, N), np.float32), 2)
    ref = x.astype(np.float64) @ wide.T
    assert np.abs(got - ref).max() <= 3e-6 * np.sqrt(K) * max(1, np.abs(ref).max())
    _kernels.set_quant_variant("portable")
    want = _kernels.dense_packed(pw, x, None, np.empty((M, N), np.float32), 1)
    assert np.abs(got - want).max() <= 3e-6 * np.sqrt(K) * max(1, np.abs(ref).max())


def test_rows_that_are_zero_or_not_finite():
    q, s = _int8(np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32))
    pw = _kernels.PackedWeight("int8", q, s)
    x = np.zeros((3, 8), np.float32)
    x[1, 2] = np.nan
    x[2, 5] = np.inf
    y = _kernels.dense_packed(pw, x, None, np.empty((3, 20), np.float32))
    assert np.array_equal(y[0], np.zeros(20))
    assert np.isnan(y[1:]).all()  # never a finite wrong number


@pytest.mark.parametrize("K", [1, 15, 16, 17, 100])
def test_int8_row_quantization_and_stores_match_portable_bit_for_bit(quant_variant, K):
    """Rows whose length is not a multiple of the vector width, with zero and non-finite rows, a bias,
    whole and partial panels (N = 37): every variant's quantization of the rows and store of the sums
    give the portable variant's bits."""
    rng = np.random.default_rng(K)
    q, s = _int8(rng.standard_normal((37, K)).astype(np.float32))
    pw = _kernels.PackedWeight("int8", q, s)
    x = (rng.standard_normal((9, K)) * np.logspace(-30, 30, 9)[:, None]).astype(np.float32)
    x[1] = 0
    x[2, K // 2] = np.inf
    x[3, K - 1] = np.nan
    x[4, 0] = 0.5 * (x[4, 0] > 0)  # a row whose extreme value quantizes to exactly 127 and others round
    b = rng.standard_normal(37).astype(np.float32)
    got = _kernels.dense_packed(pw, x, b, np.empty((9, 37), np.float32), 2)
    _kernels.set_quant_variant("portable")
    want = _kernels.dense_packed(pw, x, b, np.empty((9, 37), np.float32), 1)
    assert np.array_equal(got, want, equal_nan=True)
    assert np.isnan(got[2:4]).all() and np.array_equal(got[1], b)


@pytest.mark.parametrize("name", ["lstm-bi-2", "gru-bi", "lstm-proj", "lstm-dense"])
def test_int8_models_give_the_same_bits_in_every_variant(quant_variant, name):
    """The accumulating products of the recurrent steps (h . W_hh added to the input projection) too."""
    q = le.quantize(MODELS[name], "int8")
    got = q.forward(X, lengths=LENGTHS)[0]
    _kernels.set_quant_variant("portable")
    assert np.array_equal(got, q.forward(X, lengths=LENGTHS)[0])


def test_packed_weight_refuses_bad_input():
    q, s = _int8(np.ones((4, 4), np.float32))
    with pytest.raises(TypeError):
        _kernels.PackedWeight("int8", q.astype(np.int16), s)
    with pytest.raises(TypeError):
        _kernels.PackedWeight("int8", q, s.astype(np.float64))
    with pytest.raises(ValueError, match="finite"):
        _kernels.PackedWeight("int8", q, np.full(4, np.nan, np.float32))
    with pytest.raises(ValueError, match="-127"):
        _kernels.PackedWeight("int8", np.full((4, 4), -128, np.int8), s)
    with pytest.raises(ValueError, match="kind"):
        _kernels.PackedWeight("int4", q, s)


# -- models ------------------------------------------------------------------------------------

def torch_models():
    import torch

    torch.manual_seed(0)
    return {
        "lstm-bi-2": torch.nn.LSTM(12, 32, num_layers=2, batch_first=True, bidirectional=True),
        "lstm-proj": torch.nn.LSTM(12, 40, batch_first=True, proj_size=16),
        "gru-bi": torch.nn.GRU(12, 24, batch_first=True, bidirectional=True),
        "rnn-relu": torch.nn.RNN(12, 20, batch_first=True, nonlinearity="relu"),
    }


def engine_models():
    models = {name: le.from_torch(m) for name, m in torch_models().items()}
    r = np.random.default_rng(3).standard_normal
    models["gru-reset-before"] = le.Model([le.GRU(r((48, 12)) * 0.3, r((48, 16)) * 0.3, r(48), r(48),
                                                  reset_after=False)])
    models["lstm-dense"] = le.Model([le.LSTM(r((4 * 24, 12)) * 0.3, r((4 * 24, 24)) * 0.3, r(96), r(96)),
                                     le.Dense(r((7, 24)) * 0.3, r(7), activation="tanh")])
    return models


MODELS = engine_models()
X = np.random.default_rng(9).standard_normal((3, 11, 12)).astype(np.float32)
LENGTHS = [11, 4, 7]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_quantized_model_follows_its_float_source(name, fmt):
    model = MODELS[name]
    q = le.quantize(model, fmt)
    for lengths in (None, LENGTHS):
        y, state = model.forward(X, lengths=lengths)
        yq, state_q = q.forward(X, lengths=lengths)
        assert yq.shape == y.shape
        assert np.abs(yq - y).max() <= TOLERANCE[fmt], (name, fmt)
        for s, sq in zip(state, state_q):
            for a, b in zip(s, sq):
                assert np.abs(a - b).max() <= TOLERANCE[fmt] * 4  # c is not bounded by 1
        if lengths is not None:
            assert np.array_equal(yq[1, 4:] == 0, y[1, 4:] == 0)  # packed: zeros past a row's length as in float


@pytest.mark.parametrize("fmt", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_half_weights_compute_what_float32_computes_on_them(name, fmt):
    """The 16-bit model is the float32 engine on the widened weights, up to summation order."""
    q = le.quantize(MODELS[name], fmt)
    widened = le.Model([type(layer)(**layer.weights(), **layer.config()) for layer in q.layers])
    assert np.abs(q.forward(X, lengths=LENGTHS)[0] - widened.forward(X, lengths=LENGTHS)[0]).max() <= 2e-5


@pytest.mark.parametrize("fmt", FORMATS)
def test_sessions_step_as_forward_runs(fmt):
    q = le.quantize(MODELS["lstm-bi-2"].__class__([le.LSTM(**MODELS["lstm-dense"].layers[0].weights()),
                                                   MODELS["lstm-dense"].layers[1].__class__(
                                                       **MODELS["lstm-dense"].layers[1].weights(),
                                                       **MODELS["lstm-dense"].layers[1].config())]), fmt)
    y, _ = q.forward(X)
    s = q.session(3)
    steps = np.concatenate([s.step(X[:, t]) [:, None] for t in range(X.shape[1])], axis=1)
    assert np.abs(steps - y).max() <= 1e-6


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:torch.quantize_per_tensor:UserWarning")
def test_int8_error_is_no_worse_than_torch_quantize_dynamic():
    import torch

    tm = torch_models()["lstm-bi-2"]
    # quantize_dynamic swaps a container's children, never the module it is given
    qt = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(tm), {torch.nn.LSTM}, dtype=torch.qint8)
    assert isinstance(qt[0], torch.ao.nn.quantized.dynamic.LSTM)
    with torch.no_grad():
        ref = tm(torch.from_numpy(X))[0].numpy()
        theirs = qt(torch.from_numpy(X))[0].numpy()
    ours = le.quantize(le.from_torch(tm), "int8").forward(X)[0]
    assert np.abs(ours - ref).mean() <= np.abs(theirs - ref).mean() * 1.1


def test_token_model_with_quantized_embedding():
    r = np.random.default_rng(5).standard_normal
    m = le.Model([le.Embedding(r((50, 12))), le.LSTM(r((64, 12)) * 0.3, r((64, 16)) * 0.3),
                  le.Dense(r((50, 16)))])
    ids = np.random.default_rng(6).integers(0, 50, (2, 9))
    for fmt in FORMATS:
        q = le.quantize(m, fmt)
        assert q.layers[0].quantization.format == fmt
        assert np.abs(q.forward(ids)[0] - m.forward(ids)[0]).max() <= TOLERANCE[fmt] * 5


@pytest.mark.parametrize("fmt", FORMATS)
def test_masked_token_model_and_its_session(fmt):
    """Embedding(mask_zero) masks steps (Keras): the quantized model keeps the masks, in forward and in a session."""
    r = np.random.default_rng(7).standard_normal
    m = le.Model([le.Embedding(r((40, 12)), mask_zero=True),
                  le.GRU(r((48, 12)) * 0.3, r((48, 16)) * 0.3, r(48), r(48), reset_after=False),
                  le.Dense(r((40, 16)) * 0.3)])
    ids = np.random.default_rng(8).integers(0, 40, (3, 10))
    ids[1, 3:6] = 0
    q = le.quantize(m, fmt)
    y, yq = m.forward(ids)[0], q.forward(ids)[0]
    assert np.abs(yq - y).max() <= TOLERANCE[fmt] * 5
    assert np.array_equal(yq[1, 3:6], np.broadcast_to(yq[1, 2], (3, 40)))  # masked steps repeat the last output
    s = q.session(3)
    steps = np.stack([s.step(ids[:, t]) for t in range(ids.shape[1])], axis=1)
    assert np.abs(steps - yq).max() <= 1e-6


def test_options_keep_float_and_per_tensor():
    m = MODELS["lstm-dense"]
    q = le.quantize(m, "int8", keep_float=["Dense"])
    assert q.layers[0].quantization is not None and q.layers[1].quantization is None
    assert le.quantize(m, "int8", keep_float=[1]).layers[1].quantization is None
    assert le.quantize(m, "int8", keep_float="layers.0").layers[0].quantization is None
    pt = le.quantize(m, "int8", per_channel=False)
    s = pt.layers[0].quantization.scales["weight_ih"]
    assert np.all(s == s.flat[0]) and not pt.layers[0].quantization.per_channel
    assert np.abs(pt.forward(X)[0] - m.forward(X)[0]).max() <= 2 * TOLERANCE["int8"]
    # weights are kept once, as stored
    layer = q.layers[0]
    assert layer._weights["weight_ih"] is None and layer.quantization.stored["weight_ih"].dtype == np.int8
    assert np.array_equal(layer.weights()["weight_ih"], layer.quantization.dequantized()["weight_ih"])


def test_quantize_refuses_bad_arguments():
    m = MODELS["lstm-dense"]
    with pytest.raises(ValueError, match="dtype"):
        le.quantize(m, "int4")
    with pytest.raises(TypeError):
        le.quantize("model", "int8")
    with pytest.raises(ValueError, match="names no layer"):
        le.quantize(m, "int8", keep_float=["Conv"])
    with pytest.raises(ValueError, match="already"):
        le.quantize(le.quantize(m, "int8"), "float16")
    bad = le.Model([le.Dense(np.array([[np.inf, 1.0]]))])
    with pytest.raises(ValueError, match="non-finite"):
        le.quantize(bad, "int8")
    big = le.Model([le.Dense(np.array([[1e6, 1.0]]))])
    with pytest.raises(ValueError, match="float16"):
        le.quantize(big, "float16")


# -- files -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_file_round_trip_is_identical(tmp_path, fmt):
    q = le.quantize(MODELS["gru-reset-before"].__class__(
        [le.Embedding(np.random.default_rng(1).standard_normal((30, 12)))] + MODELS["gru-reset-before"].layers
        + [le.Dense(np.random.default_rng(2).standard_normal((5, 16)))]), fmt)
    path = tmp_path / "q.safetensors"
    le.save(q, path)
    tensors, meta = read_safetensors(path)
    assert meta["format_version"] == "3"  # 1: float chains, 2: float graphs
    assert json.loads(meta["architecture"])[1]["quantization"] == {"format": fmt, "per_channel": True}
    want = {"int8": np.int8, "float16": np.float32, "bfloat16": np.uint16}[fmt]  # F16 reads back widened
    assert tensors["layers.1.weight_ih"].dtype == want
    back = le.load(path)
    ids = np.random.default_rng(3).integers(0, 30, (2, 6))
    assert np.array_equal(back.forward(ids)[0], q.forward(ids)[0])
    assert [getattr(layer.quantization, "format", None) for layer in back.layers] == [fmt, fmt, fmt]


def test_float_files_keep_their_version(tmp_path):
    le.save(MODELS["lstm-dense"], tmp_path / "f.safetensors")
    assert read_safetensors(tmp_path / "f.safetensors")[1]["format_version"] == "1"


def _hostile(tmp_path, change, fmt="int8"):
    path = tmp_path / "q.safetensors"
    le.save(le.quantize(MODELS["lstm-dense"], fmt), path)
    tensors, meta = read_safetensors(path)
    change(tensors, meta)
    write_safetensors(path, tensors, meta)
    return path


def _arch(meta, fn):
    arch = json.loads(meta["architecture"])
    fn(arch)
    meta["architecture"] = json.dumps(arch)


HOSTILE = {
    "nan scale": (lambda t, m: t["layers.0.weight_ih_scale"].__setitem__((0, 3), np.nan), "scale"),
    "negative scale": (lambda t, m: t["layers.1.weight_scale"].__setitem__(2, -1.0), "scale"),
    "inf scale": (lambda t, m: t["layers.0.weight_hh_scale"].__setitem__((0, 0), np.inf), "scale"),
    "float64 scale": (lambda t, m: t.__setitem__("layers.0.weight_ih_scale",
                                                 t["layers.0.weight_ih_scale"].astype(np.float64)), "F32"),
    "float weight": (lambda t, m: t.__setitem__("layers.0.weight_ih", t["layers.0.weight_ih"].astype(np.float32)),
                     "I8"),
    "truncated int8": (lambda t, m: t.__setitem__("layers.0.weight_hh", t["layers.0.weight_hh"][:, :-3]), "shape"),
    "short rows": (lambda t, m: t.__setitem__("layers.1.weight", t["layers.1.weight"][:, :-1].copy()), "features"),
    "missing scale": (lambda t, m: t.pop("layers.1.weight_scale"), "missing"),
    "stray scale": (lambda t, m: t.__setitem__("layers.1.bias_scale", np.ones(7, np.float32)), "scale of no"),
    "-128": (lambda t, m: t["layers.1.weight"].__setitem__((0, 0), -128), "-127"),
    "unknown format": (lambda t, m: _arch(m, lambda a: a[0].__setitem__("quantization", {"format": "int4",
                                                                                          "per_channel": True})),
                       "quantization"),
    "quantized in version 1": (lambda t, m: m.__setitem__("format_version", "1"), "version 1"),
    "quantized in version 2": (lambda t, m: m.__setitem__("format_version", "2"), "version 2|graph"),
    "future version": (lambda t, m: m.__setitem__("format_version", "4"), "upgrade"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_quantized_files_raise_load_error(tmp_path, case):
    change, match = HOSTILE[case]
    path = _hostile(tmp_path, change)
    with pytest.raises(le.LoadError, match=match):
        le.load(path)


def test_hostile_half_files(tmp_path):
    def inf16(t, m):
        t["layers.0.weight_ih"][0, 0, 0] = 1e6  # not a float16 value
    with pytest.raises(le.LoadError, match="float16"):
        le.load(_hostile(tmp_path, inf16, "float16"))

    def infbf(t, m):
        t["layers.0.weight_ih"][0, 0, 0] = 0x7F80
    with pytest.raises(le.LoadError, match="bfloat16"):
        le.load(_hostile(tmp_path, infbf, "bfloat16"))

    def wrong(t, m):
        t["layers.0.weight_ih"] = t["layers.0.weight_ih"].astype(np.int8)
    with pytest.raises(le.LoadError, match="U16"):
        le.load(_hostile(tmp_path, wrong, "bfloat16"))


# -- the command line --------------------------------------------------------------------------

def test_cli_quantize_inspect_and_verify(tmp_path):
    import os
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "lstm_engine.cli", *map(str, args)], capture_output=True,
                              text=True, timeout=240)

    src = tmp_path / "float.safetensors"
    out = tmp_path / "int8.safetensors"
    le.save(MODELS["lstm-dense"], src)
    r = cli("quantize", src, out, "--dtype", "int8", "--keep-float", "Dense")
    assert r.returncode == 0, r.stderr
    assert "layers.0 LSTM: int8" in r.stdout and "layers.1 Dense: float32" in r.stdout
    assert os.path.getsize(out) < os.path.getsize(src)
    back = le.load(out)
    assert back.layers[0].quantization.format == "int8" and back.layers[1].quantization is None
    r = cli("inspect", out)
    assert r.returncode == 0 and "int8 per-channel" in r.stdout and "format version 3" in r.stdout
    r = cli("verify", out, "--source", src, "--atol", "0.05")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "against" in r.stdout and "mean abs" in r.stdout
    r = cli("verify", out, "--source", src)  # default --atol 1e-4: the quantization error shows
    assert r.returncode == 1 and "FAILED" in r.stdout
    r = cli("verify", out)  # round trip only (exact); without a source verify says NOT CHECKED, status 2
    assert r.returncode == 2 and "compare with the float model" in r.stdout and "max abs  0.00e+00" in r.stdout
    r = cli("quantize", src, out, "--dtype", "int8", "--keep-float", "Conv")
    assert r.returncode == 1 and "names no layer" in r.stderr


# -- graph models ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_graph_model_quantized_runs_saves_and_loads(tmp_path, fmt):
    """A graph (Recurrent node, Gemm head on the last step): its layers quantized, the glue ops unchanged."""
    from lstm_engine.graph import Graph, Node, ValueInfo

    r = np.random.default_rng(11).standard_normal
    layer = le.LSTM(r((32, 5)) * 0.4, r((32, 8)) * 0.4, r(32), r(32))
    nodes = [Node("Recurrent", ["x", "", "", ""], ["out", "h_n", "c_n"], {"layer": 0}, "lstm"),
             Node("Gather", ["out", "last"], ["last_out"], {"axis": 1}, "getitem"),
             Node("Gemm", ["last_out", "w", "b"], ["y"], {"transB": 1}, "fc")]
    consts = {"last": np.array(-1, np.int64), "w": r((3, 8)).astype(np.float32), "b": r(3).astype(np.float32)}
    model = le.Model(Graph([ValueInfo("x", "float", ["batch", "steps", 5])], ["y"], nodes, consts, [layer]))
    q = le.quantize(model, fmt)
    assert not q.is_chain and q.layers[0].quantization.format == fmt
    x = np.random.default_rng(12).standard_normal((4, 7, 5)).astype(np.float32)
    y, yq = model.forward(x)[0], q.forward(x)[0]
    assert np.abs(yq - y).max() <= TOLERANCE[fmt] * 5 and np.abs(yq - y).max() > 0
    le.save(q, tmp_path / "g.safetensors")
    meta = read_safetensors(tmp_path / "g.safetensors")[1]
    assert meta["format_version"] == "3" and "graph" in meta
    back = le.load(tmp_path / "g.safetensors")
    assert np.array_equal(back.forward(x)[0], yq)


def test_pool_streams_of_a_quantized_model_match_forward():
    import threading

    r = np.random.default_rng(0).standard_normal
    m = le.Model([le.Embedding(r((30, 8))), le.LSTM(r((64, 8)) * 0.3, r((64, 16)) * 0.3, r(64), r(64)),
                  le.Dense(r((30, 16)))])
    q = le.quantize(m, "int8")
    ids = np.random.default_rng(1).integers(0, 30, (4, 6))
    want = q.forward(ids)[0]
    pool = q.pool(max_batch=8)
    out = np.zeros_like(want)

    def run(b):
        s = pool.open()
        for t in range(ids.shape[1]):
            out[b, t] = s.step(np.array(ids[b, t]))

    threads = [threading.Thread(target=run, args=(b,)) for b in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert np.abs(out - want).max() <= 1e-6  # batched rows quantized one by one: the same as alone
