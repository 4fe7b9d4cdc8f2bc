"""PyTorch: modules, containers and state_dicts to engine layers (torch is never imported here).

A torch module is recognised by its class's module path, so this file works where torch is absent.
"""
from __future__ import annotations

import re
import sys
from typing import Any

import numpy as np

from .. import layers as _layers
from ..errors import LoadError
from ..gru import GRU
from ..lstm import LSTM
from ..model import Model
from ..rnn import RNN

_CELLS = {4: LSTM, 3: GRU, 1: RNN}
_RNN_KEY = re.compile(r"^(?P<prefix>.*?)weight_ih(?:_l(?P<layer>\d+))?(?P<rev>_reverse)?$")
_PARAM_KEY = re.compile(r"^(?P<prefix>.*?)(?:weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)(?:_l\d+)?(?:_reverse)?$")


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # NumPy has no bfloat16
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def recurrent_layers_from_state_dict(state_dict: dict, prefix: str = "", *, nonlinearity: str = "tanh",
                                     dtype: Any = np.float32, source: str = "state_dict") -> list:
    """The layers of one nn.LSTM / nn.GRU / nn.RNN (or *Cell) whose parameters sit under ``prefix``.

    The cell type comes from the gate count (rows of weight_ih over the hidden size), the number of
    layers from the ``_l{k}`` suffixes, bidirectionality from ``_reverse`` keys, the projection from
    ``weight_hr``.
    """
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    suffixes = sorted({(int(m["layer"]) if m["layer"] else -1) for k in sd if (m := _RNN_KEY.match(k))
                       and not m["prefix"]})
    if not suffixes:
        raise ValueError(f"{source}: no recurrent weights (weight_ih_l0) under prefix {prefix!r}")
    if suffixes != [-1] and suffixes != list(range(len(suffixes))):
        raise ValueError(f"{source}: recurrent layers under {prefix!r} are not numbered 0..n-1: {suffixes}")
    layers = []
    for k in suffixes:
        tag = "" if k < 0 else f"_l{k}"
        dirs = [tag] + ([tag + "_reverse"] if f"weight_ih{tag}_reverse" in sd else [])

        def get(name: str, required: bool = True):
            arrs = []
            for d in dirs:
                key = name + d
                if key not in sd:
                    if required:
                        raise ValueError(f"{source}: missing tensor {prefix + key!r}")
                    return None
                arrs.append(_to_numpy(sd[key]))
            try:
                return np.stack(arrs)
            except ValueError as exc:
                raise ValueError(f"{source}: tensors {[prefix + name + d for d in dirs]} differ in shape") from exc

        w_ih, w_hh = get("weight_ih"), get("weight_hh")
        b_ih, b_hh, w_hr = get("bias_ih", False), get("bias_hh", False), get("weight_hr", False)
        if w_ih.ndim != 3 or w_hh.ndim != 3:
            raise ValueError(f"{source}: {prefix}weight_ih{tag} and weight_hh{tag} must be 2-D, "
                             f"got {w_ih.shape[1:]} and {w_hh.shape[1:]}")
        hidden = w_hr.shape[-1] if w_hr is not None and w_hr.ndim == 3 else w_hh.shape[-1]
        gates = w_ih.shape[1] // hidden if hidden else 0
        if gates not in _CELLS or gates * hidden != w_ih.shape[1]:
            raise ValueError(f"{source}: {prefix}weight_ih{tag} has {w_ih.shape[1]} rows for hidden size "
                             f"{hidden}: not 4 (LSTM), 3 (GRU) or 1 (RNN) gates")
        cls = _CELLS[gates]
        options: dict[str, Any] = {"dtype": dtype}
        if cls is RNN:
            options["nonlinearity"] = nonlinearity
        args = (w_ih, w_hh, b_ih, b_hh) + ((w_hr,) if cls is LSTM else ())
        if cls is not LSTM and w_hr is not None:
            raise ValueError(f"{source}: {prefix}weight_hr{tag} found on a {cls.__name__}")
        layers.append(cls(*args, **options))
    return layers


def model_from_state_dict(state_dict: dict, *, source: str = "state_dict", dtype: Any = None,
                          nonlinearity: str = "tanh") -> Model:
    """A Model from a bare nn.LSTM / nn.GRU / nn.RNN state_dict read from a file (LoadError if it is not one)."""
    known = {k for k in state_dict if (m := _PARAM_KEY.match(k)) and not m["prefix"]}
    other = [k for k in state_dict if k not in known]
    if other:
        raise LoadError(f"{source}: tensor {other[0]!r} is not a parameter of a bare nn.LSTM/GRU/RNN; for a "
                        "whole network use le.save(le.from_torch(net, example_input), 'model.safetensors') where "
                        "torch is installed, then le.load that file")
    try:
        layers = recurrent_layers_from_state_dict(state_dict, nonlinearity=nonlinearity,
                                                  dtype=np.float32 if dtype is None else dtype, source=source)
    except (TypeError, ValueError) as exc:
        # The layers' own checks do not know the file.
        message = str(exc) if str(exc).startswith(source) else f"{source}: {exc}"
        raise LoadError(message) from exc
    try:
        return Model(layers, metadata={"source": "torch"})
    except (TypeError, ValueError) as exc:
        raise LoadError(f"{source}: {exc}") from exc


def _is_torch_rnn(obj: Any) -> bool:
    cls = type(obj)
    return cls.__module__.startswith("torch.nn") and cls.__name__ in (
        "LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell")


def _is_torch_module(obj: Any) -> bool:
    return any(c.__module__ == "torch.nn.modules.module" and c.__name__ == "Module" for c in type(obj).__mro__)


def _state(module: Any) -> dict[str, np.ndarray]:
    return {k: _to_numpy(v) for k, v in module.state_dict().items()}


def _rnn_layers(module: Any, dtype: Any, nonlinearity: str | None) -> list:
    module_nl = getattr(module, "nonlinearity", "tanh")
    if nonlinearity is not None and nonlinearity != module_nl:
        raise ValueError(f"from_torch: nonlinearity={nonlinearity!r} but the module uses {module_nl!r}")
    return recurrent_layers_from_state_dict(_state(module), nonlinearity=module_nl, dtype=dtype,
                                            source=type(module).__name__)


# Sequential children that act on each position's features alone (the last axis), whatever the input's
# rank: for these a chain of engine layers computes what the Sequential does without seeing an input.
_ACTIVATIONS = {"ReLU": "relu", "Tanh": "tanh", "Sigmoid": "sigmoid", "Softsign": "softsign", "Identity": None}


def _sequential_layers(module: Any, path: str, dtype: Any, nonlinearity: str | None) -> list:
    """Engine layers for an nn.Sequential's children (its forward is their order), or ValueError."""
    out = []
    children = list(module.named_children())
    for i, (name, child) in enumerate(children):
        where = f"{path}.{name}" if path else name
        kind = type(child).__name__
        torch_nn = type(child).__module__.startswith("torch.nn")

        def refuse(why: str) -> ValueError:
            return ValueError(f"from_torch: {where!r} ({kind}) {why}; pass example_input "
                              "(le.from_torch(module, x)) to read the forward with torch.export")

        if _is_torch_rnn(child):
            if i != len(children) - 1 or path:
                raise refuse("passes its (output, state) tuple on to the next child")
            out.extend(_rnn_layers(child, dtype, nonlinearity))
        elif torch_nn and kind == "Embedding":
            if out or path:
                raise refuse("is not the first child")
            if child.max_norm is not None:
                raise refuse("renormalises rows at lookup (max_norm)")
            out.append(_layers.Embedding(_to_numpy(child.weight), dtype=dtype))
        elif torch_nn and kind == "Linear":
            bias = None if child.bias is None else _to_numpy(child.bias)
            out.append(_layers.Dense(_to_numpy(child.weight), bias, dtype=dtype))
        elif torch_nn and kind == "LayerNorm":
            if len(child.normalized_shape) != 1:
                raise refuse(f"normalises over {tuple(child.normalized_shape)}, more than the last axis")
            weight = None if child.weight is None else _to_numpy(child.weight)
            bias = None if child.bias is None else _to_numpy(child.bias)
            out.append(_layers.LayerNorm(weight, bias, normalized_shape=child.normalized_shape[0],
                                         eps=child.eps, dtype=dtype))
        elif torch_nn and kind == "Dropout":
            out.append(_layers.Dropout())
        elif torch_nn and kind in _ACTIVATIONS:
            if _ACTIVATIONS[kind]:
                out.append(_layers.Activation(_ACTIVATIONS[kind]))
        elif torch_nn and kind == "Softmax" and child.dim == -1:
            out.append(_layers.Activation("softmax"))
        elif torch_nn and kind == "Sequential":
            out.extend(_sequential_layers(child, where, dtype, nonlinearity))
        else:
            raise refuse("acts on an axis that depends on the input's rank, or is not one lstm_engine maps "
                         "without seeing an input (Embedding, Linear, LayerNorm, Dropout, ReLU, Tanh, Sigmoid, "
                         "Softsign, Softmax(dim=-1), an RNN last)")
    return out


def _is_sequential(obj: Any) -> bool:
    cls = type(obj)
    return cls.__module__.startswith("torch.nn") and cls.__name__ == "Sequential"


def from_torch(obj: Any, example_input: Any = None, *, nonlinearity: str | None = None,
               dtype: Any = np.float32) -> Model:
    """A Model from a PyTorch module (its real forward) or a state_dict.

    With ``example_input`` (a tensor or NumPy array, or a tuple of them, one per forward argument) the
    module's forward is read with ``torch.export`` and mapped op by op (see
    ``lstm_engine.formats.torch_export``); ``model.forward(x)`` then returns ``(y, state)``, y exactly
    what ``module(x)`` returns (a tuple stays a tuple) and state the recurrent layers' final states. The
    module must be in eval mode. Ops outside what the engine runs raise ``UnsupportedOpError``.

    Without it: an ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (or a ``*Cell``), an ``nn.Sequential`` of
    position-wise layers (Embedding, Linear, LayerNorm, Dropout, activations; an RNN as the last child),
    or a bare recurrent module's state_dict of tensors or arrays. Any other module needs example_input:
    only its forward says what it computes. ``nonlinearity`` ('tanh' or 'relu') is needed for an RNN
    state_dict with ReLU, since state_dicts do not record it; modules carry their own.
    """
    torch = sys.modules.get("torch")
    metadata = {"source": "torch", "framework_version": getattr(torch, "__version__", None)}
    if example_input is not None:
        if not _is_torch_module(obj):
            raise TypeError(f"from_torch: example_input is for an nn.Module, got {type(obj).__name__}")
        from .torch_export import export_graph

        return Model(export_graph(obj, example_input, dtype=dtype))
    if _is_torch_rnn(obj):
        layers = _rnn_layers(obj, dtype, nonlinearity)
    elif _is_sequential(obj):
        layers = _sequential_layers(obj, "", dtype, nonlinearity)
        if not layers:
            raise ValueError("from_torch: the Sequential has no children lstm_engine can run")
    elif _is_torch_module(obj):
        raise ValueError(f"from_torch: {type(obj).__name__} is not a bare nn.LSTM/GRU/RNN or an nn.Sequential: only "
                         "its forward says what it computes; pass an example input, le.from_torch(module, "
                         "example_input), and lstm_engine reads the forward with torch.export")
    elif isinstance(obj, dict):
        layers = recurrent_layers_from_state_dict(obj, nonlinearity=nonlinearity or "tanh", dtype=dtype)
    else:
        raise TypeError(f"from_torch: expected an nn.Module or a state_dict, got {type(obj).__name__}")
    return Model(layers, metadata=metadata)
