"""What the original PyTorch network computes, rebuilt from its state_dict: the reference ``lstm-engine verify``
compares a chain of recurrent layers with (``--source model.pt`` or a safetensors state_dict).

Only a bare stack of nn.LSTM / nn.GRU / nn.RNN can be rebuilt from weights alone (a state_dict holds no
forward); each run of consecutive recurrent layers whose tensors share a module prefix becomes one torch
module with ``num_layers`` layers.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .errors import UserError


class TorchStep(NamedTuple):
    """One torch module of the rebuilt network, covering ``num_layers`` consecutive engine layers."""

    module: Any  # torch.nn.LSTM | GRU | RNN, float64, batch_first
    num_layers: int
    num_directions: int


def torch_reference(model, path: str, x, lengths) -> tuple[np.ndarray, list[tuple[np.ndarray, ...]]]:
    """Outputs (float64) and per-layer states ((h, c) or (h,), as ``model.forward`` returns them) of the
    PyTorch network whose state_dict is ``path``, run on ``x`` with ``lengths`` (packed when given)."""
    import torch

    steps = _rebuild(model, path, _read_state_dict(path))
    h = torch.from_numpy(np.asarray(x)) if model.takes_ids else torch.from_numpy(np.asarray(x, np.float64))
    states = []
    with torch.no_grad():
        for step in steps:
            T = h.shape[1]
            if lengths is not None:
                packed = torch.nn.utils.rnn.pack_padded_sequence(h, torch.from_numpy(lengths), batch_first=True,
                                                                 enforce_sorted=False)
                out, st = step.module(packed)
                h = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T)[0]
            else:
                h, st = step.module(h)
            st = st if isinstance(st, tuple) else (st,)
            D = step.num_directions
            for k in range(step.num_layers):
                states.append(tuple(s[k * D:(k + 1) * D].numpy() for s in st))
    return h.numpy(), states


def _read_state_dict(path: str) -> dict:
    import torch

    from .formats import detect

    if detect(path) == "safetensors":
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many kinds for a file it cannot read
            if "weights_only" in str(exc) or "Unsupported global" in str(exc):
                # torch's own text runs to a page with terminal colour codes: say what it means instead.
                raise UserError(f"{path}: holds pickled Python objects (a whole module or a class of your own), "
                                "not only tensors, and is never unpickled here; save net.state_dict() and pass "
                                "that file, or pass the .py file that builds the module") from None
            raise UserError(f"{path}: torch cannot read it as a state_dict: {type(exc).__name__}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError(f"{path}: expected a state_dict (names -> tensors)")
    return sd


def _rebuild(model, path: str, sd: dict) -> list[TorchStep]:
    """The torch modules, in order, that hold the state_dict's tensors, matched against the model's layers."""
    import torch

    # Modules in state_dict order: "<prefix>.<param>" keys grouped by prefix.
    groups: dict[str, dict] = {}
    for key, value in sd.items():
        prefix, _, name = key.rpartition(".")
        groups.setdefault(prefix, {})[name] = value.double()
    layers = [layer for layer in model.layers if layer.weights()]
    pos = 0
    steps = []
    for prefix, params in groups.items():
        if pos >= len(layers):
            raise UserError(f"{path}: has more weights ({prefix!r}) than {model!r} holds")
        layer = layers[pos]
        kind = type(layer).__name__
        recurrent_weights = "weight_ih_l0" in params
        if recurrent_weights != bool(layer.is_recurrent):
            number = next(i for i, known in enumerate(model.layers) if known is layer)
            raise UserError(f"{path}: its tensors {prefix or '(top level)'}.{{{', '.join(params)}}} are "
                            f"{'a recurrent' if recurrent_weights else 'a non-recurrent'} module's, but layer "
                            f"{number} of the model is a {kind}: not the network this model was made from")
        if not recurrent_weights:
            raise UserError(f"verify --source: a state_dict rebuilds only recurrent layers, not a {kind} layer")
        stack = []
        while pos < len(layers) and layers[pos].is_recurrent and f"weight_ih_l{len(stack)}" in params:
            stack.append(layers[pos])
            pos += 1
        first = stack[0]
        cls = {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU, "RNN": torch.nn.RNN}[type(first).__name__]
        kw = {"nonlinearity": first.nonlinearity} if cls is torch.nn.RNN else {}
        if first.proj_size:
            kw["proj_size"] = first.proj_size
        module = cls(first.input_size, first.hidden_size, num_layers=len(stack), bias="bias_ih_l0" in params,
                     batch_first=True, bidirectional=first.bidirectional, **kw).double()
        try:
            module.load_state_dict(params, strict=True)
        except RuntimeError as exc:
            raise UserError(f"{path}: its weights do not fit the model's architecture: "
                            f"{str(exc).splitlines()[-1].strip()}") from None
        steps.append(TorchStep(module, len(stack), first.num_directions))
    return steps
