"""PyTorch: modules and state_dicts to engine layers (no torch import unless handed torch objects)."""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from ..gru import GRU
from ..lstm import LSTM
from ..model import Model
from ..rnn import RNN

_CELLS = {4: LSTM, 3: GRU, 1: RNN}
_RNN_KEY = re.compile(r"^(?P<prefix>.*?)weight_ih(?:_l(?P<layer>\d+))?(?P<rev>_reverse)?$")


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
    from ..errors import LoadError

    try:
        layers = recurrent_layers_from_state_dict(state_dict, nonlinearity=nonlinearity,
                                                  dtype=np.float32 if dtype is None else dtype, source=source)
    except (TypeError, ValueError) as exc:
        raise LoadError(str(exc)) from exc
    return Model(layers, metadata={"source": "torch"})


def _is_torch_rnn(obj: Any) -> bool:
    cls = type(obj)
    return cls.__module__.startswith("torch.nn") and cls.__name__ in (
        "LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell")


def from_torch(obj: Any, *, nonlinearity: str | None = None, dtype: Any = np.float32) -> Model:
    """A Model from an ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (or a ``*Cell``) or from its state_dict.

    A state_dict may hold torch tensors or NumPy arrays. ``nonlinearity`` ('tanh' or 'relu') is needed
    for an RNN state_dict with ReLU, since state_dicts do not record it; modules carry their own.
    """
    if _is_torch_rnn(obj):
        module_nl = getattr(obj, "nonlinearity", "tanh")
        if nonlinearity is not None and nonlinearity != module_nl:
            raise ValueError(f"from_torch: nonlinearity={nonlinearity!r} but the module uses {module_nl!r}")
        state_dict = obj.state_dict()
        nonlinearity = module_nl
        source = type(obj).__name__
    elif isinstance(obj, dict):
        state_dict, source = obj, "state_dict"
    else:
        raise TypeError(f"from_torch: expected an nn.LSTM, nn.GRU, nn.RNN or a state_dict, got {type(obj).__name__}")
    layers = recurrent_layers_from_state_dict(state_dict, nonlinearity=nonlinearity or "tanh",
                                              dtype=dtype, source=source)
    return Model(layers, metadata={"source": "torch"})
