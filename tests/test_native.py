"""le.save / le.load: the engine's own file round-trips every layer exactly, and refuses what it does not know."""
from __future__ import annotations

import json

import numpy as np
import pytest

import lstm_engine as le
from lstm_engine.formats._safetensors import read_safetensors, write_safetensors


def full_model(dtype=np.float32):
    rng = np.random.default_rng(0)
    r = rng.standard_normal
    return le.Model([
        le.Embedding(r((11, 6)), mask_zero=True, dtype=dtype),
        le.LSTM(r((2, 16, 6)), r((2, 16, 3)), r((2, 16)), r((2, 16)), r((2, 3, 4)), dtype=dtype),
        le.LayerNorm(r(6), r(6), eps=1e-3, dtype=dtype),
        le.GRU(r((9, 6)), r((9, 3)), r(9), None, reset_after=False, recurrent_activation="hard_sigmoid",
               dtype=dtype),
        le.Dropout(),
        le.RNN(r((5, 3)), r((5, 5)), nonlinearity="relu", go_backwards=True, dtype=dtype),
        le.BatchNorm(r(5), np.abs(r(5)) + 0.1, r(5), r(5), dtype=dtype),
        le.Activation("tanh"),
        le.Dense(r((7, 5)), r(7), activation="softmax", dtype=dtype),
    ], metadata={"vocab": "abcdefghijk", "note": "ünïcode"})


@pytest.mark.parametrize("dtype", [np.float32, np.float64, (np.float32, np.float64)])
def test_round_trip_is_identical(tmp_path, dtype):
    model = full_model(dtype)
    path = tmp_path / "m.safetensors"
    le.save(model, path)
    loaded = le.load(path)
    assert loaded.dtypes == model.dtypes
    assert loaded.metadata == model.metadata
    assert [type(a) for a in loaded.layers] == [type(b) for b in model.layers]
    assert [a.config() for a in loaded.layers] == [b.config() for b in model.layers]
    ids = np.random.default_rng(1).integers(0, 11, size=(3, 8))
    y0, s0 = model.forward(ids)
    y1, s1 = loaded.forward(ids)
    np.testing.assert_array_equal(y0, y1)
    for a, b in zip(s0, s1):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)


def test_dtype_override_on_load(tmp_path):
    path = tmp_path / "m.safetensors"
    le.save(full_model(np.float32), path)
    assert le.load(path, dtype=np.float64).dtypes == (np.dtype(np.float64),)


def rewrite(path, tensors, metadata, dst):
    write_safetensors(dst, tensors, metadata)
    return dst


def test_refuses_unknown_class_and_bad_config(tmp_path):
    path = tmp_path / "m.safetensors"
    le.save(full_model(), path)
    tensors, meta = read_safetensors(path)
    arch = json.loads(meta["architecture"])

    evil = [dict(arch[0], **{"class": "os.system"})] + arch[1:]
    bad = rewrite(path, tensors, dict(meta, architecture=json.dumps(evil)), tmp_path / "a.safetensors")
    with pytest.raises(le.LoadError, match="unknown layer class 'os.system'"):
        le.load(bad)

    weird = [arch[0], dict(arch[1], config={"activation": "__import__('os')"})] + arch[2:]
    bad = rewrite(path, tensors, dict(meta, architecture=json.dumps(weird)), tmp_path / "b.safetensors")
    with pytest.raises(le.LoadError, match=r"layer 1 \(LSTM\)"):
        le.load(bad)

    bad = rewrite(path, tensors, dict(meta, format_version="99"), tmp_path / "c.safetensors")
    with pytest.raises(le.LoadError, match="version '99'"):
        le.load(bad)

    bad = rewrite(path, tensors, dict(meta, architecture="{not json"), tmp_path / "d.safetensors")
    with pytest.raises(le.LoadError, match="not valid JSON"):
        le.load(bad)


def test_refuses_missing_wrong_and_stray_tensors(tmp_path):
    path = tmp_path / "m.safetensors"
    le.save(full_model(), path)
    tensors, meta = read_safetensors(path)

    missing = {k: v for k, v in tensors.items() if k != "layers.1.weight_hh"}
    with pytest.raises(le.LoadError, match=r"layer 1 \(LSTM\)"):
        le.load(rewrite(path, missing, meta, tmp_path / "a.safetensors"))

    wrong = dict(tensors, **{"layers.1.weight_hh": np.zeros((2, 16, 5), np.float32)})
    with pytest.raises(le.LoadError, match="weight_hh"):
        le.load(rewrite(path, wrong, meta, tmp_path / "b.safetensors"))

    stray = dict(tensors, **{"layers.99.weight": np.zeros(3, np.float32)})
    with pytest.raises(le.LoadError, match="layers.99.weight"):
        le.load(rewrite(path, stray, meta, tmp_path / "c.safetensors"))


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(le.LoadError, match="nope.safetensors"):
        le.load(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(le.LoadError, match="junk.bin"):
        le.load(junk)


def test_save_rejects_non_models(tmp_path):
    with pytest.raises(TypeError):
        le.save("model", tmp_path / "x.safetensors")
    model = full_model()
    model.metadata["bad"] = object()
    with pytest.raises(TypeError, match="JSON"):
        le.save(model, tmp_path / "x.safetensors")
