"""Models that travel as weights (pickle = the engine's own file bytes), bytes in and out of save/load,
threads sized to the worker, and a core that never imports Dask or Ray."""
from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from test_native import full_model

import lstm_engine as le
from lstm_engine import _threads
from lstm_engine.formats import native


def torch_lstm_model(dtype=np.float32):
    rng = np.random.default_rng(3)
    r = rng.standard_normal
    return le.Model([
        le.LSTM(r((2, 32, 5)) * 0.3, r((2, 32, 8)) * 0.3, r((2, 32)), r((2, 32)), dtype=dtype),
        le.Dense(r((3, 16)), r(3), dtype=dtype),
    ])


@pytest.mark.parametrize("dtype", [np.float32, np.float64, (np.float32, np.float64)])
def test_pickle_is_the_engine_file_and_round_trips(dtype):
    model = full_model(dtype)
    blob = pickle.dumps(model)
    buffer = io.BytesIO()
    le.save(model, buffer)
    assert buffer.getvalue() in blob  # the payload is the file, nothing else of the model
    assert buffer.getvalue() == native.to_bytes(model)
    back = pickle.loads(blob)
    assert back.dtypes == model.dtypes and back.metadata == model.metadata
    ids = np.random.default_rng(1).integers(0, 11, size=(3, 8))
    y, state = model.forward(ids)
    y2, state2 = back.forward(ids)
    assert np.array_equal(y, y2)
    assert all(np.array_equal(a, b) for s, t in zip(state, state2) for a, b in zip(s, t))


def test_a_graph_model_pickles():
    from test_graph import lstm_head_graph

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = le.Model(lstm_head_graph(torch.nn.LSTM(5, 8, batch_first=True), torch.nn.Linear(8, 3)))
    back = pickle.loads(pickle.dumps(model))
    assert not back.is_chain
    x = np.random.default_rng(2).standard_normal((4, 7, 5)).astype(np.float32)
    y, state = model.forward(x)
    y2, state2 = back.forward(x)
    assert np.array_equal(y, y2)
    assert all(np.array_equal(a, b) for s, t in zip(state, state2) for a, b in zip(s, t))


def quantized_graph(fmt):
    from test_graph import lstm_head_graph

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    return le.quantize(le.Model(lstm_head_graph(torch.nn.LSTM(5, 8, batch_first=True), torch.nn.Linear(8, 3))), fmt)


@pytest.mark.parametrize("fmt", ["int8", "float16", "bfloat16"])
@pytest.mark.parametrize("kind", ["chain", "graph"])
def test_a_quantized_model_pickles_as_its_file(fmt, kind):
    model = le.quantize(torch_lstm_model(), fmt) if kind == "chain" else quantized_graph(fmt)
    blob = pickle.dumps(model)
    assert native.to_bytes(model) in blob
    back = pickle.loads(blob)
    assert [getattr(layer.quantization, "format", None) for layer in back.layers] == \
        [getattr(layer.quantization, "format", None) for layer in model.layers]
    x = np.random.default_rng(2).standard_normal((4, 7, 5)).astype(np.float32)
    lengths = np.array([7, 2, 5, 1]) if kind == "chain" else None  # this graph takes no lengths
    y, state = model.forward(x, lengths)
    y2, state2 = back.forward(x, lengths)
    assert np.array_equal(y, y2)
    assert all(np.array_equal(a, b) for s, t in zip(state, state2) for a, b in zip(s, t))


def test_pickle_does_not_carry_threads():
    model = torch_lstm_model()
    model.threads = 1
    assert pickle.loads(pickle.dumps(model)).threads == _threads.default_threads()


def test_load_and_from_bytes():
    model = torch_lstm_model(np.float64)
    data = native.to_bytes(model)
    x = np.random.default_rng(0).standard_normal((2, 7, 5))
    want = model.forward(x)[0]
    assert np.array_equal(le.load(io.BytesIO(data)).forward(x)[0], want)
    assert np.array_equal(native.from_bytes(memoryview(data)).forward(x)[0], want)
    assert le.load(io.BytesIO(data), dtype=np.float32).dtypes == (np.float32,)


def test_bytes_that_are_not_a_model_are_refused():
    data = native.to_bytes(torch_lstm_model())
    with pytest.raises(le.LoadError, match="safetensors files only"):
        le.load(io.BytesIO(b"PK\x03\x04" + bytes(40)))
    with pytest.raises(le.LoadError):
        native.from_bytes(data[: len(data) // 2])
    with pytest.raises(le.LoadError, match="not an lstm_engine model"):
        buffer = io.BytesIO()
        from lstm_engine.formats._safetensors import write_safetensors

        write_safetensors(buffer, {"weight_ih_l0": np.zeros((4, 2), np.float32)})
        native.from_bytes(buffer.getvalue())
    with pytest.raises(TypeError, match="expected bytes"):
        native.from_bytes("model.safetensors")


def test_pickle_refuses_metadata_the_file_cannot_hold():
    model = torch_lstm_model()
    model.metadata["callback"] = object()
    with pytest.raises(TypeError, match="JSON-serialisable"):
        pickle.dumps(model)


def importable_env() -> dict:
    """The environment for a child Python that imports this lstm_engine from any directory."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(le.__file__)))
    return dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))


@pytest.mark.parametrize("fmt", [None, "int8", "bfloat16"])
def test_pickled_model_runs_in_a_fresh_process(tmp_path, fmt):
    model = torch_lstm_model() if fmt is None else le.quantize(torch_lstm_model(), fmt)
    x = np.random.default_rng(5).standard_normal((4, 9, 5)).astype(np.float32)
    lengths = np.array([9, 3, 1, 6])
    (tmp_path / "model.pkl").write_bytes(pickle.dumps(model))
    np.save(tmp_path / "x.npy", x)
    code = ("import pickle, sys, numpy as np\n"
            "model = pickle.loads(open('model.pkl', 'rb').read())\n"
            "assert 'torch' not in sys.modules\n"
            "np.save('y.npy', model.forward(np.load('x.npy'), np.array([9, 3, 1, 6]))[0])\n")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=importable_env(), check=True, timeout=120)
    assert np.array_equal(np.load(tmp_path / "y.npy"), model.forward(x, lengths)[0])


@pytest.mark.parametrize("value, expected", [("1", 1), ("3", 3), ("2,1", 2), ("", None), ("0", None),
                                             ("-2", None), ("four", None)])
def test_omp_num_threads_is_read_like_openmp(monkeypatch, value, expected):
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    assert _threads.omp_num_threads() == expected


def test_default_threads_fit_the_worker(monkeypatch):
    # Unset first: Dask's LocalCluster leaves OMP_NUM_THREADS=1 in the process that started it (the cluster
    # tests'), and cpu_count() honours it too.
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = le._kernels.cpu_count()
    assert _threads.default_threads() == cores
    assert _threads.default_threads(concurrent=cores) == 1
    assert _threads.default_threads(concurrent=10 * cores) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert _threads.default_threads() == 1
    assert torch_lstm_model().threads == 1
    monkeypatch.setenv("OMP_NUM_THREADS", str(cores + 8))  # never more than the process's cores
    assert _threads.default_threads() == cores
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    model = torch_lstm_model()
    model.threads = 2  # an explicit value wins
    assert model.threads == 2


def test_worker_model_loads_a_path_once_per_process(tmp_path):
    from lstm_engine._scale import worker_model

    path = tmp_path / "m.safetensors"
    le.save(torch_lstm_model(), path)
    first = worker_model(str(path), threads=1)
    assert worker_model(path, threads=1) is first
    assert first.threads == 1
    le.save(torch_lstm_model(np.float64), path)  # a changed file is read again
    os.utime(path, ns=(1, 1))
    assert worker_model(str(path)).dtypes == (np.float64,)
    with pytest.raises(TypeError, match="Model or a model file path"):
        worker_model(3)


def test_core_never_imports_dask_or_ray():
    code = ("import sys, lstm_engine, lstm_engine.cli, lstm_engine.ray, lstm_engine._scale\n"
            "lstm_engine.cli.build_parser()\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed', 'ray'))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
