"""textgenrnn 2.0.0: a Keras char-level language model whose weights the engine must refuse, clearly.

Its model (textgenrnn/model.py) concatenates the embedding with both LSTMs' outputs and pools them over time with
a custom ``AttentionWeightedAverage`` layer; its shipped ``textgenrnn_weights.hdf5`` (Keras 2.1.5, weights only) was
trained with CuDNNLSTM layers (two biases per gate). The engine runs neither: every way a user may try to load it
must end in a LoadError naming the layer, never in numbers.
"""

from __future__ import annotations

import pytest

import lstm_engine as le

pytestmark = pytest.mark.zoo


@pytest.fixture(scope="module")
def weights(zoo):
    return zoo("textgenrnn", "2.0.0") / "textgenrnn" / "textgenrnn_weights.hdf5"


def _layer(class_name, name, inbound, **config):
    return {"class_name": class_name, "name": name, "config": {"name": name, **config},
            "inbound_nodes": [[[n, 0, 0, {}] for n in inbound]] if inbound else []}


def _lstm(name, inbound):
    return _layer("LSTM", name, [inbound], units=128, return_sequences=True, activation="tanh",
                  recurrent_activation="sigmoid", use_bias=True)


def _functional(layers, output):
    return {"class_name": "Model", "config": {"name": "model", "layers": layers,
                                              "input_layers": [["input", 0, 0]], "output_layers": [[output, 0, 0]]}}


INPUT = _layer("InputLayer", "input", [], batch_input_shape=[None, 40], dtype="int32")
EMBEDDING = _layer("Embedding", "embedding", ["input"], input_dim=465, output_dim=100, input_length=40)


def test_textgenrnn_attention_model_refused(weights):
    """The package's architecture, as Keras 2.1.5 serialises textgenrnn_model(465, default cfg)."""
    config = _functional([
        INPUT, EMBEDDING, _lstm("rnn_1", "embedding"), _lstm("rnn_2", "rnn_1"),
        _layer("Concatenate", "rnn_concat", ["embedding", "rnn_1", "rnn_2"], axis=-1),
        _layer("AttentionWeightedAverage", "attention", ["rnn_concat"], return_attention=False),
        _layer("Dense", "output", ["attention"], units=465, activation="softmax", use_bias=True),
    ], "output")
    with pytest.raises(le.LoadError, match=r"textgenrnn_weights\.hdf5: layer 'rnn_concat' \(Concatenate\), layer "
                                           r"'attention' \(AttentionWeightedAverage\): Keras layer classes not "
                                           r"supported"):
        le.load(weights, config=config)


def test_textgenrnn_as_a_chain_refused(weights):
    """Dropping the concatenation to make a chain still meets the attention layer and its weights."""
    config = _functional([
        INPUT, EMBEDDING, _lstm("rnn_1", "embedding"), _lstm("rnn_2", "rnn_1"),
        _layer("AttentionWeightedAverage", "attention", ["rnn_2"]),
        _layer("Dense", "output", ["attention"], units=465, activation="softmax", use_bias=True),
    ], "output")
    with pytest.raises(le.LoadError, match=r"layer 'rnn_1' tensor 'bias': 1024 values, two per gate and unit: "
                                           r"weights of a Keras 2 CuDNNLSTM layer"):
        le.load(weights, config=config)


def test_textgenrnn_without_config_refused(weights):
    with pytest.raises(le.LoadError, match=r"textgenrnn_weights\.hdf5: HDF5 file holds weights only"):
        le.load(weights)
