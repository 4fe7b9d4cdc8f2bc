"""LSTM layers: gates i, f, g, o in PyTorch's row order, optional projection (proj_size)."""
from __future__ import annotations

from typing import Any

from . import _kernels
from ._recurrent import RecurrentLayer


class LSTM(RecurrentLayer):
    """A (bidirectional) LSTM layer from PyTorch-layout weights.

    weight_ih (4H, I), weight_hh (4H, P), bias_ih and bias_hh (4H,), weight_hr (P, H) when projected
    (P = proj_size, else P = H); rows in gate order i, f, g, o. For a bidirectional layer stack
    (forward, reverse) on a leading axis of 2. State: (h (D, B, P), c (D, B, H)).
    ``activation`` is g's and the cell output's function, ``recurrent_activation`` the gates' (Keras names);
    ``cell_activation`` gives the cell output its own function (ONNX's h).
    ONNX's options: ``peephole`` (3H,) per direction, rows i, f, o: i and f add P * c_prev, o adds
    P * c_new; ``input_forget=True`` couples the gates, f = 1 - i; ``clip`` (see RecurrentLayer).
    """

    num_gates = 4

    def __init__(self, weight_ih: Any, weight_hh: Any, bias_ih: Any = None, bias_hh: Any = None,
                 weight_hr: Any = None, **options: Any) -> None:
        super().__init__(weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, **options)

    def _cell_code(self) -> int:
        return _kernels.CELL_CODES["LSTM"]

    @property
    def state_shapes(self) -> tuple[tuple[int, int], ...]:
        return ((self.num_directions, self._state_out), (self.num_directions, self.hidden_size))
