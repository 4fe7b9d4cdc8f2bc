"""A plain NumPy reference of the recurrent layers: one timestep at a time, straight from the equations.

Written independently of the kernels (no shared code) so that tests compare two implementations.
"""
from __future__ import annotations

import numpy as np

from lstm_engine.activations import apply


def _act(name, x):
    return apply(name, np.array(x, copy=True))


def cell_step(layer, d, x, h, c, w):
    """One step of direction d of a layer for a batch: returns the new (h, c)."""
    H = layer.hidden_size
    b_ih = w["bias_ih"][d] if w.get("bias_ih") is not None else 0
    b_hh = w["bias_hh"][d] if w.get("bias_hh") is not None else 0
    gi = x @ w["weight_ih"][d].T + b_ih
    name = type(layer).__name__
    act, gact = layer.activation, layer.recurrent_activation
    if name == "LSTM":
        gates = gi + h @ w["weight_hh"][d].T + b_hh
        i, f, g, o = (gates[:, k * H:(k + 1) * H] for k in range(4))
        c = _act(gact, f) * c + _act(gact, i) * _act(act, g)
        h = _act(gact, o) * _act(act, c)
        if w.get("weight_hr") is not None:
            h = h @ w["weight_hr"][d].T
        return h, c
    if name == "GRU":
        W_hh = w["weight_hh"][d]
        bh = np.broadcast_to(b_hh, (3 * H,)) if np.ndim(b_hh) else np.zeros(3 * H)
        r = _act(gact, gi[:, :H] + h @ W_hh[:H].T + bh[:H])
        z = _act(gact, gi[:, H:2 * H] + h @ W_hh[H:2 * H].T + bh[H:2 * H])
        if layer.reset_after:
            n = _act(act, gi[:, 2 * H:] + r * (h @ W_hh[2 * H:].T + bh[2 * H:]))
        else:
            n = _act(act, gi[:, 2 * H:] + (r * h) @ W_hh[2 * H:].T + bh[2 * H:])
        return (1 - z) * n + z * h, c
    return _act(act, gi + h @ w["weight_hh"][d].T + b_hh), c


def run_layer(layer, x, mask=None, state=None, zero_masked=True):
    """Raw outputs (B, T, D*P) of a recurrent layer (each at its own timestep) and its final state."""
    w = {k: v.astype(np.float64) for k, v in layer.weights().items()}
    B, T, _ = x.shape
    D, P, H = layer.num_directions, (layer.proj_size or layer.hidden_size), layer.hidden_size
    x = x.astype(np.float64)
    y = np.zeros((B, T, D * P))
    hs, cs = [], []
    for d in range(D):
        h = np.zeros((B, P)) if state is None else state[0][d].astype(np.float64).copy()
        c = np.zeros((B, H)) if state is None or len(state) < 2 else state[1][d].astype(np.float64).copy()
        reverse = (d == 1) != layer.go_backwards
        order = range(T - 1, -1, -1) if reverse else range(T)
        prev = np.zeros((B, P))
        for t in order:
            hn, cn = cell_step(layer, d, x[:, t], h, c, w)
            valid = np.ones(B, bool) if mask is None else mask[:, t]
            h = np.where(valid[:, None], hn, h)
            c = np.where(valid[:, None], cn, c)
            out = np.where(valid[:, None], hn, 0 if zero_masked else prev)
            y[:, t, d * P:(d + 1) * P] = out
            prev = out
        hs.append(h)
        cs.append(c)
    state = (np.stack(hs), np.stack(cs)) if type(layer).__name__ == "LSTM" else (np.stack(hs),)
    return y, state
