"""Vanilla (Elman) RNN layers: h' = act(W_ih x + b_ih + W_hh h + b_hh)."""
from __future__ import annotations

from typing import Any

from . import _kernels
from ._recurrent import RecurrentLayer


class RNN(RecurrentLayer):
    """A (bidirectional) Elman RNN layer from PyTorch-layout weights.

    weight_ih (H, I), weight_hh (H, H), bias_ih and bias_hh (H,); bidirectional weights stacked
    (forward, reverse) on a leading axis of 2. ``nonlinearity`` is 'tanh' or 'relu' as in PyTorch
    (Keras SimpleRNN activations such as 'linear' are accepted too). State: (h (D, B, H),).
    """

    num_gates = 1

    def __init__(self, weight_ih: Any, weight_hh: Any, bias_ih: Any = None, bias_hh: Any = None,
                 *, nonlinearity: str = "tanh", **options: Any) -> None:
        super().__init__(weight_ih, weight_hh, bias_ih, bias_hh, None, activation=nonlinearity, **options)

    @property
    def nonlinearity(self) -> str:
        return self.activation

    def _cell_code(self) -> int:
        return _kernels.CELL_CODES["RNN"]

    def config(self) -> dict:
        cfg = super().config()
        cfg["nonlinearity"] = cfg.pop("activation")
        del cfg["recurrent_activation"]
        return cfg
