"""madmom 0.16.1: the pickled networks of its beat, downbeat, onset, note and chroma processors.

The engine reads the files with madmom's classes as inert records (formats/madmom.py) and maps LSTMs with peepholes,
GRUs, RNNs, their bidirectional pairs and feed-forward layers. The reference is madmom's own NumPy code: its
``ml/nn/layers.py`` and ``ml/nn/activations.py`` run from the sdist (without the package's other modules, which
need its compiled extensions), the model files unpickled with those classes, and each layer's ``activate`` applied
in turn, as ``NeuralNetwork.process`` does. The sdist's setup.py needs Cython and NumPy for pip to read its metadata.
"""

from __future__ import annotations

import pickle

import numpy as np
import zoo_packages as packages
import pytest

import lstm_engine as le
from lstm_engine.formats import madmom as madmom_format

# madmom's relu passes its output array positionally to np.maximum, which NumPy 2 warns about; its GRU files use
# an old attribute name, which madmom's own loader warns about.
pytestmark = [pytest.mark.zoo,
              pytest.mark.filterwarnings("ignore:Passing more than 2 positional arguments:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:Please update your GRU models:RuntimeWarning")]

RUNS = ["beats/2016/beats_lstm_1.pkl", "beats/2015/beats_blstm_1.pkl", "downbeats/2016/downbeats_blstm_1.pkl",
        "onsets/2013/onsets_rnn_1.pkl", "onsets/2013/onsets_brnn_1.pkl", "onsets/2014/onsets_brnn_pp_1.pkl",
        "notes/2013/notes_brnn.pkl", "chroma/2016/chroma_dnn.pkl"]
REFUSED = {
    "downbeats/2016/downbeats_bgru_rhythmic_0.pkl": (le.LoadError, r"layers\[0\]\.fwd_layer: 'hid_init' is a "
                                                                  r"non-zero initial state"),
    "onsets/2013/onsets_cnn.pkl": (le.LoadError, r"layers\[0\]: madmom BatchNormLayer is not supported"),
    "key/2018/key_cnn.pkl": (le.LoadError, r"layers\[0\]: madmom PadLayer is not supported"),
    "chords/2016/chords_cnncrf.pkl": (le.UnsafeModelError, r"refusing pickle global "
                                                           r"'madmom\.ml\.crf\.ConditionalRandomField'"),
}


@pytest.fixture(scope="module")
def madmom(zoo):
    return zoo("madmom", "0.16.1") / "madmom"


class _Network:
    """madmom.ml.nn.NeuralNetwork's data; process() is the loop its docstring describes."""

    def __setstate__(self, state):
        self.__dict__.update(state)

    def process(self, data):
        for layer in self.layers:
            data = layer.activate(data)
        return data


def reference(root, path):
    """A madmom model file unpickled with madmom's own layer classes and activations, run from the sdist."""
    activations = packages.run_module(root / "ml" / "nn" / "activations.py", {"__name__": "madmom.ml.nn.activations"})
    layers = packages.run_module(root / "ml" / "nn" / "layers.py", {
        "__name__": "madmom.ml.nn.layers", **{k: activations[k] for k in ("linear", "sigmoid", "tanh")}})
    modules = {"madmom.ml.nn.activations": activations, "madmom.ml.nn.layers": layers,
               "madmom.ml.nn": {"NeuralNetwork": _Network}}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            return modules[module][name] if module in modules else super().find_class(module, name)

    with open(path, "rb") as f:
        return Unpickler(f, encoding="latin1").load()


def _features(model: le.Model, steps: int = 300) -> np.ndarray:
    """Spectrogram-like input: non-negative, a few units large."""
    size = model.layers[0].input_size
    return (np.random.default_rng(0).gamma(1.0, 0.7, (steps, size))).astype(np.float32)


@pytest.mark.parametrize("name", RUNS)
def test_madmom_network_matches_its_numpy_code(madmom, name):
    path = madmom / "models" / name
    model = le.load(path)
    x = _features(model)
    expected = reference(madmom, path).process(x)
    got, _ = model.forward(x[None])
    np.testing.assert_allclose(got[0], expected, rtol=0, atol=1e-5)


def test_madmom_bigru_mapping_with_zeroed_initial_states(madmom):
    """madmom's GRU (update gate on the candidate, no recurrent bias) maps onto PyTorch's with the gate negated;
    the shipped BiGRUs carry non-zero initial states, so both sides start from zeros here."""
    path = madmom / "models" / "downbeats/2016/downbeats_bgru_rhythmic_0.pkl"
    network = madmom_format.read_madmom(path)
    for layer in network.state["layers"]:
        for side in ("fwd_layer", "bwd_layer"):
            if layer.kind.endswith("BidirectionalLayer"):
                layer.state[side].state.pop("hid_init", None)
                layer.state[side].state.pop("init", None)
    model = madmom_format.model_from_madmom(network, str(path))
    assert any(isinstance(layer, le.GRU) and layer.bidirectional for layer in model.layers)
    ref = reference(madmom, path)
    for layer in ref.layers:
        for side in (getattr(layer, "fwd_layer", None), getattr(layer, "bwd_layer", None)):
            if side is not None:
                side.init = np.zeros_like(side.init)
    x = _features(model)
    got, _ = model.forward(x[None])
    np.testing.assert_allclose(got[0], ref.process(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", REFUSED)
def test_madmom_refusals_name_the_layer(madmom, name):
    error, message = REFUSED[name]
    with pytest.raises(error, match=message):
        le.load(madmom / "models" / name)


def test_madmom_inspect(madmom, capsys):
    from lstm_engine.cli import main

    assert main(["inspect", str(madmom / "models" / "beats/2015/beats_blstm_1.pkl")]) == 0
    out = capsys.readouterr().out
    assert "source: madmom" in out and "file: pickle (madmom network" in out and out.count("LSTM") == 3
