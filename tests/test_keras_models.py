"""Keras models end to end: real Keras 3 models saved as .keras, .h5 and .weights.h5, loaded without Keras."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import lstm_engine as le

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
pytest.importorskip("h5py")
L = keras.layers


def run_keras(model, x):
    return keras.ops.convert_to_numpy(model(x))


def saved(model, tmp_path, fmt):
    """Save in one of the formats and return (path, load options)."""
    if fmt == "keras":
        path = tmp_path / "m.keras"
        model.save(path)
        return path, {}
    if fmt == "h5":
        path = tmp_path / "m.h5"
        model.save(path)
        return path, {}
    path = tmp_path / "m.weights.h5"
    model.save_weights(path)
    return path, {"config": model.to_json()}


def padded_ids(rng, B=4, T=9, vocab=20):
    ids = rng.integers(1, vocab, (B, T))
    ids[1, 5:] = 0
    ids[2, 2:] = 0
    return ids


def masked_floats(rng, B=4, T=9, F=3):
    x = rng.standard_normal((B, T, F)).astype(np.float32)
    x[1, 6:] = 0
    x[2, 3] = 0  # a hole in the middle: Keras masks need not be prefixes
    return x


def build_models():
    """name -> (model factory, input factory)."""
    ids_in = keras.Input((9,), dtype="int32")
    seq_in = keras.Input((9, 3))
    cases = {
        "embedding-lstm-softmax": (
            lambda: keras.Sequential([ids_in, L.Embedding(20, 8, mask_zero=True), L.LSTM(6, return_sequences=True),
                                      L.Dense(5, activation="softmax")]), padded_ids),
        "stacked-gru-reset-after-false-true": (
            lambda: keras.Sequential([seq_in, L.Masking(0.0), L.GRU(5, reset_after=False, return_sequences=True),
                                      L.GRU(4, reset_after=True, return_sequences=True)]), masked_floats),
        "simplernn": (
            lambda: keras.Sequential([seq_in, L.SimpleRNN(4, activation="relu", return_sequences=True)]),
            masked_floats),
        "masking-lstm-last": (
            lambda: keras.Sequential([seq_in, L.Masking(0.0), L.LSTM(5)]), masked_floats),
        "go-backwards": (
            lambda: keras.Sequential([seq_in, L.Masking(0.0), L.GRU(4, go_backwards=True, return_sequences=True)]),
            masked_floats),
        "heads": (
            lambda: keras.Sequential([seq_in, L.LSTM(4, return_sequences=True, recurrent_activation="hard_sigmoid"),
                                      L.LayerNormalization(), L.BatchNormalization(), L.Dropout(0.2),
                                      L.TimeDistributed(L.Dense(3, activation="tanh"))]), masked_floats),
        "functional-masking": (
            lambda: keras.Model(seq_in, L.Dense(2)(L.LSTM(4)(L.Masking(0.0)(seq_in)))), masked_floats),
    }
    for merge in ("concat", "sum", "ave", "mul"):
        for rs in (True, False):
            cases[f"bidirectional-{merge}-seq{int(rs)}"] = (
                lambda merge=merge, rs=rs: keras.Sequential(
                    [seq_in, L.Masking(0.0), L.Bidirectional(L.LSTM(4, return_sequences=rs), merge_mode=merge)]),
                masked_floats)
    return cases


CASES = build_models()


@pytest.mark.parametrize("fmt", ["keras", "h5", "weights"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_keras(tmp_path, name, fmt):
    make_model, make_input = CASES[name]
    keras.utils.set_random_seed(0)
    model = make_model()
    if name == "heads":  # give BatchNormalization real statistics
        bn = model.layers[2]
        bn.moving_mean.assign(np.linspace(-1, 1, 4))
        bn.moving_variance.assign(np.linspace(0.5, 2, 4))
    x = make_input(np.random.default_rng(1))
    want = run_keras(model, x)
    path, options = saved(model, tmp_path, fmt)
    got, _ = le.load(path, **options).forward(x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_from_live_model_and_return_state():
    keras.utils.set_random_seed(2)
    x = masked_floats(np.random.default_rng(2))
    model = keras.Sequential([keras.Input((9, 3)), L.Masking(0.0), L.LSTM(5, return_sequences=True)])
    engine = le.from_keras(model)
    y, state = engine.forward(x)
    np.testing.assert_allclose(y, run_keras(model, x), atol=1e-5)
    twin = L.LSTM(5, return_sequences=True, return_state=True)
    twin.build((None, 9, 3))
    twin.set_weights(model.layers[-1].get_weights())
    _, h, c = (keras.ops.convert_to_numpy(t) for t in twin(x, mask=np.any(x != 0, axis=-1)))
    np.testing.assert_allclose(state[0][0][0], h, atol=1e-5)
    np.testing.assert_allclose(state[0][1][0], c, atol=1e-5)


def test_hard_sigmoid_follows_the_files_keras_version(tmp_path):
    from lstm_engine.formats._keras_file import read_keras
    from lstm_engine.formats.keras import model_from_spec

    model = keras.Sequential([keras.Input((4, 2)), L.GRU(3, recurrent_activation="hard_sigmoid")])
    model.save(tmp_path / "m.keras")
    spec = read_keras(tmp_path / "m.keras")
    assert model_from_spec(spec, "m").layers[0].recurrent_activation == "hard_sigmoid"
    spec.keras_version = "2.15.0"  # what a tf.keras 2 file records: hard_sigmoid was 0.2x + 0.5 there
    assert model_from_spec(spec, "m").layers[0].recurrent_activation == "hard_sigmoid_v2"


def test_unsupported_layers_are_named(tmp_path):
    model = keras.Sequential([keras.Input((5, 3)), L.Conv1D(2, 2), L.LSTM(3)])
    model.save(tmp_path / "c.keras")
    with pytest.raises(le.LoadError, match="c.keras.*Conv1D"):
        le.load(tmp_path / "c.keras")


def test_loading_needs_no_framework(tmp_path):
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((9,), dtype="int32"), L.Embedding(20, 8, mask_zero=True),
                              L.Bidirectional(L.GRU(4, return_sequences=True)), L.Dense(3)])
    ids = padded_ids(np.random.default_rng(3))
    model.save(tmp_path / "m.keras")
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "want.npy", run_keras(model, ids))
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None
        sys.modules["keras"] = None
        sys.modules["tensorflow"] = None
        import numpy as np
        import lstm_engine as le
        y, _ = le.load({str(tmp_path / "m.keras")!r}).forward(np.load({str(tmp_path / "ids.npy")!r}))
        assert np.abs(y - np.load({str(tmp_path / "want.npy")!r})).max() < 1e-5
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
