"""Resemblyzer 0.1.4: a speaker encoder, LSTM(40, 256, 3) -> Linear -> ReLU -> L2 norm, from a legacy torch file.

``pretrained.pt`` is a pre-1.6 (non-zip) ``torch.save`` of a checkpoint dict (step, model_state, optimizer_state),
read without torch by the engine's safe unpickler. The reference is the package's VoiceEncoder forward, rebuilt in
torch from the same modules (``nn.LSTM(40, 256, 3, batch_first=True)``, ``nn.Linear(256, 256)``) and loaded by
torch.load itself. The engine runs the LSTM stack, the Linear and the ReLU on the last hidden state; the L2
normalisation is one NumPy line (the engine's chain has no norm op).
"""

from __future__ import annotations

import numpy as np
import pytest

import lstm_engine as le

pytestmark = pytest.mark.zoo
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def weights(zoo):
    return zoo("Resemblyzer", "0.1.4") / "resemblyzer" / "pretrained.pt"


def engine_model(path) -> le.Model:
    """The encoder from the checkpoint: three LSTM layers, the last returning its final step, then Linear + ReLU."""
    w = le.load_state_dict(path)
    layers = [le.LSTM(*(w[f"model_state.lstm.{name}_l{k}"] for name in ("weight_ih", "weight_hh", "bias_ih",
                                                                         "bias_hh")), return_sequences=k < 2)
              for k in range(3)]
    return le.Model([*layers, le.Dense(w["model_state.linear.weight"], w["model_state.linear.bias"],
                                       activation="relu")])


def test_resemblyzer_embeddings_match_torch(weights):
    with open(weights, "rb") as f:
        assert f.read(2) == b"\x80\x02"  # a legacy stream, not a zip archive
    checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
    lstm, linear = torch.nn.LSTM(40, 256, 3, batch_first=True), torch.nn.Linear(256, 256)
    lstm.load_state_dict({k[5:]: v for k, v in checkpoint["model_state"].items() if k.startswith("lstm.")})
    linear.load_state_dict({k[7:]: v for k, v in checkpoint["model_state"].items() if k.startswith("linear.")})

    # Six partial utterances of 160 mel frames (1.6 s), as VoiceEncoder.embed_utterance batches them.
    mels = np.random.default_rng(0).random((6, 160, 40), dtype=np.float32)
    with torch.no_grad():
        _, (hidden, _) = lstm(torch.from_numpy(mels))
        raw = torch.relu(linear(hidden[-1]))
        expected = (raw / torch.norm(raw, dim=1, keepdim=True)).numpy()

    model = engine_model(weights)
    raw, _ = model.forward(mels)
    got = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_resemblyzer_checkpoint_is_not_a_bare_lstm(weights):
    # le.load builds models from bare nn.LSTM/GRU/RNN state_dicts only; a checkpoint of a whole network says so.
    with pytest.raises(le.LoadError, match=r"pretrained\.pt: tensor 'model_state\.similarity_weight' is not a "
                                           r"parameter of a bare nn\.LSTM/GRU/RNN"):
        le.load(weights)
