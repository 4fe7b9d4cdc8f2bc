"""GRU layers: gates r, z, n in PyTorch's row order; reset after (PyTorch, Keras default) or before (Keras)."""
from __future__ import annotations

from typing import Any

import numpy as np

from . import _kernels
from ._recurrent import RecurrentLayer


class GRU(RecurrentLayer):
    """A (bidirectional) GRU layer from PyTorch-layout weights.

    weight_ih (3H, I), weight_hh (3H, H), bias_ih and bias_hh (3H,), rows in gate order r, z, n;
    bidirectional weights stacked (forward, reverse) on a leading axis of 2. State: (h (D, B, H),).
    ``reset_after=True`` is PyTorch's n = tanh(W_in x + b_in + r * (W_hn h + b_hn));
    ``reset_after=False`` is Keras's other variant, n = tanh(W_in x + b_in + W_hn (r * h) + b_hn).
    """

    num_gates = 3

    def __init__(self, weight_ih: Any, weight_hh: Any, bias_ih: Any = None, bias_hh: Any = None,
                 *, reset_after: bool = True, **options: Any) -> None:
        self.reset_after = bool(reset_after)
        super().__init__(weight_ih, weight_hh, bias_ih, bias_hh, None, **options)

    def _cell_code(self) -> int:
        return _kernels.CELL_CODES["GRU" if self.reset_after else "GRU_RESET_BEFORE"]

    def _kernel_biases(self, b_ih: np.ndarray, b_hh: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        H = self.hidden_size
        if self.reset_after:
            # b_hn is multiplied by r, so only the r and z biases may be summed.
            return np.concatenate([b_ih[: 2 * H] + b_hh[: 2 * H], b_ih[2 * H:]]), b_hh[2 * H:]
        return b_ih + b_hh, None

    def config(self) -> dict:
        return {**super().config(), "reset_after": self.reset_after}
