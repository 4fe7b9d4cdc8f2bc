"""The general gate loop (_gates_general.c): ONNX's options as constructor options of LSTM/GRU/RNN.

Options that change nothing (a clip no value reaches) force the general loop; it must then agree with
the fused loops on everything else they do: projections, Keras masks, go_backwards, both dtypes.
"""
from __future__ import annotations

import numpy as np
import pytest

import lstm_engine as le
from lstm_engine import _kernels


def layer(cls, rng, D=1, proj=0, dtype=np.float32, **options):
    G = {le.LSTM: 4, le.GRU: 3, le.RNN: 1}[cls]
    H, I = 7, 5
    P = proj or H
    w = {"weight_ih": rng.standard_normal((D, G * H, I)) * 0.4, "weight_hh": rng.standard_normal((D, G * H, P)) * 0.4,
         "bias_ih": rng.standard_normal((D, G * H)) * 0.2, "bias_hh": rng.standard_normal((D, G * H)) * 0.2}
    if proj:
        w["weight_hr"] = rng.standard_normal((D, P, H)) * 0.4
    w = {k: v[0] if D == 1 else v for k, v in w.items()}
    return cls(**w, dtype=dtype, **options)


CASES = [
    (le.LSTM, {}), (le.LSTM, {"proj": 3}), (le.LSTM, {"D": 2}), (le.LSTM, {"go_backwards": True}),
    (le.GRU, {}), (le.GRU, {"reset_after": False}), (le.GRU, {"D": 2, "reset_after": False}),
    (le.RNN, {}), (le.RNN, {"nonlinearity": "relu", "D": 2}),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls, extra", CASES, ids=lambda v: v.__name__ if isinstance(v, type) else str(v))
def test_general_loop_matches_the_fused_loops(cls, extra, dtype):
    fused = layer(cls, np.random.default_rng(3), dtype=dtype, **extra)
    general = layer(cls, np.random.default_rng(3), dtype=dtype, clip=1e30, **extra)
    assert general.uses_options and not fused.uses_options
    assert general._kernels[np.dtype(dtype)].is_general
    rng = np.random.default_rng(4)
    B, T = 3, 6
    x = rng.standard_normal((B, T, 5)).astype(dtype)
    mask = np.ones((B, T), np.uint8)
    mask[1, 4:] = 0
    mask[2, 2] = 0  # a hole, as Keras masks may have
    for m in (None, mask):
        for zero in (False, True):
            outs = []
            for lay in (fused, general):
                state = tuple(np.full(s[:1] + (B,) + s[1:], 0.3, dtype) for s in lay.state_shapes)
                y = lay.run(x, state, m, zero)
                outs.append((y, state))
            tol = 1e-6 if dtype == np.float32 else 1e-13
            np.testing.assert_allclose(outs[1][0], outs[0][0], rtol=tol, atol=tol)
            for a, b in zip(outs[1][1], outs[0][1]):
                np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def test_options_survive_config_and_weights():
    rng = np.random.default_rng(5)
    lstm = layer(le.LSTM, rng, D=2, peephole=rng.standard_normal((2, 21)), clip=2.5, input_forget=True,
                 activation=["tanh", {"name": "scaled_tanh", "alpha": 1.5, "beta": 0.5}],
                 cell_activation={"name": "leaky_relu", "alpha": 0.2}, recurrent_activation="hard_sigmoid_v2")
    again = le.LSTM(**lstm.weights(), **lstm.config())
    assert again.config() == lstm.config()
    x = rng.standard_normal((2, 4, 5)).astype(np.float32)
    np.testing.assert_array_equal(le.Model([again]).forward(x)[0], le.Model([lstm]).forward(x)[0])


def test_plain_layers_keep_their_config():
    lstm = layer(le.LSTM, np.random.default_rng(6))
    assert set(lstm.config()) == {"activation", "recurrent_activation", "go_backwards", "return_sequences",
                                  "merge_mode", "zero_output_for_mask"}
    assert not lstm.uses_options and not lstm._kernels[np.dtype(np.float32)].is_general


@pytest.mark.parametrize("options, match", [
    ({"clip": 0}, "clip must be a positive"),
    ({"clip": float("nan")}, "clip must be a positive"),
    ({"activation": {"name": "tanh", "alpha": 2.0}}, "takes no alpha"),
    ({"activation": {"name": "elu", "gamma": 2.0}}, "optional 'alpha', 'beta'"),
    ({"activation": {"name": "elu", "alpha": "x"}}, "must be a finite number"),
    ({"activation": ["tanh", "relu"]}, "one activation per direction; expected 1"),
    ({"activation": "swish"}, "not supported"),
    ({"peephole": np.zeros(5)}, r"expected shape \(21,\)"),
])
def test_bad_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        layer(le.LSTM, np.random.default_rng(7), **options)


@pytest.mark.parametrize("option", [{"peephole": np.zeros(21)}, {"input_forget": True},
                                    {"cell_activation": "relu"}])
def test_lstm_only_options_are_refused_elsewhere(option):
    with pytest.raises(ValueError, match="exist only for LSTM"):
        layer(le.GRU, np.random.default_rng(8), **option)


@pytest.mark.parametrize("name", sorted(le.activations.PARAMS))
def test_parameterised_activations_in_the_kernel(name):
    x = np.linspace(-6, 6, 97)
    alpha, beta = 0.37, 0.61
    want = le.activations.apply(name, x.copy(), alpha, beta)
    got = _kernels.general_activation(le.activations.CODES[name], alpha, beta, x)
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-15)


def test_activation_codes_come_from_one_list():
    codes = _kernels.activation_codes()
    assert codes == le.activations.CODES
    assert sorted(codes.values()) == list(range(len(codes)))
    assert codes["sigmoid"] == 0 and codes["tanh"] == 1  # saved files and the fused loops rely on these


def test_record_refuses_options_it_does_not_model():
    lstm = layer(le.LSTM, np.random.default_rng(9), clip=3.0)
    with pytest.raises(ValueError, match="record=True"):
        le.Model([lstm]).forward(np.zeros((1, 2, 5), np.float32), record=True)


@pytest.mark.parametrize("name", ["leaky_relu", "affine", "thresholded_relu", "scaled_tanh"])
def test_names_whose_defaults_differ_between_frameworks_are_refused_bare(name):
    """Keras's leaky_relu has slope 0.2, PyTorch's 0.01: a Dense or a file's bare name is refused, not guessed."""
    with pytest.raises(ValueError, match="not supported"):
        le.Dense(np.eye(2), activation=name)
    layer(le.RNN, np.random.default_rng(10), nonlinearity={"name": name, "alpha": 0.3, "beta": 0.1})
