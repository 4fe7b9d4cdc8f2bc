"""chars2vec 0.1.7: five Keras 2.2 ``save_weights`` files (two stacked LSTMs over one-hot characters).

The files hold weights only, under the layer names of the Keras session that trained them (``lstm_3``/``lstm_4`` for
eng_100); the config below is the package's model as Keras 2.2 serialises it, with the names a session today gives
(``lstm``/``lstm_1``), so the weights are paired by order, as Keras's load_weights does. The reference is a float64
NumPy LSTM with Keras 2's equations (gates i, f, c, o; recurrent_activation hard_sigmoid = clip(0.2x + 0.5, 0, 1),
Keras 2.2's default, which chars2vec keeps), run on the same pre-padded one-hot batch Keras's pad_sequences makes.
"""

from __future__ import annotations

import numpy as np
import pytest

import lstm_engine as le
from lstm_engine.formats.numpy_pickle import read_pickle

pytestmark = pytest.mark.zoo

MODELS = ["eng_50", "eng_100", "eng_150", "eng_200", "eng_300"]
WORDS = ["natural", "language", "processing", "chars2vec", "Tokenizer", "misspeling", "hello, world!", "naïve",
         "x", "antidisestablishmentarianism"]


@pytest.fixture(scope="module")
def package(zoo):
    return zoo("chars2vec", "0.1.7") / "chars2vec" / "trained_models"


def _lstm_config(name: str, units: int, return_sequences: bool, inbound: str) -> dict:
    """An LSTM layer of a Keras 2.2 functional config, with Keras 2.2's defaults written out."""
    return {
        "class_name": "LSTM",
        "name": name,
        "config": {"name": name, "trainable": True, "return_sequences": return_sequences, "return_state": False,
                   "go_backwards": False, "stateful": False, "unroll": False, "units": units,
                   "activation": "tanh", "recurrent_activation": "hard_sigmoid", "use_bias": True,
                   "unit_forget_bias": True, "dropout": 0.0, "recurrent_dropout": 0.0, "implementation": 1},
        "inbound_nodes": [[[inbound, 0, 0, {}]]],
    }


def _config(vocab: int, dim: int) -> dict:
    """chars2vec's embedding model: Input(None, vocab) -> LSTM(dim, return_sequences) -> LSTM(dim)."""
    return {
        "class_name": "Model",
        "config": {
            "name": "model",
            "layers": [
                {"class_name": "InputLayer", "name": "input_layer", "inbound_nodes": [],
                 "config": {"batch_input_shape": [None, None, vocab], "dtype": "float32", "sparse": False,
                            "name": "input_layer"}},
                _lstm_config("lstm", dim, True, "input_layer"),
                _lstm_config("lstm_1", dim, False, "lstm"),
            ],
            "input_layers": [["input_layer", 0, 0]],
            "output_layers": [["lstm_1", 0, 0]],
        },
    }


def _one_hot(words: list[str], char_to_ix: dict) -> np.ndarray:
    """What chars2vec feeds Keras: lower-cased one-hot rows (zeros for unknown characters), pre-padded with zeros."""
    T = max(len(w) for w in words)
    x = np.zeros((len(words), T, len(char_to_ix)), np.float32)
    for b, word in enumerate(words):
        for t, ch in enumerate(word.lower()):
            if ch in char_to_ix:
                x[b, T - len(word) + t, char_to_ix[ch]] = 1
    return x


def _keras2_lstm(x, kernel, recurrent_kernel, bias, slope=0.2):
    """Keras 2 LSTM (float64), all steps' h: gate blocks i, f, c, o; hard_sigmoid = clip(0.2x + 0.5, 0, 1)."""
    def hard_sigmoid(v):
        return np.clip(slope * v + 0.5, 0.0, 1.0)

    x, kernel, recurrent_kernel, bias = (np.asarray(a, np.float64) for a in (x, kernel, recurrent_kernel, bias))
    B, T, _ = x.shape
    units = recurrent_kernel.shape[0]
    h, c = np.zeros((B, units)), np.zeros((B, units))
    out = np.empty((B, T, units))
    for t in range(T):
        z = x[:, t] @ kernel + h @ recurrent_kernel + bias
        i, f, g, o = (z[:, k * units:(k + 1) * units] for k in range(4))
        c = hard_sigmoid(f) * c + hard_sigmoid(i) * np.tanh(g)
        h = hard_sigmoid(o) * np.tanh(c)
        out[:, t] = h
    return out


@pytest.mark.parametrize("name", MODELS)
def test_chars2vec_matches_keras2(package, name):
    import h5py

    folder = package / name
    dim, char_to_ix = read_pickle(folder / "model.pkl")
    weights = folder / "weights.h5"
    with h5py.File(weights, "r") as f:
        stored = [n.decode() for n in f.attrs["layer_names"]]
        tensors = [[np.asarray(f[layer][w]) for w in f[layer].attrs["weight_names"]] for layer in stored[1:]]
    assert stored[1:] != ["lstm", "lstm_1"]  # the names differ from the config's: pairing by order is exercised

    with pytest.warns(UserWarning, match=rf"paired by order.*lstm <- {stored[1]}, lstm_1 <- {stored[2]}"):
        model = le.load(weights, config=_config(len(char_to_ix), dim))
    x = _one_hot(WORDS, char_to_ix)
    got, _ = model.forward(x)

    expected = _keras2_lstm(_keras2_lstm(x, *tensors[0]), *tensors[1])[:, -1]
    assert got.shape == (len(WORDS), dim)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    # Which hard sigmoid matters: Keras 3's x/6 + 0.5 gives other vectors.
    keras3 = _keras2_lstm(_keras2_lstm(x, *tensors[0], slope=1 / 6), *tensors[1], slope=1 / 6)[:, -1]
    assert np.abs(keras3 - expected).max() > 1e-2
