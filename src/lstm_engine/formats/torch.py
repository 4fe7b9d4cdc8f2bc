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
                        "whole network use le.save(le.from_torch(net), 'model.safetensors') where torch is "
                        "installed, then le.load that file")
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


_ACTIVATIONS = {"ReLU": "relu", "Tanh": "tanh", "Sigmoid": "sigmoid", "Softsign": "softsign",
                "Hardsigmoid": None, "Identity": "linear"}


def _container_layers(module: Any, path: str, dtype: Any, nonlinearity: str | None) -> list:
    """Engine layers for a container's children, in registration order (taken as the forward order)."""
    out = []
    for name, child in module.named_children():
        where = f"{path}.{name}" if path else name
        kind = type(child).__name__
        torch_nn = type(child).__module__.startswith("torch.nn")
        if _is_torch_rnn(child):
            out.extend(_rnn_layers(child, dtype, nonlinearity))
        elif torch_nn and kind == "Embedding":
            if child.max_norm is not None:
                raise ValueError(f"from_torch: {where} (Embedding with max_norm) renormalises rows at lookup; "
                                 "not supported")
            out.append(_layers.Embedding(_to_numpy(child.weight), dtype=dtype))
        elif torch_nn and kind == "Linear":
            bias = None if child.bias is None else _to_numpy(child.bias)
            out.append(_layers.Dense(_to_numpy(child.weight), bias, dtype=dtype))
        elif torch_nn and kind == "LayerNorm":
            if len(child.normalized_shape) != 1:
                raise ValueError(f"from_torch: {where} normalises over {tuple(child.normalized_shape)}; only "
                                 "the last axis is supported")
            weight = None if child.weight is None else _to_numpy(child.weight)
            bias = None if child.bias is None else _to_numpy(child.bias)
            out.append(_layers.LayerNorm(weight, bias, normalized_shape=child.normalized_shape[0],
                                         eps=child.eps, dtype=dtype))
        elif torch_nn and kind == "BatchNorm1d":
            # Applied over the last (feature) axis of (B, T, F), i.e. on the features of every step.
            weight = None if child.weight is None else _to_numpy(child.weight)
            bias = None if child.bias is None else _to_numpy(child.bias)
            out.append(_layers.BatchNorm(_to_numpy(child.running_mean), _to_numpy(child.running_var),
                                         weight, bias, eps=child.eps, dtype=dtype))
        elif torch_nn and kind == "Dropout":
            out.append(_layers.Dropout())
        elif torch_nn and kind in _ACTIVATIONS and _ACTIVATIONS[kind]:
            if _ACTIVATIONS[kind] != "linear":
                out.append(_layers.Activation(_ACTIVATIONS[kind]))
        elif torch_nn and kind == "Softmax":
            if child.dim not in (-1, 2, None):
                raise ValueError(f"from_torch: {where} is a Softmax over dim {child.dim}; only the last "
                                 "(feature) axis is supported")
            out.append(_layers.Activation("softmax"))
        elif torch_nn and kind == "Sequential" or (not torch_nn and _is_torch_module(child)
                                                    and list(child.children())):
            out.extend(_container_layers(child, where, dtype, nonlinearity))
        else:
            raise ValueError(f"from_torch: child {where!r} ({kind}) is not supported; a container may hold "
                             "Embedding, LSTM/GRU/RNN, Linear, LayerNorm, BatchNorm1d, Dropout and activation "
                             "modules (ReLU, Tanh, Sigmoid, Softsign, Softmax)")
    return out


def from_torch(obj: Any, *, nonlinearity: str | None = None, dtype: Any = np.float32) -> Model:
    """A Model from a PyTorch module or a state_dict.

    Accepts an ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (or a ``*Cell``); an ``nn.Sequential`` or plain
    module whose children, in registration order, are Embedding, LSTM/GRU/RNN, Linear, LayerNorm,
    BatchNorm1d, Dropout and activation modules (the order is taken as the forward order); or a bare
    recurrent module's state_dict of tensors or arrays. ``nonlinearity`` ('tanh' or 'relu') is needed for
    an RNN state_dict with ReLU, since state_dicts do not record it; modules carry their own.
    """
    if _is_torch_rnn(obj):
        layers = _rnn_layers(obj, dtype, nonlinearity)
    elif _is_torch_module(obj):
        layers = _container_layers(obj, "", dtype, nonlinearity)
        if not layers:
            raise ValueError(f"from_torch: {type(obj).__name__} has no children lstm_engine can run")
    elif isinstance(obj, dict):
        layers = recurrent_layers_from_state_dict(obj, nonlinearity=nonlinearity or "tanh", dtype=dtype)
    else:
        raise TypeError(f"from_torch: expected an nn.Module or a state_dict, got {type(obj).__name__}")
    torch = sys.modules.get("torch")
    return Model(layers, metadata={"source": "torch", "framework_version": getattr(torch, "__version__", None)})
