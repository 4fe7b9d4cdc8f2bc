"""g2pM 0.1.2.5: Chinese polyphone disambiguation, Embedding -> BiLSTM -> Linear/ReLU/Linear from ``np_ckpt.pkl``.

The weights are a pickled dict of NumPy arrays, read with the engine's safe reader (no plain pickle.load). The
reference is g2pM's own NumPy code, compiled from the wheel's ``g2pM/g2pM.py`` without running the module or its
``__init__`` (which unpickles four files): its methods ``load_variable``, ``reverse_sequence``, ``sigmoid``,
``relu``, ``get_embedding``, ``fw_lstm_cell``, ``bw_lstm_cell``, ``fc_layer`` and ``predict`` as written, fed the
same state dict. Its logits are recorded at ``fc_layer`` and compared with the engine's at every position.
"""

from __future__ import annotations

import numpy as np
import zoo_packages as packages
import pytest

import lstm_engine as le
from lstm_engine.formats.numpy_pickle import read_pickle

pytestmark = pytest.mark.zoo

_METHODS = {"load_variable", "reverse_sequence", "sigmoid", "relu", "get_embedding", "fw_lstm_cell", "bw_lstm_cell",
            "fc_layer", "predict"}
SENTENCES = ["然而，他红了20年以后，他竟退出了大家的视线。", "银行行长在长城上行走", "我们都是好朋友，乐于助人",
             "重庆的重量", "abc"]


@pytest.fixture(scope="module")
def package(zoo):
    return zoo("g2pM", "0.1.2.5") / "g2pM"


def reference(folder, state_dict):
    """g2pM's G2pM with its own NumPy methods, compiled from its source (see the module docstring)."""
    g2pm = packages.compile_methods(folder / "g2pM.py", "G2pM", _METHODS, {"np": np})()
    g2pm.load_variable(state_dict)
    return g2pm


def engine_model(state_dict) -> le.Model:
    lstm = le.from_torch({k.removeprefix("lstm."): v for k, v in state_dict.items() if k.startswith("lstm.")})
    return le.Model([le.Embedding(state_dict["embedding.weight"]), *lstm.layers,
                     le.Dense(state_dict["logit_layer.0.weight"], state_dict["logit_layer.0.bias"], activation="relu"),
                     le.Dense(state_dict["logit_layer.2.weight"], state_dict["logit_layer.2.bias"])])


def test_g2pm_matches_its_numpy_code(package):
    state_dict = le.load_state_dict(package / "np_ckpt.pkl")
    char2idx = read_pickle(package / "char2idx.pkl")
    ref = reference(package, state_dict)
    model = engine_model(state_dict)
    assert model.layers[1].bidirectional
    recorded = []
    fc_layer = ref.fc_layer
    ref.fc_layer = lambda hidden: recorded.append(fc_layer(hidden)) or recorded[-1]
    for sentence in SENTENCES:
        ids = [char2idx["시"]] + [char2idx.get(ch, char2idx["<UNK>"]) for ch in sentence] + [char2idx["끝"]]
        ids = np.array([ids], dtype=np.int32)
        positions = list(range(ids.shape[1]))
        expected_classes = ref.predict(ids, positions)
        logits, _ = model.forward(ids.astype(np.int64))
        np.testing.assert_allclose(logits[0], recorded[-1], rtol=0, atol=1e-4, err_msg=sentence)
        np.testing.assert_array_equal(logits[0].argmax(axis=1), expected_classes, err_msg=sentence)


def test_g2pm_pickle_needs_no_code(package, tmp_path):
    # The same file with one array swapped for an object that runs code when unpickled is refused by name.
    data = (package / "np_ckpt.pkl").read_bytes()
    evil = data.replace(b"cnumpy\ndtype\n", b"cposix\nsystem\n", 1)
    assert evil != data
    (tmp_path / "evil.pkl").write_bytes(evil)
    with pytest.raises(le.UnsafeModelError, match=r"evil\.pkl: refusing pickle global 'posix\.system'"):
        le.load_state_dict(tmp_path / "evil.pkl")
