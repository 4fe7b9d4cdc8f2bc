"""madmom: the pickled neural networks its audio processors ship (``madmom/models/**/*.pkl``), without madmom.

A model file pickles a ``madmom.ml.nn.NeuralNetwork`` whose ``layers`` are madmom layer objects (protocol 2, or
protocol 0 from Python 2 for the older files). It is read by the NumPy pickle reader with madmom's layer classes and
activation functions allowed as inert data (records of their state); nothing of madmom is imported or run.
madmom keeps weights as (inputs, outputs), so every matrix is transposed here. What each layer computes (from
madmom 0.16's ``ml/nn/layers.py``), and how it maps:

- ``FeedForwardLayer``: act(x W + b) -> Dense.
- ``RecurrentLayer``: h = act(x W + b + h_prev R) -> RNN.
- ``LSTMLayer``: each gate act(x W + b + h_prev R [+ P * c]); c = i * cell + f * c_prev with cell =
  act_cell(x W + b + h_prev R); o sees the new c through its peephole; h = act_out(c) * o -> LSTM with peepholes
  (i, f on c_prev, o on c, as ONNX defines them), gate order i, f, g(cell), o.
- ``GRULayer``: r, u gates; cell = act(x W + b + r * (h_prev R)); h = u * cell + (1 - u) * h_prev. PyTorch's GRU has
  h = (1 - z) * n + z * h_prev, so z = 1 - u: with sigmoid gates, σ(-a) = 1 - σ(a), the update gate's weights and
  bias are negated. The candidate has no recurrent bias (b_hn = 0) -> GRU.
- ``BidirectionalLayer``: the forward layer on x and the backward one on x reversed, outputs concatenated
  (backward flipped back) -> the same layer bidirectional.

Anything else (convolutional, pooling, batch-norm layers, initial states that are not zero, activations the engine
lacks) raises LoadError naming the layer.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..errors import LoadError
from ..gru import GRU
from ..layers import Dense
from ..lstm import LSTM
from ..model import Model
from ..rnn import RNN
from .numpy_pickle import Name, Record, read_pickle

_LAYERS = "madmom.ml.nn.layers."
_NETWORK = "madmom.ml.nn.NeuralNetwork"
# Every class madmom's model files name, so that all of them read as data; the mapping below decides what runs.
CLASSES = (_NETWORK,) + tuple(_LAYERS + name for name in (
    "FeedForwardLayer", "RecurrentLayer", "BidirectionalLayer", "Gate", "Cell", "LSTMLayer", "GRUCell", "GRULayer",
    "ConvolutionalLayer", "BatchNormLayer", "MaxPoolLayer", "StrideLayer", "PadLayer", "AverageLayer",
    "ReshapeLayer", "TransposeLayer"))
_ACTIVATIONS = {"linear": "linear", "tanh": "tanh", "sigmoid": "sigmoid", "relu": "relu", "elu": "elu",
                "softmax": "softmax"}
FUNCTIONS = tuple(f"madmom.ml.nn.activations.{name}" for name in _ACTIVATIONS)


def is_madmom(value: Any) -> bool:
    """Whether a value read by :func:`read_pickle` with madmom's classes allowed is a madmom network."""
    return isinstance(value, Record) and value.kind == _NETWORK


def read_madmom(path: str | os.PathLike) -> Any:
    """The records of a madmom model file (see :func:`model_from_madmom`)."""
    return read_pickle(path, classes=CLASSES, functions=FUNCTIONS)


def load_madmom(path: str | os.PathLike, *, dtype: Any = None) -> Model:
    """A Model from a madmom model file."""
    path = os.fspath(path)
    network = read_madmom(path)
    if not is_madmom(network):
        raise LoadError(f"{path}: not a madmom NeuralNetwork pickle")
    return model_from_madmom(network, path, dtype)


def model_from_madmom(network: Record, path: str, dtype: Any = None) -> Model:
    """A Model from a madmom NeuralNetwork record read from ``path``."""
    dtype = np.float32 if dtype is None else dtype
    layers = _state(network, f"{path}: the network").get("layers")
    if not isinstance(layers, list) or not layers:
        raise LoadError(f"{path}: the madmom network has no list of layers")
    built = [_layer(layer, f"{path}: layers[{k}]", dtype) for k, layer in enumerate(layers)]
    try:
        return Model(built, metadata={"source": "madmom"})
    except (TypeError, ValueError) as exc:
        raise LoadError(f"{path}: {exc}") from exc


def _state(record: Any, where: str) -> dict:
    if not isinstance(record, Record) or not isinstance(getattr(record, "state", None), dict):
        raise LoadError(f"{where} is not a madmom object with a state")
    return record.state


def _kind(record: Any) -> str:
    return record.kind.removeprefix(_LAYERS) if isinstance(record, Record) else type(record).__name__


def _array(state: dict, key: str, where: str, ndim: int) -> np.ndarray:
    value = state.get(key)
    if not isinstance(value, np.ndarray) or value.ndim != ndim or value.dtype.kind != "f":
        raise LoadError(f"{where}: '{key}' is {type(value).__name__}, expected a {ndim}-D float array")
    return value


def _activation(state: dict, where: str) -> str:
    fn = state.get("activation_fn")
    name = fn.name.rsplit(".", 1)[-1] if isinstance(fn, Name) else None
    if name not in _ACTIVATIONS:
        raise LoadError(f"{where}: activation {fn!r} is not supported; madmom's {sorted(_ACTIVATIONS)} are")
    return _ACTIVATIONS[name]


def _zero_init(state: dict, where: str, *keys: str) -> None:
    """madmom layers may start from a stored state; the engine's models start from zeros (or initial_state=)."""
    for key in keys:
        value = state.get(key)
        if isinstance(value, np.ndarray) and value.any():
            raise LoadError(f"{where}: '{key}' is a non-zero initial state, which a model file cannot carry here; "
                            "pass it to forward() as initial_state")


def _gate(record: Any, where: str, peephole: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, str]:
    """(W (out, in), R (out, out), b, peephole or None, activation) of a madmom Gate/Cell/GRUCell."""
    state = _state(record, where)
    w, r = _array(state, "weights", where, 2), _array(state, "recurrent_weights", where, 2)
    b = _array(state, "bias", where, 1)
    p = state.get("peephole_weights")
    if p is not None and not peephole:
        raise LoadError(f"{where}: peephole weights on a {_kind(record)}, which madmom itself ignores there")
    if p is not None:
        p = _array(state, "peephole_weights", where, 1)
    return w.T, r.T, b, p, _activation(state, where)


def _recurrent(record: Record, where: str) -> tuple[type, dict, dict]:
    """(engine class, weight arguments, options) for one madmom recurrent layer."""
    kind, state = _kind(record), _state(record, where)
    if kind == "RecurrentLayer":
        _zero_init(state, where, "init")
        act = _activation(state, where)
        if act not in ("tanh", "relu", "sigmoid", "linear", "elu"):
            raise LoadError(f"{where}: a RecurrentLayer with activation {act!r} is not supported")
        weights = {"weight_ih": _array(state, "weights", where, 2).T,
                   "weight_hh": _array(state, "recurrent_weights", where, 2).T,
                   "bias_ih": _array(state, "bias", where, 1)}
        return RNN, weights, {"nonlinearity": act}
    if kind == "LSTMLayer":
        _zero_init(state, where, "init", "cell_init")
        gates = {name: _gate(state.get(name), f"{where}.{name}", peephole=name != "cell")
                 for name in ("input_gate", "forget_gate", "cell", "output_gate")}
        gate_acts = {gates[n][4] for n in ("input_gate", "forget_gate", "output_gate")}
        if len(gate_acts) != 1:
            raise LoadError(f"{where}: its gates use different activations {sorted(gate_acts)}")
        order = ("input_gate", "forget_gate", "cell", "output_gate")  # PyTorch's i, f, g, o
        weights = {"weight_ih": np.concatenate([gates[n][0] for n in order]),
                   "weight_hh": np.concatenate([gates[n][1] for n in order]),
                   "bias_ih": np.concatenate([gates[n][2] for n in order])}
        peepholes = [gates[n][3] for n in ("input_gate", "forget_gate", "output_gate")]
        options = {"recurrent_activation": gate_acts.pop(), "activation": gates["cell"][4],
                   "cell_activation": _activation(state, where)}
        if any(p is not None for p in peepholes):
            hidden = gates["cell"][2].shape[0]
            weights["peephole"] = np.concatenate([np.zeros(hidden, np.float32) if p is None else p
                                                  for p in peepholes])
        return LSTM, weights, options
    if kind == "GRULayer":
        _zero_init(state, where, "init", "hid_init")
        reset = _gate(state.get("reset_gate"), f"{where}.reset_gate", peephole=False)
        update = _gate(state.get("update_gate"), f"{where}.update_gate", peephole=False)
        cell = _gate(state.get("cell"), f"{where}.cell", peephole=False)
        if reset[4] != "sigmoid" or update[4] != "sigmoid":
            raise LoadError(f"{where}: GRU gates with activations {reset[4]!r}/{update[4]!r}; only sigmoid gates "
                            "map onto PyTorch's update rule")
        hidden = cell[2].shape[0]
        # PyTorch's rows r, z, n with z = 1 - u = σ(-a): the update gate negated; no recurrent bias anywhere.
        weights = {"weight_ih": np.concatenate([reset[0], -update[0], cell[0]]),
                   "weight_hh": np.concatenate([reset[1], -update[1], cell[1]]),
                   "bias_ih": np.concatenate([reset[2], -update[2], cell[2]]),
                   "bias_hh": np.zeros(3 * hidden, cell[2].dtype)}
        return GRU, weights, {"activation": cell[4]}
    raise LoadError(f"{where}: madmom {kind} is not a recurrent layer")


def _layer(record: Any, where: str, dtype: Any):
    kind = _kind(record)
    try:
        if kind == "FeedForwardLayer":
            state = _state(record, where)
            return Dense(_array(state, "weights", where, 2).T, _array(state, "bias", where, 1),
                         activation=_activation(state, where), dtype=dtype)
        if kind in ("RecurrentLayer", "LSTMLayer", "GRULayer"):
            cls, weights, options = _recurrent(record, where)
            return cls(**weights, **options, dtype=dtype)
        if kind == "BidirectionalLayer":
            state = _state(record, where)
            fwd, bwd = state.get("fwd_layer"), state.get("bwd_layer")
            (cls, fw, options), (cls_b, bw, options_b) = (_recurrent(fwd, f"{where}.fwd_layer"),
                                                          _recurrent(bwd, f"{where}.bwd_layer"))
            if cls is not cls_b or options != options_b or fw.keys() != bw.keys():
                raise LoadError(f"{where}: its forward ({_kind(fwd)}) and backward ({_kind(bwd)}) layers differ")
            return cls(**{k: np.stack([fw[k], bw[k]]) for k in fw}, **options, dtype=dtype)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, LoadError):
            raise
        raise LoadError(f"{where} ({kind}): {exc}") from exc
    raise LoadError(f"{where}: madmom {kind} is not supported; lstm_engine runs madmom's FeedForwardLayer, "
                    "RecurrentLayer, LSTMLayer, GRULayer and BidirectionalLayer")
